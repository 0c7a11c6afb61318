"""PicoSpec's edge and cloud policies (arXiv 2603.19133; papers.md §2, papers-addendum.md §1).

Rules chosen where the paper is silent (each is "our choice" unless a source is named):

- Rounds. A round holds ``n`` draft tokens the cloud verifies (n = 4, the paper's §4.2).
  One round is verified at a time: the next round is submitted when the verdict of the
  one in flight has arrived (the timing of the paper's model, §3.4: a hit costs
  max(T_draft, T_RTT + T_verify), a miss their sum).
- Parallel drafting (§3.1). While a round is in flight the edge drafts the next one from
  its tail. Its first token stands for the pending verdict's own token (the bonus on full
  acceptance: the paper's Table 1 counts up to n + 1 tokens a round, addendum §1.2), so a
  pre-drafted round drafts n + 1 tokens. It survives the verdict only if the whole round
  was accepted and the verdict's token equals that first token, the rule
  :class:`systems.protocol.SpeculativeEdge` applies for every system (papers.md §2(b)1,
  option (i)); otherwise it is discarded on both sides and its drafting shows as waste.
  A verdict interrupts drafting at the next token boundary.
- Fast verification (§3.2). The edge uploads each drafted token at once (without asking
  for verification); when idle, the cloud scores the tokens of a round that have arrived,
  and the round's verification request (sent when the round is complete) then scores only
  the rest. After a rejection the correction the edge resampled goes up at once, to be
  evaluated before the next round arrives. An early pass starts only if it should end
  before the round's request arrives (that request's arrival predicted from the session's
  past rounds, the pass from past passes), so it never delays the late pass: with a large
  fixed cost per pass there is no early work. The early and late parts of a round's
  verification are recorded (``t_verify_early`` in ``extra``, ``t_verify`` the late part).
- Separate rejection sampling (§3.3): the sparse rule of :mod:`systems.sampling`, K = 10
  (the paper's only K, addendum §1.1). Greedy decoding uses the greedy rule (ids only, the
  correction's id down: exact). ``split_rejection=False`` sends every draft token's full
  distribution up (fp16) and verifies by standard rejection sampling, as the paper's
  "w/o Split-rej" row is "forced to transmit huge probability distributions".
- Latency-aware truncation (§3.3, last paragraph; the paper gives no threshold). A round
  whose drafting began while another round was in flight is cut short and submitted at
  once when that round's verdict has come back and the time since its drafting began is
  at least the predicted round trip of a verification (submission to verdict: RTT, queue
  and verification, an exponentially weighted mean of the measured ones, weight
  ``rtt_weight``), with at least one token the cloud verifies. So the cloud never waits on
  a round the edge is still drafting once the link and the verification have taken as
  long as the drafting should have; with nothing in flight there is nothing to wait for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from systems.api import EdgeContext, EdgePolicy, GenerationRequest, Op, verify_batch
from systems.messages import CloseSession, Upload, Verdict, _message
from systems.protocol import CloudSession, Job, SpeculativeEdge, VerifyingCloud, choose_rule


@dataclass
class PicoSpecConfig:
    """PicoSpec's parameters.

    n: draft tokens the cloud verifies per round (4, the paper's default and the best of
    its Table 4). sparse_k: K, the target's top-K pairs sent down on a rejection (10, the
    paper's worked example). parallel_draft, fast_verify, split_rejection: the three parts
    (each off for the paper's ablation rows). truncation: latency-aware truncation (see the
    module). rtt_weight: weight of the newest measurement in the predicted round trip.
    q_dtype: precision of the full rows sent with split_rejection off (fp16).
    """

    n: int = 4
    sparse_k: int = 10
    parallel_draft: bool = True
    fast_verify: bool = True
    split_rejection: bool = True
    truncation: bool = True
    rtt_weight: float = 0.5
    q_dtype: str = "float16"

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"picospec: n must be >= 1, got {self.n}")
        if self.sparse_k < 1:
            raise ValueError(f"picospec: sparse_k must be >= 1, got {self.sparse_k}")
        if not 0.0 < self.rtt_weight <= 1.0:
            raise ValueError(f"picospec: rtt_weight must be in (0, 1], got {self.rtt_weight}")
        np.dtype(self.q_dtype)  # an unknown dtype name fails here

    @property
    def verification(self) -> str:
        return "sparse" if self.split_rejection else "full"

    @property
    def uplink_q(self) -> str:
        return "rule" if self.split_rejection else "full"


@_message(17)
@dataclass
class PicoVerdict(Verdict):
    """A verdict with the early part of its verification: ``t_verify_early`` seconds of
    cloud compute spent on the round's tokens before its verification request arrived,
    covering ``early_tokens`` of them (fast verification)."""

    t_verify_early: float = 0.0
    early_tokens: int = 0


class _VerdictNotes:
    """The request's recorder, adding to a verdict's round record what the verdict did
    (known only once the edge has applied it, which also records the round)."""

    def __init__(self, inner):
        self.inner = inner
        self._pending: tuple[int, Callable[[], dict]] | None = None

    def expect(self, round_id: int, outcome: Callable[[], dict]) -> None:
        self._pending = (round_id, outcome)

    def round(self, record) -> None:
        if self._pending is not None and self._pending[0] == record.round:
            record.extra.update(self._pending[1]())
            self._pending = None
        self.inner.round(record)

    def emit(self, tokens) -> None:
        self.inner.emit(tokens)


@dataclass
class _Round:
    """The open round's drafting state on the edge."""

    start: float | None = None  # when its first token began drafting
    overlapped: bool = False  # drafting began while another round was in flight


