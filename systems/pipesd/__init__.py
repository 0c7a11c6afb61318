"""PipeSD (Han et al., ICML 2026): pipelined, DP-batched uploads with a dual-threshold trigger.

The edge overlaps drafting with uploading: tokens go up in batches planned by a DP over an
online cost model (upload α + β·b, generation γ·b), a verification is triggered when the
product of draft confidences or one token's confidence falls to a threshold, and drafting
continues while a verification is pending (proactive tokens, kept only if the verdict
accepts the whole window and its token matches). Thresholds are tuned by Bayesian
optimisation (:mod:`systems.pipesd.tuner`). See papers.md §1 and its addendum §4.
"""

from systems.api import register_system
from systems.pipesd.policy import PipeSDCloud, PipeSDConfig, PipeSDEdge

register_system(
    "pipesd",
    config=PipeSDConfig,
    edge=PipeSDEdge,
    cloud=PipeSDCloud,
    description="pipelined DP-batched uploads, dual-threshold verification trigger, proactive drafting",
    variants={
        "ids": {"uplink_q": "rule"},
        "deep": {"max_windows": 3, "r1": 0.5, "r2": 0.2},
        "lead-row": {"lead_row": True, "r1": 0.5, "r2": 0.3},
        "online": {"tuner": "online", "tuner_trials": 3, "tuner_tokens": 4, "retune_window": 8},
        "sparse": {"verification": "sparse"},
    },
)
