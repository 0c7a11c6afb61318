"""SLED (SEC 2025): heterogeneous edges drafting a fixed γ, one server batching their
verifications first come, first served (papers.md §4). WISP's baseline."""

from systems.api import register_system
from systems.sled.policy import SledCloud, SledConfig, SledEdge

register_system(
    "sled",
    config=SledConfig,
    edge=SledEdge,
    cloud=SledCloud,
    description="SLED-like: fixed γ per edge device, FCFS batched verification (max batch or batching window)",
    variants={"batch1": {"max_batch": 1, "batch_window_s": 0.0}, "sparse": {"verification": "sparse"},
              "gamma_by_device": {"gamma": 2, "gamma_by_device": {"fast": 6}}},
)
