"""SLED's edge and server: fixed-γ drafting on heterogeneous edges, and one server that
batches their verification requests first come, first served.

SLED (Li et al., SEC 2025, arXiv 2506.09397; notes: research/papers.md §4 and the addendum
§3) has many edge devices, each with its own draft model, draft several tokens per cycle
and send them to one shared server holding the target, which verifies requests from many
devices in batches. The paper publishes neither its batching rule nor its "dynamic
drafting" rule; as WISP describes it, SLED drafts a fixed number of tokens per round and
batches without regard to SLOs. This is that baseline, SLED-like: γ per device
(``gamma_by_device``, else ``gamma``), and a server that starts a verification pass when
``max_batch`` requests wait or ``batch_window_s`` has passed since the oldest one arrived,
whichever comes first, taking them in arrival order.

Each drafted token's confidence, entropy, top-1/top-2 margin and logit spread go into its
round's record (``draft_features``), the logged rounds WISP's controller is trained on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from systems.api import EdgeContext, EdgePolicy, GenerationRequest
from systems.protocol import UPLINK_Q, VERIFICATION, Job, SpeculativeEdge, VerifyingCloud, choose_rule
from systems.wisp.drafting import draft_round


@dataclass
class SledConfig:
    """γ draft tokens per round (``gamma_by_device``: per device profile name); the server's
    batch: at most ``max_batch`` requests, gathered for at most ``batch_window_s`` seconds
    after the oldest waiting one arrived. ``log_features``: record each draft token's
    features (for training WISP's controller)."""

    gamma: int = 4
    gamma_by_device: dict = field(default_factory=dict)
    max_batch: int = 8
    batch_window_s: float = 0.005
    verification: str = "full"
    sparse_k: int = 10
    uplink_q: str = "rule"
    q_dtype: str | None = None
    log_features: bool = True

    def __post_init__(self):
        for name, g in {"gamma": self.gamma, **{f"gamma_by_device.{k}": v for k, v in self.gamma_by_device.items()}}.items():
            if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                raise ValueError(f"sled: {name} must be an integer >= 1, got {g!r}")
        if self.max_batch < 1:
            raise ValueError(f"sled: max_batch must be >= 1, got {self.max_batch}")
        if self.batch_window_s < 0:
            raise ValueError(f"sled: batch_window_s must be >= 0 seconds, got {self.batch_window_s}")
        if self.uplink_q not in UPLINK_Q:
            raise ValueError(f"sled: uplink_q must be one of {', '.join(UPLINK_Q)}, got {self.uplink_q!r}")
        if self.verification not in VERIFICATION:
            raise ValueError(f"sled: verification must be one of {', '.join(VERIFICATION)}, got {self.verification!r}")


class SledEdge(EdgePolicy):
    """Draft this device's γ tokens, upload them for verification, wait for the verdict."""

    config: SledConfig

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        cfg = self.config
        gamma = int(cfg.gamma_by_device.get(ctx.device, cfg.gamma))
        edge = SpeculativeEdge(ctx, request, choose_rule(request.sampling, cfg.verification), cfg.sparse_k,
                               cfg.uplink_q, cfg.q_dtype)
        await edge.open()
        try:
            while not edge.done:
                await draft_round(edge, gamma, cfg.log_features)
                await edge.upload(verify=True)
                edge.apply(*await edge.next_verdict())
        finally:
            await edge.close()
        return edge.output


class SledCloud(VerifyingCloud):
    """First come, first served batches: up to ``max_batch`` requests, or what arrived within
    ``batch_window_s`` of the oldest waiting one."""

    config: SledConfig

    def _enqueue(self, job: Job) -> None:
        # The queue is in arrival order as long as each job arrives no earlier than the last
        # one queued (a pass takes its front, a closed session's jobs are filtered out: both
        # keep the order); then its oldest job is its first, found without a scan.
        if self.jobs and job.t_arrived < self.jobs[-1].t_arrived:
            self._unordered = True
        super()._enqueue(job)

    def _oldest(self) -> float:
        """When the oldest waiting job arrived (O(1) while the queue is in arrival order)."""
        if getattr(self, "_unordered", False):
            return min(j.t_arrived for j in self.jobs)
        return self.jobs[0].t_arrived

    async def next_batch(self) -> list[Job]:
        oldest = self._oldest()
        while len(self.jobs) < self.config.max_batch:
            left = oldest + self.config.batch_window_s - self.ctx.clock.now()
            if left <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                break
        batch = self.jobs[: self.config.max_batch]
        del self.jobs[: self.config.max_batch]
        if not self.jobs:
            self._unordered = False
        return batch
