"""EdgeLLM's edge and cloud policies: an adaptive sequence-confidence trigger, drafting on
while a verification is pending."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from systems.api import EdgeContext, EdgePolicy, GenerationRequest
from systems.protocol import UPLINK_Q, SpeculativeEdge, VerifyingCloud, choose_rule


@dataclass
class EdgeLLMConfig:
    """r1: initial sequence threshold (verify once the product of confidences since the last
    verification is <= r1; PipeSD's settings: 0.92 on HumanEval, 0.5 on GSM8K). c_floor:
    the smallest confidence product used in the R1 update (guards a division by ~0).
    n_hat / history: the scheduling window N̂ (initial value; then the mean length of the
    last ``history`` windows), which is also the size of the chunks proactive tokens go up
    in. max_windows: verification windows awaiting verdicts at once. uplink_q / q_dtype:
    what travels with each draft token (as PipeSD ran it: full fp16 distributions).
    lead_row: send the distribution of the first token drafted beyond a pending window too,
    as PipeSD's code does (True); False sends it as an id only, since that window's verdict
    commits it as its own token or discards it (a variant; see
    :class:`systems.protocol.SpeculativeEdge`). reset_r1: start every request from the
    initial R1 (False: R1 adapts across the device's whole run, as the paper's runs of 1000
    tokens go; the paper does not say it resets)."""

    r1: float = 0.92
    n_hat: int = 20
    history: int = 100
    max_windows: int = 2
    c_floor: float = 1e-6
    uplink_q: str = "full"
    q_dtype: str = "float16"
    lead_row: bool = True
    reset_r1: bool = False
    verification: str = "full"

    def __post_init__(self):
        if not 0.0 < self.r1 <= 1.0:
            raise ValueError(f"edgellm: r1 must be in (0, 1], got {self.r1}")
        for key in ("n_hat", "history", "max_windows"):
            if getattr(self, key) < 1:
                raise ValueError(f"edgellm: {key} must be >= 1, got {getattr(self, key)}")
        if self.uplink_q not in UPLINK_Q:
            raise ValueError(f"edgellm: uplink_q must be one of {', '.join(UPLINK_Q)}, got {self.uplink_q!r}")


def update_r1(r1: float, product: float, n_correct: int, n_hat: int, c_floor: float = 1e-6) -> float:
    """EdgeLLM's Eq. (7) as PipeSD's App. G.3 states it, with N̂ the scheduling window:
    R1 <- 0.5 R1 when N_correct = N̂, otherwise R1 / C^((N̂ - N_correct) / N̂), at most 1.

    The exponent is signed: a window with more correct tokens than N̂ lowers R1 (longer
    windows next), one with fewer raises it. (The reproduction's code instead halves after
    any fully accepted window and uses the window's own length in place of N̂; this suite
    follows the paper's text.)
    """
    if n_correct == n_hat:
        return 0.5 * r1
    exponent = (n_hat - n_correct) / n_hat
    return min(1.0, r1 / max(product, c_floor) ** exponent)


class EdgeLLMEdge(EdgePolicy):
    """Draft until the confidence product falls to R1; upload the window then. While its
    verdict is pending, keep drafting and upload those tokens in chunks of N̂."""

    config: EdgeLLMConfig

    def __init__(self, config: EdgeLLMConfig):
        super().__init__(config)
        self.r1 = config.r1
        self._lengths: deque[int] = deque(maxlen=config.history)

    @property
    def n_hat(self) -> int:
        return max(1, round(sum(self._lengths) / len(self._lengths))) if self._lengths else self.config.n_hat

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        cfg = self.config
        edge = SpeculativeEdge(ctx, request, choose_rule(request.sampling, cfg.verification),
                               uplink_q=cfg.uplink_q, q_dtype=cfg.q_dtype, lead_row=cfg.lead_row)
        if cfg.reset_r1:
            self.r1 = cfg.r1
        await edge.open()
        products: dict[int, tuple[float, int]] = {}  # window -> (confidence product that closed it, its size)
        product, confidences, r1s = 1.0, [], []  # the open window's trigger state; r1s: R1 at each token

        async def close_window() -> None:
            nonlocal product, confidences, r1s
            edge.note("trigger", {"product": product, "r1": self.r1, "confidences": confidences, "r1s": r1s})
            products[edge.window] = (product, edge.window_size)
            self._lengths.append(edge.window_size)
            await edge.upload(verify=True)
            product, confidences, r1s = 1.0, [], []

        try:
            while not edge.done:
                while (got := edge.poll_verdict()) is not None:
                    if self._settle(edge, products, *got):
                        product, confidences, r1s = 1.0, [], []
                if edge.done:
                    break
                room = edge.draft_room
                if confidences and edge.window_size and product <= self.r1:
                    await close_window()  # a verdict raised R1 past the open window's product
                elif room > 0 and len(edge.awaiting) < cfg.max_windows:
                    d = await edge.draft()
                    product *= d.confidence
                    confidences.append(d.confidence)
                    r1s.append(self.r1)
                    if product <= self.r1 or edge.is_stop(d.token) or room == 1:
                        await close_window()
                    elif edge.awaiting and edge.unsent >= self.n_hat:
                        await edge.upload()
                elif not edge.awaiting:
                    await edge.upload(verify=True)
                    product, confidences, r1s = 1.0, [], []
                else:
                    if self._settle(edge, products, *await edge.next_verdict()):
                        product, confidences, r1s = 1.0, [], []
        finally:
            await edge.close()
        return edge.output

    def _settle(self, edge: SpeculativeEdge, products: dict, v, env) -> bool:
        """Apply a verdict and adapt R1; True when the open window was discarded."""
        closed = products.pop(v.round, None)
        if closed is not None:
            product, size = closed
            # The window's correct tokens: those this verdict accepted, plus its first token
            # when the previous verdict already committed it as its own (the window was
            # drafted on top of that verdict and survived it); that token is not verified again.
            n_correct = v.n_accepted + max(0, size - v.n_verified)
            self.r1 = update_r1(self.r1, product, n_correct, self.n_hat, self.config.c_floor)
        before = edge.window
        edge.apply(v, env)
        return edge.window != before


class EdgeLLMCloud(VerifyingCloud):
    """Verify each window as it arrives, one at a time."""
