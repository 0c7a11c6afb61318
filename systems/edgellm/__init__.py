"""EdgeLLM (Xu et al., IEEE TMC 2024), as PipeSD's paper runs it as a baseline: verify when
the product of draft confidences since the last verification falls to R1; R1 adapts after
every verdict (halved after a fully accepted window, else divided by C^((N-N_correct)/N),
at most 1, with N the window's length as PipeSD's code has it or N̂ as its App. G.3 text
has it); the edge keeps drafting while a verification is pending and uploads those tokens
in chunks of N̂. papers.md §1 (e), addendum §4.8.
"""

from systems.api import register_system
from systems.edgellm.policy import EdgeLLMCloud, EdgeLLMConfig, EdgeLLMEdge

register_system(
    "edgellm",
    config=EdgeLLMConfig,
    edge=EdgeLLMEdge,
    cloud=EdgeLLMCloud,
    description="adaptive sequence-confidence trigger, drafting on while verification is pending",
    variants={"math": {"r1": 0.5, "n_hat": 4}, "sparse": {"verification": "sparse"}},
)
