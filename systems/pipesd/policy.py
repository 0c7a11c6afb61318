"""PipeSD's edge and cloud policies (Han et al., ICML 2026; papers.md §1, addendum §4).

The edge drafts continuously. A communication task uploads the drafted tokens in batches
whose sizes come from the DP plan (:mod:`systems.pipesd.plan`), one batch at a time on the
serial link (each upload is acknowledged, and its time feeds the α/β estimate). The
dual-threshold trigger closes a verification window; the unsent rest of the window goes
at once as one batch with the verification request. While that verdict is pending the edge
keeps drafting (proactive tokens) and uploads them by the plan; they survive the verdict
only if it accepted the whole window and its token equals the first proactive token
(:class:`systems.protocol.SpeculativeEdge` applies that rule on both sides).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from systems.api import EdgeContext, EdgePolicy, GenerationRequest
from systems.messages import Ack, Upload
from systems.pipesd.estimator import CostEstimate, EnvironmentMonitor, moved
from systems.pipesd.plan import BatchPlan, plan_batches
from systems.pipesd.tuner import METHODS, ThresholdTuner, warm_up
from systems.protocol import (UPLINK_Q, VERIFICATION, ProtocolError, SerialUploader, SpeculativeEdge, VerifyingCloud,
                              choose_rule)

TUNERS = ("none", "online")


@dataclass
class PipeSDConfig:
    """PipeSD's parameters; defaults from the paper and its public reproduction.

    r1/r2: sequence and token thresholds (trigger when the product of confidences since the
    last verification is <= r1, or the latest confidence is <= r2; the paper's comparisons
    are non-strict). Defaults: the reproduction's BO result on HumanEval (0.90, 0.3514).
    n_hat: initial scheduling window N̂ (20). history: samples kept for N̂, γ, α, β (100).
    replan_gate: relative change of γ, α or β that re-runs the DP (0.2).
    probe_sizes: α/β are bootstrapped with probe batches of 1..probe_sizes tokens (8), sent
    once per edge device before its first request. alpha0/beta0/gamma0: the cost model
    before any measurement (the reproduction's constants: 25 ms, 0.29 MB at 20 Mbit/s per
    token, 36 ms). max_windows: verification windows awaiting verdicts at once (the formal
    one and proactive ones); drafting pauses at this depth (an assumption: the paper lets a
    second NAV be issued on proactive tokens and names no limit).
    uplink_q: "full" sends each draft token's full distribution (the paper's uplink, which
    makes β large), "rule" only what the acceptance rule needs (ids under greedy: a variant,
    not PipeSD as published). q_dtype: precision of those rows (fp16: 0.30 MB per token for
    a 151,936-token vocabulary). lead_row: False (PipeSD's code) treats the first proactive
    token as the edge's guess of the pending verdict's own token: it goes up as an id only,
    and the trigger and the plan count the drafts after it. True sends its row too and
    counts it as an ordinary draft (a variant). tuner: "online"
    re-tunes (r1, r2) during the run (the paper's mode; ``tuner_method`` bo, grid or random, ``tuner_trials`` candidates of
    ``tuner_tokens`` accepted tokens each, re-tuned when the TPT over the last
    ``retune_window`` accepted tokens moves by more than ``retune_gate``); "none" keeps the
    given thresholds (offline tuning: ``specwan tune``).
    """

    r1: float = 0.90
    r2: float = 0.3514
    n_hat: int = 20
    history: int = 100
    replan_gate: float = 0.2
    probe_sizes: int = 8
    alpha0: float = 0.025
    beta0: float = 0.116
    gamma0: float = 0.036
    max_windows: int = 2
    uplink_q: str = "full"
    q_dtype: str = "float16"
    lead_row: bool = False
    verification: str = "full"
    tuner: str = "none"
    tuner_method: str = "bo"
    tuner_trials: int = 16
    tuner_tokens: int = 20
    retune_gate: float = 0.2
    retune_window: int = 100
    seed: int = 0

    def __post_init__(self):
        for key in ("r1", "r2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"pipesd: {key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("n_hat", "history", "max_windows", "tuner_trials", "tuner_tokens", "retune_window"):
            if getattr(self, key) < 1:
                raise ValueError(f"pipesd: {key} must be >= 1, got {getattr(self, key)}")
        if self.probe_sizes < 0:
            raise ValueError(f"pipesd: probe_sizes must be >= 0, got {self.probe_sizes}")
        if self.uplink_q not in UPLINK_Q:
            raise ValueError(f"pipesd: uplink_q must be one of {', '.join(UPLINK_Q)}, got {self.uplink_q!r}")
        if self.verification not in VERIFICATION:
            raise ValueError(f"pipesd: verification must be one of {', '.join(VERIFICATION)}, "
                             f"got {self.verification!r}")
        if self.tuner not in TUNERS:
            raise ValueError(f"pipesd: tuner must be one of {', '.join(TUNERS)}, got {self.tuner!r}")
        if self.tuner_method not in METHODS:
            raise ValueError(f"pipesd: tuner_method must be one of {', '.join(METHODS)}, got {self.tuner_method!r}")
        np.dtype(self.q_dtype)  # an unknown dtype name fails here


class _OnlineTuning:
    """PipeSD's online re-tuning: candidates scored over live accepted tokens, re-run when
    the TPT moves (App. D). The tuner picks each next candidate in a background thread, as
    the paper re-runs BO asynchronously (a pick measured 0.1-0.2 s on a 2-core CPU, after a
    one-time start-up of ~2.4 s that :func:`warm_up` pays when the policy is built). The
    edge keeps the current thresholds meanwhile and switches at the next verdict, whose time
    and tokens, served under the old thresholds, score no candidate."""

    def __init__(self, cfg: PipeSDConfig):
        self.cfg = cfg
        self.tuner: ThresholdTuner | None = None
        self.candidate: tuple[float, float] | None = None
        self.trial_time = 0.0
        self.trial_tokens = 0
        self.rounds = 0
        self.recent: deque[tuple[float, int]] = deque()  # (seconds, tokens) per verdict
        self.reference: float | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipesd-tuner")
        self._next: Future | None = None  # the next candidate, being picked in the background
        self.warming: Future = self._worker.submit(warm_up, cfg.tuner_method)  # True once the sampler is warm

    def start(self) -> tuple[float, float]:
        """Begin a tuning round; returns its first candidate (a random point: no fit)."""
        self.rounds += 1
        self.tuner = ThresholdTuner(self.cfg.tuner_method, self.cfg.tuner_trials, self.cfg.seed + self.rounds)
        self.trial_time, self.trial_tokens = 0.0, 0
        self.candidate = self.tuner.ask()
        return self.candidate

    def observe(self, seconds: float, tokens: int, current: tuple[float, float]) -> tuple[float, float]:
        """Account a verdict's time and tokens; returns the thresholds to use next."""
        if self.tuner is not None:
            if self._next is not None:
                # waits only if the pick is still running: deterministic in virtual time
                self.candidate, self._next = self._next.result(), None
                return self.candidate
            self.trial_time += seconds
            self.trial_tokens += tokens
            if self.trial_tokens >= self.cfg.tuner_tokens:
                self.tuner.tell(self.trial_time / self.trial_tokens)
                self.trial_time, self.trial_tokens = 0.0, 0
                if self.tuner.done:
                    best = self.tuner.best()
                    self.tuner, self.candidate, self.reference = None, None, None
                    self.recent.clear()
                    return best.r1, best.r2
                self._next = self._worker.submit(self.tuner.ask)
            return self.candidate
        self.recent.append((seconds, tokens))
        while sum(n for _, n in self.recent) - self.recent[0][1] >= self.cfg.retune_window:
            self.recent.popleft()
        total = sum(n for _, n in self.recent)
        if total < self.cfg.retune_window:
            return current  # the TPT window is not full yet
        tpt = sum(s for s, _ in self.recent) / total
        if self.reference is None:
            self.reference = tpt
        elif abs(tpt - self.reference) > self.cfg.retune_gate * self.reference:
            self.recent.clear()
            return self.start()
        return current


class PipeSDEdge(EdgePolicy):
    """PipeSD's edge: DP-batched pipelined uploads, dual-threshold trigger, proactive drafting."""

    config: PipeSDConfig

    def __init__(self, config: PipeSDConfig):
        super().__init__(config)
        c = config
        self.monitor = EnvironmentMonitor(c.alpha0, c.beta0, c.gamma0, c.n_hat, c.history, c.probe_sizes)
        self.thresholds = (c.r1, c.r2)
        self.tuning = _OnlineTuning(c) if c.tuner == "online" else None
        self._estimate: CostEstimate = self.monitor.estimate()
        self._replans: list[dict] = []  # re-plans since the last window closed
        self.plan: BatchPlan = self._make_plan(self._estimate)

    @staticmethod
    def _make_plan(e: CostEstimate) -> BatchPlan:
        return plan_batches(e.n_hat, e.gamma, e.alpha, e.beta)

    def _replan(self, edge: SpeculativeEdge | None = None) -> None:
        e = self.monitor.estimate()
        why = moved(self._estimate, e, self.config.replan_gate)
        if why:
            self._estimate, self.plan = e, self._make_plan(e)
            if edge is not None:  # kept on the open window's record
                self._replans.append({"t": edge.ctx.clock.now(), "why": why, "plan": list(self.plan.sizes)})
                edge.note("replans", self._replans)

    async def warm_up(self, ctx: EdgeContext) -> None:
        """Bootstrap α and β: one probe batch of each missing size, each acknowledged."""
        sizes = self.monitor.missing_probe_sizes()
        if not sizes or ctx.link is None or ctx.drafter is None:
            return
        width = ctx.drafter.engine.info.vocab_size if self.config.uplink_q == "full" else 0
        for n in sizes:
            rows = np.zeros((n, width), dtype=self.config.q_dtype) if width else None
            t0 = ctx.clock.now()
            await ctx.link.send(Upload(ctx.session, -1, -1, [0] * n, q_rows=rows, probe=True))
            reply = (await ctx.link.recv()).msg
            if not (isinstance(reply, Ack) and reply.probe and reply.round == -1 and reply.n_tokens == n):
                raise ProtocolError(f"pipesd: a {n}-token probe was answered with {reply!r}, not its ack")
            self.monitor.add_upload(n, ctx.clock.now() - t0)
        self._replan()

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        cfg = self.config
        edge = SpeculativeEdge(ctx, request, choose_rule(request.sampling, cfg.verification),
                               uplink_q=cfg.uplink_q, q_dtype=cfg.q_dtype, lead_row=cfg.lead_row)
        await edge.open()
        sender = SerialUploader(edge, self._on_acked)
        if self.tuning is not None and self.tuning.tuner is None and self.tuning.rounds == 0:
            self.thresholds = self.tuning.start()
        window = _WindowState()
        last = ctx.clock.now()
        try:
            while not edge.done:
                while (got := edge.poll_verdict()) is not None:
                    last = self._settle(edge, window, last, got)
                if edge.done:
                    break
                room = edge.draft_room
                if room > 0 and len(edge.awaiting) < cfg.max_windows:
                    await self._draft_one(edge, sender, window, room)
                elif not edge.awaiting:
                    # Nothing to draft and nothing pending: ask for the verdict's own token.
                    sender.put(edge.prepare(verify=True, ack=True))
                    window.reset()
                else:
                    await sender.drain()
                    last = self._settle(edge, window, last, await edge.next_verdict())
            await sender.drain()
        finally:
            await sender.stop()
            await edge.close()
        return edge.output

    def _on_acked(self, msg: Upload, seconds: float) -> None:
        """A non-verifying batch's upload time feeds the α/β estimate, sized by the draft
        tokens whose data it carried (at least the plan's next size, so never none)."""
        if not msg.verify:
            self.monitor.add_upload(len(msg.tokens) - msg.n_fixed - msg.lead_implied, seconds)

    async def _draft_one(self, edge: SpeculativeEdge, sender: SerialUploader, window: "_WindowState",
                         room: int) -> None:
        t0 = edge.ctx.clock.now()
        d = await edge.draft()
        self.monitor.add_generation(edge.ctx.clock.now() - t0)
        if window.start_plan is None:
            window.start_plan = self.plan.sizes
        p = d.confidence
        # The first token beyond a pending window stands for that verdict's own token: the
        # verdict settles it, so the trigger and the plan count only the drafts after it.
        lead = edge.drafted_lead
        if not lead:
            window.confidences.append(p)
            window.product *= p
        r1, r2 = self.thresholds
        reason = (None if lead else "r1" if window.product <= r1 else "r2" if p <= r2 else None) or (
            "stop" if edge.is_stop(d.token) else "limit" if room == 1 else None)
        cap = self.plan.size_at(window.batch)
        lead_unsent = int(edge.lead_pending)
        if reason is not None:
            # The unsent rest of the window goes at once with the verification request.
            window.batches.append([edge.unsent - lead_unsent, cap])
            edge.note("trigger", {"reason": reason, "product": window.product, "p": p, "r1": r1, "r2": r2,
                                  "confidences": list(window.confidences)})
            edge.note("plan", list(window.start_plan))
            edge.note("batches", window.batches)  # [size sent, the plan's size at that point]
            self.monitor.add_window(edge.window_drafts)
            sender.put(edge.prepare(verify=True, ack=True))
            window.reset()
            self._replans = []
            self._replan(edge)
        elif edge.unsent - lead_unsent >= cap:
            window.batches.append([cap, cap])
            sender.put(edge.prepare(cap + lead_unsent, ack=True))
            window.batch += 1
            self._replan(edge)

    def _settle(self, edge: SpeculativeEdge, window: "_WindowState", last: float, got) -> float:
        """Apply a verdict; returns the time it was applied."""
        v, env = got
        beyond = edge.speculative[v.n_verified:]
        if beyond:
            promoted = (v.token is not None and v.n_accepted == v.n_verified and beyond[0].token == v.token)
            edge.note_round(v.round, "proactive", {"kept": promoted, "tokens": len(beyond),
                                                   "first": beyond[0].token, "verdict_token": v.token})
        edge.note_round(v.round, "estimate", vars(self._estimate) | {"plan": list(self.plan.sizes)})
        window_before = edge.window
        emitted = edge.apply(v, env)
        if edge.window != window_before:  # the speculation was discarded: a fresh window
            window.reset()
            if self._replans:  # a restarted window's record starts afresh: keep its re-plans on it
                edge.note("replans", self._replans)
        now = edge.ctx.clock.now()
        if self.tuning is not None:
            self.thresholds = self.tuning.observe(now - last, len(emitted), self.thresholds)
        return now


@dataclass
class _WindowState:
    """The open window's trigger state: confidences since the last verification, plan position."""

    product: float = 1.0
    batch: int = 0
    start_plan: tuple | None = None

    def __post_init__(self):
        self.confidences: list[float] = []
        self.batches: list[list[int]] = []

    def reset(self) -> None:
        self.product, self.batch, self.start_plan = 1.0, 0, None
        self.confidences, self.batches = [], []


class PipeSDCloud(VerifyingCloud):
    """PipeSD's cloud: buffers uploaded tokens and their distributions, verifies on request."""
