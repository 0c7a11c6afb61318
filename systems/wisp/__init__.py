"""WISP (SIGMETRICS 2026): an edge speculation controller that stops drafting before a
predicted rejection, and an SLO-aware batch scheduler with a verification-time estimator on
the shared server (papers.md §3). WISP-like where the paper is silent."""

from systems.api import register_system
from systems.wisp.policy import WispCloud, WispConfig, WispEdge

register_system(
    "wisp",
    config=WispConfig,
    edge=WispEdge,
    cloud=WispCloud,
    description="WISP-like: rejection-predicting edge controller, SLO-aware EDF/density batching with a time estimator",
    variants={"batch1": {"max_batch": 1}, "sparse": {"verification": "sparse"}, "short": {"max_draft": 2},
              "controller": {"controller": "systems/wisp/trained/toy.json"}},
)
