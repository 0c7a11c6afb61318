"""Centralized serving: the target alone in the cloud, with continuous batching.

The baseline WISP (SIGMETRICS 2026) reports against: every edge sends its prompt, the
server decodes every request autoregressively on the target and streams each token back,
running one forward pass per step over all active sessions (continuous batching, as Orca
and vLLM serve). The edge side is cloud-only's; only the cloud's scheduling differs.
"""

from systems.api import register_system
from systems.centralized.policy import CentralizedCloud, CentralizedConfig
from systems.cloud_only.policy import CloudOnlyEdge

register_system(
    "centralized",
    config=CentralizedConfig,
    edge=CloudOnlyEdge,
    cloud=CentralizedCloud,
    description="target model alone in the cloud, every session decoded in one batched step per token",
    reference="target",
    variants={"batch1": {"max_batch": 1}},
)