class PicoSpecEdge(EdgePolicy):
    """PicoSpec's edge: drafts ahead of the verdict, streams tokens, truncates late rounds."""

    config: PicoSpecConfig

    def __init__(self, config: PicoSpecConfig):
        super().__init__(config)
        self.predicted_rtt: float | None = None  # submission -> verdict, seconds

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        cfg = self.config
        rule = choose_rule(request.sampling, cfg.verification)
        notes = _VerdictNotes(ctx.recorder)
        ctx = dataclasses.replace(ctx, recorder=notes)
        edge = SpeculativeEdge(ctx, request, rule, cfg.sparse_k, cfg.uplink_q,
                               None if cfg.split_rejection else cfg.q_dtype, lead_row=False)
        await edge.open()
        rnd = _Round()
        submitted: dict[int, float] = {}  # round -> when its verification was requested
        try:
            while not edge.done:
                while (got := edge.poll_verdict()) is not None:
                    rnd = self._settle(edge, notes, got, rnd, submitted)
                if edge.done:
                    break
                if cfg.fast_verify and edge.correction_unsent:
                    await edge.upload(0)  # Pre-Verify: the correction the edge resampled goes up at once
                if not edge.awaiting and (why := self._ready(edge, rnd)) is not None:
                    submitted[edge.window] = ctx.clock.now()
                    if why == "truncated":
                        edge.note("truncated", {"drafts": edge.window_drafts, "drafting_s": ctx.clock.now() - rnd.start,
                                                "predicted_rtt_s": self.predicted_rtt})
                    await edge.upload(verify=True)
                    rnd = _Round()
                elif edge.draft_room > 0 and edge.window_drafts < cfg.n and (cfg.parallel_draft or not edge.awaiting):
                    if rnd.start is None:
                        rnd = _Round(ctx.clock.now(), bool(edge.awaiting))
                    await edge.draft()
                    if cfg.fast_verify:
                        await edge.upload()  # Pre-Verify: the cloud may start on it at once
                else:
                    rnd = self._settle(edge, notes, await edge.next_verdict(), rnd, submitted)
        finally:
            await edge.close()
        return edge.output

    def _ready(self, edge: SpeculativeEdge, rnd: _Round) -> str | None:
        """Why the open round is to be submitted now ("full", "limit" or "truncated"), or
        None to go on drafting (no round is in flight)."""
        if edge.window_drafts >= self.config.n:
            return "full"
        if edge.draft_room == 0:
            return "limit"  # a stop token, or the output's length
        if (self.config.truncation and rnd.overlapped and rnd.start is not None and edge.window_drafts >= 1
                and self.predicted_rtt is not None and edge.ctx.clock.now() - rnd.start >= self.predicted_rtt):
            return "truncated"
        return None

    def _settle(self, edge: SpeculativeEdge, notes: "_VerdictNotes", got, rnd: _Round,
                submitted: dict[int, float]) -> _Round:
        """Apply a verdict; returns the open round's state (fresh when its drafts were discarded)."""
        v, env = got
        sent = submitted.pop(v.round, None)
        if sent is not None:
            rtt = env.t_recv - sent
            w = self.config.rtt_weight
            self.predicted_rtt = rtt if self.predicted_rtt is None else w * rtt + (1 - w) * self.predicted_rtt
        if isinstance(v, PicoVerdict):
            edge.note_round(v.round, "t_verify_early", v.t_verify_early)
            edge.note_round(v.round, "early_tokens", v.early_tokens)
        edge.note_round(v.round, "correction", "bonus" if v.n_accepted == v.n_verified else
                        "resampled" if v.token is None else "cloud")
        beyond = edge.speculative[v.n_verified:]
        rejected = edge.speculative[v.n_accepted].token if v.n_accepted < v.n_verified else None
        window_before = edge.window

        def outcome() -> dict:
            """What the verdict did, read as its round is recorded (the edge has applied it)."""
            token = edge.drafter.committed_tokens()[v.base + v.n_accepted]  # the verdict's own token
            out = {}
            if rejected is not None and v.token is None:  # the edge's own correction vs the rejected draft
                out.update(rejected_draft=rejected, resampled_token=token)
            if beyond:
                kept = edge.window == window_before
                out["predraft"] = {"tokens": len(beyond), "kept": kept, "discarded": 0 if kept else len(beyond),
                                   "first": beyond[0].token, "verdict_token": token}
            return out

        notes.expect(v.round, outcome)
        edge.apply(v, env)
        return rnd if edge.window == window_before else _Round()


