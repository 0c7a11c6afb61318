"""HSL's edge and cloud policies: a token-confidence trigger, stop-and-wait."""

from __future__ import annotations

from dataclasses import dataclass

from systems.api import EdgeContext, EdgePolicy, GenerationRequest
from systems.protocol import UPLINK_Q, VERIFICATION, SpeculativeEdge, VerifyingCloud, choose_rule


@dataclass
class HSLConfig:
    """r2: verify once a draft token's confidence is <= r2 (PipeSD's settings: 0.99 on
    HumanEval, 0.7 on GSM8K; the default is the code setting). uplink_q / q_dtype: what
    travels with each draft token (as PipeSD ran it: full fp16 distributions)."""

    r2: float = 0.99
    uplink_q: str = "full"
    q_dtype: str = "float16"
    verification: str = "full"

    def __post_init__(self):
        if not 0.0 <= self.r2 <= 1.0:
            raise ValueError(f"hsl: r2 must be in [0, 1], got {self.r2}")
        if self.uplink_q not in UPLINK_Q:
            raise ValueError(f"hsl: uplink_q must be one of {', '.join(UPLINK_Q)}, got {self.uplink_q!r}")
        if self.verification not in VERIFICATION:
            raise ValueError(f"hsl: verification must be one of {', '.join(VERIFICATION)}, "
                             f"got {self.verification!r}")


class HSLEdge(EdgePolicy):
    """Draft until a token's confidence falls to r2 (or a stop/the limit), upload it all, wait."""

    config: HSLConfig

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        cfg = self.config
        edge = SpeculativeEdge(ctx, request, choose_rule(request.sampling, cfg.verification),
                               uplink_q=cfg.uplink_q, q_dtype=cfg.q_dtype)
        await edge.open()
        try:
            while not edge.done:
                confidences = []
                for _ in range(edge.remaining - 1):  # the verdict adds one token of its own
                    d = await edge.draft()
                    confidences.append(d.confidence)
                    if d.confidence <= cfg.r2 or edge.is_stop(d.token):
                        break
                edge.note("trigger", {"confidences": confidences, "r2": cfg.r2})
                await edge.upload(verify=True)
                edge.apply(*await edge.next_verdict())
        finally:
            await edge.close()
        return edge.output


class HSLCloud(VerifyingCloud):
    """Verify each window as it arrives, one at a time."""
