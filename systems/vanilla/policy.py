"""Edge and cloud policies of vanilla (stop-and-wait) speculative decoding."""

from __future__ import annotations

from dataclasses import dataclass

from systems.api import EdgeContext, EdgePolicy, GenerationRequest
from systems.protocol import UPLINK_Q, VERIFICATION, SpeculativeEdge, VerifyingCloud, choose_rule


@dataclass
class VanillaConfig:
    """γ draft tokens per round; "full" verification sends draft distributions, "sparse" only q(x).

    uplink_q "full" sends every draft token's full distribution even under greedy decoding
    (as PipeSD's experiments run vanilla); "rule" only what the acceptance rule needs.
    q_dtype: precision of those rows (None: the harness's default).
    """

    gamma: int = 4
    verification: str = "full"
    sparse_k: int = 10
    uplink_q: str = "rule"
    q_dtype: str | None = None

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"vanilla: gamma must be >= 1, got {self.gamma}")
        if self.uplink_q not in UPLINK_Q:
            raise ValueError(f"vanilla: uplink_q must be one of {', '.join(UPLINK_Q)}, got {self.uplink_q!r}")
        if self.verification not in VERIFICATION:
            raise ValueError(f"vanilla: verification must be one of {', '.join(VERIFICATION)}, "
                             f"got {self.verification!r}")


class VanillaEdge(EdgePolicy):
    """Draft up to γ tokens (fewer at a stop token or the length limit), upload, wait."""

    config: VanillaConfig

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        rule = choose_rule(request.sampling, self.config.verification)
        edge = SpeculativeEdge(ctx, request, rule, self.config.sparse_k, self.config.uplink_q, self.config.q_dtype)
        await edge.open()
        try:
            while not edge.done:
                # The verdict adds one token of its own, so draft at most remaining - 1.
                for _ in range(min(self.config.gamma, edge.remaining - 1)):
                    if edge.is_stop((await edge.draft()).token):
                        break
                await edge.upload(verify=True)
                edge.apply(*await edge.next_verdict())
        finally:
            await edge.close()
        return edge.output


class VanillaCloud(VerifyingCloud):
    """Verify each window as it arrives, one at a time."""
