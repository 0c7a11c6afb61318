"""HSL (Hao et al., "Hybrid SLM and LLM for Edge-Cloud Collaborative Inference", EdgeFM'24),
as PipeSD's paper runs it as a baseline: the edge drafts until one token's confidence falls
to a threshold R2, then uploads the window and waits for the verdict (no upload before the
verification, no drafting while it is pending). papers.md §1 (e), addendum §4.8.
"""

from systems.api import register_system
from systems.hsl.policy import HSLCloud, HSLConfig, HSLEdge

register_system(
    "hsl",
    config=HSLConfig,
    edge=HSLEdge,
    cloud=HSLCloud,
    description="token-confidence trigger (verify when P <= R2), stop-and-wait",
    variants={"low": {"r2": 0.3}, "sparse": {"verification": "sparse"}},
)
