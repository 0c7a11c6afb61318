"""Edge-only decoding: the draft model alone, autoregressive, nothing crosses the link.

The lower anchor of quality and the upper anchor of independence from the network. Its
output is the *draft* model's decode, so its reference is the draft, not the target.
"""

from systems.api import register_system
from systems.edge_only.policy import EdgeOnlyConfig, EdgeOnlyEdge

register_system(
    "edge_only",
    config=EdgeOnlyConfig,
    edge=EdgeOnlyEdge,
    cloud=None,
    description="draft model alone on the edge, autoregressive",
    reference="draft",
)
