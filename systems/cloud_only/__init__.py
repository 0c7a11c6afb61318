"""Cloud-only decoding: the target alone, each token crossing the link.

The "centralized serving" baseline of WISP and the "AR" baseline of PicoSpec: the edge
sends the prompt, the cloud decodes autoregressively and streams every token back.
"""

from systems.api import register_system
from systems.cloud_only.policy import CloudOnlyCloud, CloudOnlyConfig, CloudOnlyEdge

register_system(
    "cloud_only",
    config=CloudOnlyConfig,
    edge=CloudOnlyEdge,
    cloud=CloudOnlyCloud,
    description="target model alone in the cloud, every token streamed over the link",
)