@dataclass
class _Early:
    """Tokens of a session scored before their round's verification request (Pre-Verify)."""

    round: int | None = None  # None: only a correction was evaluated
    tokens: list[int] = field(default_factory=list)
    rows: np.ndarray | None = None  # len(tokens) + 1 rows, when tokens were scored
    seconds: float = 0.0


class PicoSpecCloud(VerifyingCloud):
    """PicoSpec's cloud: one job at a time; with fast verification it scores a round's
    tokens as they arrive whenever it is idle, and verifies the rest on request."""

    config: PicoSpecConfig

    def __init__(self, config: PicoSpecConfig):
        super().__init__(config)
        self._early: dict[str, _Early] = {}
        self._first: dict[tuple[str, int], float] = {}  # (session, round) -> its first upload's arrival
        self._gap: dict[str, float] = {}  # session -> first upload to verification request, seconds
        self._pass_s: float | None = None  # the duration of a forward pass here, seconds

    async def handle(self, env) -> None:
        await super().handle(env)
        msg = env.msg
        if isinstance(msg, CloseSession):
            self._early.pop(msg.session, None)
            self._gap.pop(msg.session, None)
            for key in [k for k in self._first if k[0] == msg.session]:
                del self._first[key]
        if isinstance(msg, Upload) and not msg.probe:
            self._first.setdefault((msg.session, msg.round), env.t_recv)
        if (self.config.fast_verify and isinstance(msg, Upload) and not msg.probe and not msg.verify
                and msg.session in self.sessions
                and not any(j.kind == "preverify" and j.session == msg.session for j in self.jobs)):
            self._enqueue(Job("preverify", msg.session, msg.round, t_arrived=env.t_recv))

    async def run_batch(self, batch) -> None:
        for job in batch:
            if job.kind == "preverify":
                await self._preverify(job)
            elif job.kind == "verify":
                await self._verify(job)
            else:
                await super().run_batch([job])

    async def _preverify(self, job: Job) -> None:
        sess = self.sessions.get(job.session)
        if sess is None:
            return
        early = self._early.get(sess.name)
        appended = 0
        if early is None:
            pos = len(sess.tokens)
            while pos in sess.buffer and sess.buffer[pos].fixed:  # a correction the edge resampled
                entry = sess.buffer.pop(pos)
                sess.verifier.append([entry.token])
                sess.tokens.append(entry.token)
                pos, appended = pos + 1, appended + 1
            early = _Early()
        pos = len(sess.tokens) + len(early.tokens)
        entries = []
        while pos + len(entries) in sess.buffer:
            e = sess.buffer[pos + len(entries)]
            if e.fixed or e.round in sess.dead or (early.round is not None and e.round != early.round):
                break
            if entries and e.round != entries[0].round:
                break
            entries.append(e)
        if not entries and not appended:
            return
        if not self._in_time(sess.name, entries[0].round if entries else job.round):
            return  # the tokens are scored with the verification request instead
        tokens = [e.token for e in entries]
        session = sess.verifier.session
        op = Op("verify", len(tokens) + appended, len(sess.tokens), sessions=(sess.name,))
        t0 = self.ctx.clock.now()
        if tokens:
            rows = await self.ctx.compute.run(op, lambda: session.score(tokens))
            early.rows = rows if early.rows is None else np.concatenate([early.rows[:-1], rows])
            early.round = entries[0].round
            early.tokens += tokens
        else:
            await self.ctx.compute.run(op, session.next_logits)
        early.seconds += self._timed(t0)
        if sess.name in self.sessions:
            self._early[sess.name] = early

    def _in_time(self, session: str, round_id: int) -> bool:
        """An early pass is worth starting only if it should end before the round's
        verification request arrives (predicted from this session's past rounds and the
        passes so far); otherwise it would delay that request's own pass."""
        first, gap = self._first.get((session, round_id)), self._gap.get(session)
        if first is None or gap is None or self._pass_s is None:
            return False
        return self.ctx.clock.now() + self._pass_s <= first + gap

    def _timed(self, t0: float) -> float:
        """Seconds since ``t0``, a forward pass's duration, kept for :meth:`_in_time`."""
        seconds = self.ctx.clock.now() - t0
        self._pass_s = seconds if self._pass_s is None else 0.5 * seconds + 0.5 * self._pass_s
        return seconds

    def _usable(self, sess: CloudSession, job: Job, early: _Early) -> bool:
        base = len(sess.tokens)
        if early.round != job.round or job.round in sess.dead or base + len(early.tokens) > job.end:
            return False
        for i, tok in enumerate(early.tokens):
            e = sess.buffer.get(base + i)
            if e is None or e.token != tok or e.round != job.round or e.fixed:
                return False
        return True

    async def _verify(self, job: Job) -> None:
        sess = self.sessions.get(job.session)
        if sess is None:
            return
        early = self._early.pop(sess.name, None)
        if (first := self._first.pop((sess.name, job.round), None)) is not None:
            gap = job.t_arrived - first
            self._gap[sess.name] = gap if sess.name not in self._gap else 0.5 * gap + 0.5 * self._gap[sess.name]
        scored = early is not None and bool(early.tokens)
        if scored and not self._usable(sess, job, early):
            sess.verifier.session.rollback(len(sess.tokens))  # scored for a round now void
            scored = False
        mine = early is not None and early.round in (None, job.round) and (scored or not early.tokens)
        block = self._block(sess, job)
        base = len(sess.tokens)
        if block is None:
            if scored:
                sess.verifier.session.rollback(base)
            await self._send(sess, job, PicoVerdict(sess.name, job.round, base, 0, 0, None, stale=True,
                                                    committed=base, t_arrived=job.t_arrived))
            return
        tokens, q_token, q_rows = block
        t0 = self.ctx.clock.now()
        if scored:
            rest = tokens[len(early.tokens):]
            if rest:
                op = Op("verify", len(rest), base + len(early.tokens), sessions=(sess.name,))
                more = await self.ctx.compute.run(op, lambda: sess.verifier.session.score(rest))
                self._timed(t0)
                rows = np.concatenate([early.rows[:-1], more])
            else:
                rows = early.rows
            out = sess.verifier.decide(base, tokens, rows, q_token, q_rows)
        else:
            op = Op("verify", len(tokens), base, sessions=(sess.name,))
            if tokens:
                (out,) = await self.ctx.compute.run(
                    op, lambda: verify_batch([(sess.verifier, tokens, q_token, q_rows)]))
                self._timed(t0)
            else:  # only the verdict's own token: the context may be scored already (a correction)
                row = await self.ctx.compute.run(op, sess.verifier.session.next_logits)
                self._timed(t0)
                out = sess.verifier.decide(base, tokens, row[None, :], q_token, q_rows)
        t_verify = self.ctx.clock.now() - t0
        self._commit(sess, job, base, tokens, out)
        await self._send(sess, job, PicoVerdict(
            sess.name, job.round, base, len(tokens), out.n_accepted, out.token,
            list(out.topk_ids), list(out.topk_probs), committed=len(sess.tokens),
            digest=sess.verifier.digest(), t_arrived=job.t_arrived,
            t_queue=t0 - job.t_arrived, t_verify=t_verify, batch_size=1,
            t_verify_early=early.seconds if mine else 0.0,
            early_tokens=len(early.tokens) if mine and scored else 0))
