"""Vanilla speculative decoding over a link: stop-and-wait (Leviathan et al. 2023).

Draft γ tokens, upload them in one message, wait for the verdict, repeat. Nothing overlaps:
the edge idles while the link and the cloud work. This is the baseline of PipeSD, PicoSpec,
WISP and SLED (papers.md §0).
"""

from systems.api import register_system
from systems.vanilla.policy import VanillaCloud, VanillaConfig, VanillaEdge

register_system(
    "vanilla",
    config=VanillaConfig,
    edge=VanillaEdge,
    cloud=VanillaCloud,
    description="stop-and-wait speculative decoding: draft γ, upload, verify, wait",
    variants={"gamma1": {"gamma": 1}, "gamma6": {"gamma": 6}, "sparse": {"verification": "sparse"}},
)
