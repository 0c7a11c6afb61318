"""EdgeLLM's edge and cloud policies: an adaptive sequence-confidence trigger, drafting on
while a verification is pending."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from systems.api import EdgeContext, EdgePolicy, GenerationRequest
from systems.protocol import UPLINK_Q, VERIFICATION, SerialUploader, SpeculativeEdge, VerifyingCloud, choose_rule


@dataclass
class EdgeLLMConfig:
    """r1: initial sequence threshold (verify once the product of confidences since the last
    verification is <= r1; PipeSD's settings: 0.92 on HumanEval, 0.5 on GSM8K). c_floor:
    the smallest confidence product used in the R1 update (guards a division by ~0).
    n_hat / history: the scheduling window N̂ (initial value; then the mean length of the
    last ``history`` windows), which is also the size of the chunks proactive tokens go up
    in. r1_update: the length N the R1 update measures a verdict against (:func:`update_r1`):
    "window", the verified window's own draft length, as PipeSD's code and its public
    reproduction do; "n_hat", the scheduling window N̂, as PipeSD's App. G.3 writes it.
    max_windows: verification windows awaiting verdicts at once. uplink_q / q_dtype: what
    travels with each draft token (as PipeSD ran it: full fp16 distributions). lead_row:
    False (PipeSD's code) sends the first token drafted beyond a pending window as an id
    only, the edge's guess of that verdict's own token, and the trigger counts the drafts
    after it; True sends its row too and counts it as an ordinary draft (a variant; see
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
    r1_update: str = "window"
    lead_row: bool = False
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
        if self.verification not in VERIFICATION:
            raise ValueError(f"edgellm: verification must be one of {', '.join(VERIFICATION)}, "
                             f"got {self.verification!r}")
        if self.r1_update not in R1_UPDATES:
            raise ValueError(f"edgellm: r1_update must be one of {', '.join(R1_UPDATES)}, got {self.r1_update!r}")


R1_UPDATES = ("window", "n_hat")


def update_r1(r1: float, product: float, n_correct: int, n: int, c_floor: float = 1e-6) -> float:
    """EdgeLLM's Eq. (7) as PipeSD runs it: R1 <- 0.5 R1 when N_correct = N, otherwise
    R1 / C^((N - N_correct) / N), at most 1; C is the confidence product that closed the
    window.

    N is the window's own draft length in PipeSD's code (then R1 halves after every fully
    accepted window and rises after a rejection) or the scheduling window N̂ in its App. G.3
    text (then the exponent is signed: more correct tokens than N̂ lower R1, fewer raise it).
    """
    if n_correct == n:
        return 0.5 * r1
    exponent = (n - n_correct) / n
    return min(1.0, r1 / max(product, c_floor) ** exponent)


class EdgeLLMEdge(EdgePolicy):
    """Draft until the confidence product falls to R1; upload the window then. While its
    verdict is pending, keep drafting and upload those tokens in chunks of N̂. Uploads go
    one at a time, each acknowledged (:class:`systems.protocol.SerialUploader`), so chunks
    still queued when a rejection discards their window are never sent, as in PipeSD's
    implementation of this baseline."""

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
        sender = SerialUploader(edge)
        products: dict[int, tuple[float, int]] = {}  # window -> (confidence product that closed it, its size)
        product, confidences, r1s = 1.0, [], []  # the open window's trigger state; r1s: R1 at each token

        def close_window() -> None:
            nonlocal product, confidences, r1s
            edge.note("trigger", {"product": product, "r1": self.r1, "confidences": confidences, "r1s": r1s})
            products[edge.window] = (product, edge.window_drafts)
            self._lengths.append(edge.window_drafts)
            sender.put(edge.prepare(verify=True, ack=True))
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
                    close_window()  # a verdict raised R1 past the open window's product
                elif room > 0 and len(edge.awaiting) < cfg.max_windows:
                    d = await edge.draft()
                    # The first token beyond a pending window stands for that verdict's own
                    # token (it settles it): the trigger counts the drafts after it.
                    lead = edge.drafted_lead
                    if not lead:
                        product *= d.confidence
                        confidences.append(d.confidence)
                        r1s.append(self.r1)
                    if (not lead and product <= self.r1) or edge.is_stop(d.token) or room == 1:
                        close_window()
                    elif edge.awaiting and edge.unsent - edge.lead_pending >= self.n_hat:
                        sender.put(edge.prepare(ack=True))
                elif not edge.awaiting:
                    sender.put(edge.prepare(verify=True, ack=True))
                    product, confidences, r1s = 1.0, [], []
                else:
                    await sender.drain()
                    if self._settle(edge, products, *await edge.next_verdict()):
                        product, confidences, r1s = 1.0, [], []
            await sender.drain()
        finally:
            await sender.stop()
            await edge.close()
        return edge.output

    def _settle(self, edge: SpeculativeEdge, products: dict, v, env) -> bool:
        """Apply a verdict and adapt R1; True when the open window was discarded."""
        closed = products.pop(v.round, None)
        if closed is not None:
            product, size = closed
            # The window's correct tokens: those this verdict accepted. With lead_row on, the
            # window's size also counts its first token, which the previous verdict committed
            # as its own (it is not verified again): it counts as correct too.
            n_correct = v.n_accepted + max(0, size - v.n_verified)
            n = max(1, size) if self.config.r1_update == "window" else self.n_hat
            self.r1 = update_r1(self.r1, product, n_correct, n, self.config.c_floor)
        before = edge.window
        edge.apply(v, env)
        return edge.window != before


class EdgeLLMCloud(VerifyingCloud):
    """Verify each window as it arrives, one at a time."""
