"""Shared mechanics of plug-ins: the speculative edge session, the verifying server, and the
receipt of a token stream the cloud decodes alone.

These are not algorithms; they are the bookkeeping every system needs and must get right
identically: which tokens are committed, which speculative tokens survive a verdict,
what crossed the link, and the round records. A plug-in decides *when* to draft, upload,
verify and (in the cloud) what to verify next; it calls these helpers to do it.

Speculation beyond a pending verification (PipeSD's proactive tokens, PicoSpec's
pre-drafts) follows one rule on both sides: tokens drafted on top of a pending window
survive its verdict only if the verdict's token equals the first of them. Uploads name the
window they were drafted on top of (``parent``), so the cloud drops them when it does not.
"""

from __future__ import annotations

import asyncio
import math
import operator
from abc import abstractmethod
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import numpy as np

from systems.api import (
    CloudContext,
    CloudPolicy,
    DraftToken,
    EdgeContext,
    Envelope,
    GenerationRequest,
    Op,
    Verifier,
    prefix_digest,
)
from systems.engines.base import EngineError
from systems.messages import Ack, CloseSession, Failure, Generate, OpenSession, TokenOut, Upload, Verdict
from systems.records import BatchRecord, RoundRecord
from systems.sampling import Outcome, SamplingParams, resample_sparse, softmax


class ProtocolError(RuntimeError):
    """Edge and cloud disagree about the committed prefix, or a message is out of order."""


class SessionError(ProtocolError):
    """A message the cloud cannot serve (a session it does not hold, ids outside the vocabulary,
    positions or shapes out of range, no room left): the cloud fails that session, answers it
    with a :class:`Failure`, and keeps serving the others."""


class CloudRefused(ProtocolError):
    """The cloud failed this edge's session (:class:`Failure`); the message is its reason."""


async def receive_token(ctx: EdgeContext, request: GenerationRequest, output: list[int], start: float,
                        bytes_up: int, stream: str, extra: dict | None = None) -> TokenOut:
    """Receive the next token of a stream the cloud decodes (cloud-only, split inference):
    check its order, append it to ``output``, emit it and record its round (one token, from
    ``start``, with ``bytes_up`` the edge sent for it). ``stream`` names it in errors."""
    env = await ctx.link.recv()
    msg = env.msg
    if not isinstance(msg, TokenOut) or msg.index != len(output):
        raise ProtocolError(f"{stream} stream out of order: {msg!r}")
    output.append(msg.token)
    ctx.recorder.emit([msg.token])
    ctx.recorder.round(RoundRecord(
        request_id=request.request_id, round=msg.index, start=start, end=ctx.clock.now(), emitted=1,
        bytes_up=bytes_up, bytes_down=env.nbytes, t_verify=msg.t_compute,
        t_downlink=env.t_recv - env.t_sent, committed=len(request.prompt) + len(output), extra=extra or {}))
    return msg


UPLINK_Q = ("rule", "full")
VERIFICATION = ("full", "sparse")


def choose_rule(params: SamplingParams, verification: str) -> str:
    """The acceptance rule for a sampling setting and a plug-in's verification mode.

    ``verification`` is "full" (full draft distributions travel; rejection sampling) or
    "sparse" (ids and q(x) scalars up, top-K down). Greedy decoding uses the greedy rule in
    either case, since token ids are all it needs.
    """
    if verification not in VERIFICATION:
        raise ValueError(f"verification must be 'full' or 'sparse', got {verification!r}")
    if params.greedy:
        return "greedy"
    return "rejection" if verification == "full" else "sparse"


@dataclass
class _Window:
    start: float | None = None
    drafted: int = 0
    uploaded: int = 0
    n_uploads: int = 0
    bytes_up: int = 0
    t_draft: float = 0.0
    t_last_sent: float | None = None
    t_first_sent: float | None = None
    t_last_draft: float | None = None
    upload_sizes: list[int] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


class SpeculativeEdge:
    """Edge-side session for one request: drafting, uploads, verdicts, emission, records.

    ``uplink_q`` says what travels with each draft token: "rule" what the acceptance rule
    needs (ids under greedy, q(x) under the sparse rule, full rows under rejection), "full"
    the draft's full distribution always (as PipeSD and its baselines send it, greedy
    included: the rows are then the softmax at temperature 1). ``q_dtype`` (optional) sets
    the precision draft distributions are drawn and sent in. ``lead_row`` False sends the
    first token drafted beyond a window awaiting its verdict as an id only
    (:attr:`lead_pending`), as PipeSD's code does.

    An upload is built (:meth:`prepare`, which settles which tokens and window it carries)
    and sent (:meth:`send`) separately, so a policy may queue prepared uploads for a
    sender task of its own while it keeps drafting; :meth:`upload` does both at once.
    """

    def __init__(self, ctx: EdgeContext, request: GenerationRequest, rule: str, sparse_k: int = 10,
                 uplink_q: str = "rule", q_dtype: str | None = None, lead_row: bool = True):
        if ctx.drafter is None or ctx.link is None:
            raise ValueError("a speculative edge needs a drafter and a link")
        if uplink_q not in UPLINK_Q:
            raise ValueError(f"uplink_q must be one of {', '.join(UPLINK_Q)}, got {uplink_q!r}")
        self.ctx, self.request, self.rule, self.sparse_k = ctx, request, rule, sparse_k
        self.uplink_q = uplink_q
        self.lead_row = lead_row
        if q_dtype is not None:
            ctx.drafter.q_dtype = np.dtype(q_dtype)
        self.drafter = ctx.drafter
        self.output: list[int] = []
        self.done = False
        self.window = 0  # the verification window being drafted
        self._windows: dict[int, _Window] = {0: _Window()}
        self._in_flight: list[int] = []  # windows sent for verification, verdict pending
        self._dead: set[int] = set()
        self._fixed: list[int] = []  # decided tokens the cloud has not been told yet
        self._sent_upto = 0  # absolute position after the last uploaded draft token
        self._in_window = 0  # tokens uploaded in the open window
        self._lead_sent = False  # the open window's first upload carried its lead as an id only
        self._inbox: asyncio.Queue[Envelope] = asyncio.Queue()
        self._acks: asyncio.Queue[Envelope] = asyncio.Queue()
        self.failure: str | None = None  # the cloud's reason, once it failed this session
        self._reader: asyncio.Task | None = None
        stops = set(request.stop_ids) | set(self.drafter.engine.eos_token_ids)
        self._stops = frozenset(stops)

    # ---- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        req, p = self.request, self.request.sampling
        msg = OpenSession(self.ctx.session, list(req.prompt), p.temperature, p.top_k, p.top_p,
                          self.rule, self.sparse_k, req.seed)
        await self.ctx.link.send(msg)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.drafter.start(req.prompt)
        self._sent_upto = self.drafter.position
        await self.ctx.compute.run(Op("prefill", len(req.prompt), 0), self.drafter.prefill)

    async def close(self) -> None:
        # Windows still awaiting verdicts (speculation past the end) are answered but unused.
        while self._in_flight and self.failure is None:
            env = await self._next_envelope()
            self._in_flight.pop(0)
            self._record(env.msg, env, [], discarded=True)
        await self.ctx.link.send(CloseSession(self.ctx.session))
        if self._reader:
            self._reader.cancel()
        self.drafter.close()

    async def _read(self) -> None:
        while True:
            try:
                env = await self.ctx.link.recv()
            except Exception as exc:  # noqa: BLE001 - the link is gone (the cloud died): as a Failure, so
                # that whoever waits for a verdict or an ack is told, and close() waits for none
                now = self.ctx.clock.now()
                env = Envelope(Failure(self.ctx.session, f"the link failed: {type(exc).__name__}: {exc}"), 0, now, now)
            if isinstance(env.msg, Failure):  # whoever waits, for an ack or a verdict, learns of it
                self.failure = env.msg.reason
                await self._acks.put(env)
                await self._inbox.put(env)
                return
            await (self._acks if isinstance(env.msg, Ack) else self._inbox).put(env)

    async def next_ack(self) -> Envelope:
        """The next :class:`Ack` (uploads prepared with ``ack=True`` are answered in order)."""
        return _refused(await self._acks.get())

    async def _next_envelope(self) -> Envelope:
        return _refused(await self._inbox.get())

    # ---- drafting and uploads ------------------------------------------------------------
    @property
    def remaining(self) -> int:
        """Tokens still allowed in the output."""
        return self.request.max_new_tokens - len(self.output)

    @property
    def speculative(self) -> list[DraftToken]:
        """Drafted tokens not yet settled by a verdict."""
        return self.drafter.pending

    @property
    def drafted_upto(self) -> int:
        """Absolute position after the last drafted token (committed + speculative)."""
        # Not the session length: a draft running on another thread extends the session
        # before its token joins ``pending``.
        return self.drafter.committed + len(self.drafter.pending)

    @property
    def unsent(self) -> int:
        """Drafted tokens not yet put into an upload."""
        return self.drafted_upto - self._sent_upto

    @property
    def awaiting(self) -> list[int]:
        """Windows sent for verification whose verdict is pending and still matters."""
        return [r for r in self._in_flight if r not in self._dead]

    @property
    def draft_room(self) -> int:
        """Tokens that may still be drafted: the output's room left beyond the speculative
        tokens and the one a verdict adds of its own; 0 once a stop token is drafted."""
        spec = self.drafter.pending
        if spec and self.is_stop(spec[-1].token):
            return 0
        return max(0, self.remaining - 1 - len(spec))

    @property
    def correction_unsent(self) -> bool:
        """A correction the edge resampled is decided but not uploaded yet (it goes up as a
        fixed token with the next upload)."""
        return bool(self._fixed)

    @property
    def window_size(self) -> int:
        """Draft tokens in the open window (uploaded or not)."""
        return self._in_window + self.unsent

    @property
    def lead_pending(self) -> bool:
        """The open window's first token is drafted, not uploaded yet, and directly follows a
        window still awaiting its verdict, with ``lead_row`` off. That verdict settles it: it
        commits it as its own token, or the discard voids it. So it goes up as an id only,
        and a trigger should not count it as a draft the cloud verifies."""
        return (not self.lead_row and self._in_window == 0 and self.unsent > 0 and not self._fixed
                and bool(self.awaiting))

    @property
    def drafted_lead(self) -> bool:
        """The token just drafted is the open window's lead (see :attr:`lead_pending`): a
        trigger skips it."""
        return self.lead_pending and self.window_size == 1

    @property
    def window_drafts(self) -> int:
        """Draft tokens of the open window the cloud verifies: :attr:`window_size` less a
        lead token that goes up as an id only."""
        return self.window_size - (self._lead_sent or self.lead_pending)

    def is_stop(self, token: int) -> bool:
        return token in self._stops

    async def draft(self) -> DraftToken:
        """Draft one token on the edge device, charged to the current window."""
        w = self._windows[self.window]
        t0 = self.ctx.clock.now()
        if w.start is None:
            w.start = t0
        d = await self.ctx.compute.run(Op("draft", 1, self.drafter.position), self.drafter.draft)
        w = self._windows[self.window]  # a verdict may have restarted the window meanwhile
        w.drafted += 1
        w.t_draft += self.ctx.clock.now() - t0
        w.t_last_draft = self.ctx.clock.now()
        return d

    def note(self, key: str, value) -> None:
        """Attach a policy's figure to the open window's round record (``extra``)."""
        self._windows[self.window].notes[key] = value

    def note_round(self, round_id: int, key: str, value) -> None:
        """Attach a figure to the record of window ``round_id`` (if not recorded yet)."""
        if round_id in self._windows:
            self._windows[round_id].notes[key] = value

    async def upload(self, n: int | None = None, verify: bool = False) -> int:
        """Upload the next ``n`` drafted tokens (all unsent by default); returns bytes sent.

        With ``verify`` the cloud verifies everything of this window it holds; the window is
        closed and later drafting belongs to the next one.
        """
        return await self.send(self.prepare(n, verify))

    def prepare(self, n: int | None = None, verify: bool = False, ack: bool = False) -> Upload:
        """Build the upload of the next ``n`` drafted tokens (all by default) and book them
        as sent; with ``verify`` the window closes here. Send it with :meth:`send`."""
        n = self.unsent if n is None else n
        if n < 0 or n > self.unsent:
            raise ValueError(f"cannot upload {n} tokens: {self.unsent} drafted and unsent")
        offset = self._sent_upto - self.drafter.committed
        drafts = self.drafter.pending[offset : offset + n]
        fixed, self._fixed = self._fixed, []
        due = self.request.deadline(len(self.output)) if verify else None
        msg = Upload(
            self.ctx.session,
            round=self.window,
            start=self._sent_upto - len(fixed),
            tokens=fixed + [d.token for d in drafts],
            parent=self.awaiting[-1] if self.awaiting else -1,
            n_fixed=len(fixed),
            verify=verify,
            ack=ack,
            slack=None if due is None else due - self.ctx.clock.now(),
        )
        lead = bool(drafts) and not fixed and self.lead_pending
        self._lead_sent |= lead
        if self.rule == "rejection" or self.uplink_q == "full":
            rows = drafts[1:] if lead else drafts
            msg.lead_implied = lead
            msg.q_rows = np.stack([self._q_row(d) for d in rows]) if rows else None
        if self.rule == "sparse":
            # The sparse rule reads q(x), whatever else travels (full rows under uplink_q=full).
            msg.q_token = [d.q_token for d in drafts]
        self._sent_upto += n
        self._in_window += n
        w = self._windows[self.window]
        if w.start is None:
            w.start = self.ctx.clock.now()
        if lead:
            w.notes["lead_implied"] = True  # its first token is a guess the pending verdict settles
        w.uploaded += n
        w.upload_sizes.append(n)
        if verify:
            self._in_flight.append(self.window)
            self.window += 1
            self._windows[self.window] = _Window()
            self._in_window, self._lead_sent = 0, False
        return msg

    def _q_row(self, d: DraftToken) -> np.ndarray:
        q = d.q if d.q is not None else softmax(d.logits)
        return q.astype(self.drafter.q_dtype)

    def is_void(self, msg: Upload) -> bool:
        """True when a verdict has discarded the window a prepared upload belongs to."""
        return msg.round in self._dead or msg.round not in self._windows

    def discard(self, msg: Upload) -> None:
        """Drop a void prepared upload unsent; a verification it asked for is never answered."""
        if msg.verify and msg.round in self._in_flight:
            self._in_flight.remove(msg.round)
            self._record(None, None, [], discarded=True, round_id=msg.round)

    async def send(self, msg: Upload) -> int:
        """Send a prepared upload; returns its size in bytes."""
        nbytes = await self.ctx.link.send(msg)
        w = self._windows.get(msg.round)
        if w is not None:
            now = self.ctx.clock.now()
            w.n_uploads += 1
            w.bytes_up += nbytes
            w.t_last_sent = now
            if w.t_first_sent is None:
                w.t_first_sent = now
        return nbytes

    # ---- verdicts --------------------------------------------------------------------------
    def poll_verdict(self) -> tuple[Verdict, Envelope] | None:
        """The next verdict for a live window if one has arrived, else None (never waits);
        stale answers met on the way are recorded."""
        while self.awaiting and not self._inbox.empty():
            env = self._inbox.get_nowait()
            if (got := self._take(env)) is not None:
                return got
        return None

    async def next_verdict(self) -> tuple[Verdict, Envelope]:
        """The next verdict for a live window; stale answers for discarded ones are recorded."""
        if not self.awaiting:
            raise ProtocolError("no verification is pending: upload with verify=True first")
        while True:
            if (got := self._take(await self._next_envelope())) is not None:
                return got

    def _take(self, env: Envelope) -> tuple[Verdict, Envelope] | None:
        v = env.msg
        if not isinstance(v, Verdict):
            raise ProtocolError(f"expected a verdict, got {type(v).__name__}")
        if not self._in_flight or v.round != self._in_flight[0]:
            raise ProtocolError(f"verdict for window {v.round}, expected {self._in_flight[:1]}")
        self._in_flight.pop(0)
        if v.round in self._dead or v.stale:
            self._record(v, env, [], discarded=True)
            return None
        return v, env

    def apply(self, v: Verdict, env: Envelope) -> list[int]:
        """Commit a verdict: emit its tokens, settle speculation, check agreement, record."""
        token, resampled = v.token, False
        if token is None:  # sparse rule, rejection: resample the correction here
            q_row = self.drafter.pending[v.n_accepted].q
            token = resample_sparse(v.topk_ids, v.topk_probs, q_row, self.ctx.rng)
            resampled = True
        accepted = [d.token for d in self.drafter.pending[: v.n_accepted]]
        judged = self.drafter.pending[: v.n_verified]
        _draft_stats(judged)
        stats = ([round(d.confidence, 6) for d in judged], [round(d.entropy, 5) for d in judged])
        # A correction the edge resampled is unknown to the cloud, which has dropped what was
        # drafted beyond it; so must the edge. The correction goes up as a fixed token.
        survive = self.drafter.apply(v.base, v.n_accepted, token, keep_speculation=not resampled)
        if resampled:
            self._fixed = [token]
        if not survive:
            self._dead.update(self._in_flight)
            self._sent_upto = self.drafted_upto
            self._restart_window()
        elif self._sent_upto < self.drafter.committed:
            # A drafted token never uploaded was the verdict's own token: the cloud has it.
            self._sent_upto = self.drafter.committed
        emitted = []
        for t in accepted + [token]:
            if self.done:
                break
            emitted.append(t)
            self.output.append(t)
            if self.is_stop(t) or len(self.output) >= self.request.max_new_tokens:
                self.done = True
        self.ctx.recorder.emit(emitted)
        edge_digest = prefix_digest(self.drafter.committed_tokens()[: v.committed])
        self._record(v, env, emitted, edge_digest=edge_digest, stats=stats)
        if v.digest and edge_digest != v.digest:
            raise ProtocolError(
                f"edge and cloud disagree on the committed prefix after window {v.round} "
                f"(edge {edge_digest}, cloud {v.digest})"
            )
        return emitted

    def _restart_window(self) -> None:
        """After a discard the open window's uploads are void at the cloud: continue in a
        fresh window id, carrying the work already spent (it shows up as waste)."""
        old = self._windows.pop(self.window)
        self.window += 1
        self._windows[self.window] = _Window(old.start, old.drafted, 0, old.n_uploads, old.bytes_up, old.t_draft,
                                             notes={"restarted_from": old.upload_sizes} if old.upload_sizes else {})
        self._in_window, self._lead_sent = 0, False

    def _record(self, v: Verdict | None, env: Envelope | None, emitted: Sequence[int], edge_digest: str = "",
                discarded: bool = False, round_id: int | None = None,
                stats: tuple[list[float], list[float]] = ([], [])) -> None:
        """Record a window's round; ``v`` None: a window discarded before it was sent.
        ``stats``: the draft's confidence and entropy at each verified token."""
        round_id = v.round if v is not None else round_id
        w = self._windows.pop(round_id)
        now = self.ctx.clock.now()
        if v is None:
            v = Verdict(self.ctx.session, round_id, 0, 0, 0, None, t_queue=None, t_verify=None)
        accepted = 0 if discarded else v.n_accepted
        self.ctx.recorder.round(RoundRecord(
            request_id=self.request.request_id,
            round=v.round,
            start=w.start if w.start is not None else now,
            end=now,
            drafted=w.drafted,
            uploaded=w.uploaded,
            verified=0 if discarded else v.n_verified,
            accepted=accepted,
            emitted=len(emitted),
            wasted=w.drafted - accepted,
            n_uploads=w.n_uploads,
            bytes_up=w.bytes_up,
            bytes_down=env.nbytes if env else 0,
            t_draft=w.t_draft,
            t_uplink=(v.t_arrived - w.t_last_sent) if w.t_last_sent is not None and v.t_arrived else None,
            t_queue=v.t_queue,
            t_verify=v.t_verify,
            t_downlink=env.t_recv - env.t_sent if env else None,
            batch_size=v.batch_size,
            committed=self.drafter.committed,
            edge_digest=edge_digest,
            cloud_digest="" if discarded else v.digest,  # an unused answer: nothing to agree on
            extra=self._extra(w, discarded),
            draft_conf=stats[0],
            draft_entropy=stats[1],
        ))

    @staticmethod
    def _extra(w: _Window, discarded: bool) -> dict:
        extra = dict(w.notes)
        if discarded:
            extra["discarded"] = True
        if len(w.upload_sizes) > 1:  # the window went up in several batches: their sizes and timing
            extra.update(upload_sizes=w.upload_sizes, t_first_upload=w.t_first_sent, t_last_draft=w.t_last_draft)
        return extra


def _draft_stats(judged: Sequence[DraftToken]) -> None:
    """Work out the confidence and entropy of a verdict's judged draft tokens in one go (a
    block of rows, not a dozen numpy calls a token): the arithmetic of
    :func:`systems.sampling.confidence` and :func:`systems.sampling.entropy`, row-wise, so each
    token gets the figures its own row gives it. Tokens that have them already are left."""
    todo = [d for d in judged if d._confidence is None and d._entropy is None]
    if len(todo) < 2:
        return
    z = np.array([d.logits for d in todo], dtype=np.float64)
    if z.ndim != 2 or not np.isfinite(z).all():
        return  # masked tokens: each row on its own, as the properties do it
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1)
    conf = (1.0 / total).tolist()
    ent = (np.log(total) - (e * z).sum(axis=1) / total).tolist()
    for d, c, h in zip(todo, conf, ent):
        d._confidence, d._entropy = c, h


def is_int(value) -> bool:
    """True for an integer that is not a bool (what a count or a position on the wire must be)."""
    return isinstance(value, int) and not isinstance(value, bool)


_WIRE_TYPES = {
    "int": is_int,
    "float": lambda v: is_int(v) or isinstance(v, float),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "np.ndarray": lambda v: isinstance(v, np.ndarray),
}


def _conforms(value, annotation: str) -> bool:
    for alt in (a.strip() for a in annotation.split("|")):
        if alt.startswith("list[") and alt.endswith("]"):
            if isinstance(value, (list, tuple)) and all(_conforms(v, alt[5:-1]) for v in value):
                return True
        elif _WIRE_TYPES.get(alt, lambda v: True)(value):  # a type not listed here is not checked
            return True
    return False


# The exact types every value of a wire type is (a list of them passes without a check per item).
_PLAIN_TYPES = {"int": {int}, "float": {int, float}, "bool": {bool}, "str": {str}, "None": {type(None)}}


def _checker(annotation: str):
    """:func:`_conforms` for one annotation, worked out once: a function of the value, or None
    where every value conforms (an alternative whose type is not checked)."""
    alts = []
    for alt in (a.strip() for a in annotation.split("|")):
        if alt.startswith("list[") and alt.endswith("]"):
            alts.append(_list_checker(alt[5:-1]))
        elif alt in _WIRE_TYPES:
            alts.append(_WIRE_TYPES[alt])
        else:
            return None
    if len(alts) == 1:
        return alts[0]
    return lambda v: any(check(v) for check in alts)


def _list_checker(item: str):
    check = _checker(item)
    plain = _PLAIN_TYPES.get(item.strip())
    if check is None:
        return lambda v: isinstance(v, (list, tuple))

    def conforms(v) -> bool:
        if not isinstance(v, (list, tuple)):
            return False
        # a list of plain ints (or floats...) is the common case: its items' types at C speed
        return (plain is not None and set(map(type, v)) <= plain) or all(check(x) for x in v)
    return conforms


_FIELD_CHECKS: dict[type, tuple] = {}


def _field_checks(cls: type) -> tuple:
    """``(name, annotation, checker)`` for each field of a message class whose type is checked."""
    checks = _FIELD_CHECKS.get(cls)
    if checks is None:
        checks = tuple((f.name, f.type, check) for f in fields(cls)
                       if isinstance(f.type, str) and (check := _checker(f.type)) is not None)
        _FIELD_CHECKS[cls] = checks
    return checks


def check_fields(msg) -> None:
    """Raise :class:`SessionError` naming the first field of ``msg`` that does not hold a value
    of its declared type (the wire carries any value in any field: a client may send a string
    for a position, or None for a token list). The verdict is :func:`_conforms`'s, with each
    message class's checks worked out once."""
    for name, annotation, check in _field_checks(type(msg)):
        value = getattr(msg, name)
        if not check(value):
            raise SessionError(f"{type(msg).__name__}.{name} must be {annotation}, got {type(value).__name__}")


def check_ids(tokens, vocab: int, what: str) -> None:
    """Raise :class:`SessionError` unless ``tokens`` is a list of integer ids in [0, vocab)."""
    if not isinstance(tokens, (list, tuple)) or any(not is_int(t) or not 0 <= t < vocab for t in tokens):
        raise SessionError(f"{what}: token ids must be integers in [0, {vocab})")


def check_prompt(prompt, engine) -> None:
    """Raise :class:`SessionError` unless ``prompt`` is a non-empty list of ids of ``engine``'s
    vocabulary that leaves room in its context for at least one more token."""
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise SessionError("an empty prompt")
    check_ids(prompt, engine.info.vocab_size, "prompt")
    n_ctx = engine.info.n_ctx
    if len(prompt) >= n_ctx:
        raise SessionError(f"a prompt of {len(prompt)} tokens leaves no room in the context of {n_ctx}")


def check_sampling(temperature, top_k, top_p, seed) -> SamplingParams:
    """The sampling settings of an edge's first message, or :class:`SessionError` naming what is
    wrong (a temperature that is not finite, a negative seed, settings out of range). Their
    types were checked with the message's fields (:func:`check_fields`)."""
    if not math.isfinite(temperature):
        raise SessionError(f"temperature must be finite, got {temperature}")
    if seed < 0:
        raise SessionError(f"seed must be an integer >= 0, got {seed!r}")
    try:
        return SamplingParams(float(temperature), top_k, float(top_p))
    except ValueError as exc:
        raise SessionError(str(exc)) from None


def check_message(msg, sessions: dict, engine) -> None:
    """Raise :class:`SessionError` (one line) for an edge's message a verifier cannot serve:
    before it touches a model, its session must be open (or, for an :class:`OpenSession`, not
    yet), its token ids inside the vocabulary, its positions and counts in range and inside the
    context, and its draft data shaped as the tokens it travels with."""
    vocab, n_ctx = engine.info.vocab_size, engine.info.n_ctx

    if isinstance(msg, OpenSession):
        if msg.session in sessions:
            raise SessionError(f"session {msg.session!r} is already open")
        check_prompt(msg.prompt, engine)
        if not msg.sparse_k >= 1:
            raise SessionError(f"sparse_k must be >= 1, got {msg.sparse_k}")
    elif isinstance(msg, Upload) and not msg.probe:
        sess = sessions.get(msg.session)
        if sess is None:
            raise SessionError(f"upload for session {msg.session!r}, which is not open")
        if msg.start < 0 or not 0 <= msg.n_fixed <= len(msg.tokens):
            raise SessionError(f"upload positions out of range (start {msg.start}, n_fixed {msg.n_fixed}, "
                               f"{len(msg.tokens)} tokens)")
        check_ids(msg.tokens, vocab, "upload")
        if msg.start + len(msg.tokens) + 1 > n_ctx:
            raise SessionError(f"an upload reaching position {msg.start + len(msg.tokens)} is past the context "
                               f"of {n_ctx}")
        drafts = len(msg.tokens) - msg.n_fixed
        if msg.q_token is not None and len(msg.q_token) != drafts:
            raise SessionError(f"q_token holds {len(msg.q_token)} values for {drafts} draft tokens")
        if msg.q_rows is not None:
            rows = drafts - (1 if msg.lead_implied else 0)
            shape = getattr(msg.q_rows, "shape", ())
            if len(shape) != 2 or shape[0] != rows or shape[1] != vocab:
                raise SessionError(f"q_rows of shape {tuple(shape)} for {rows} draft rows of {vocab} tokens")
    elif not isinstance(msg, (Upload, CloseSession)):
        raise SessionError(f"unexpected message {type(msg).__name__} at the verifier")


def check_generation(msg, sessions: dict, engine, server: str) -> None:
    """Raise :class:`SessionError` (one line) for an edge's message a cloud that decodes each
    request alone (cloud-only, centralized) cannot serve: a :class:`Generate` for a session
    not yet open here, with a prompt of the vocabulary's ids that leaves room in the context,
    at least one new token, stop ids of the vocabulary and valid sampling settings; or a
    :class:`CloseSession` (of any session: closing one that is gone is harmless). ``server``
    names the cloud in the reason."""
    if isinstance(msg, CloseSession):
        return
    if not isinstance(msg, Generate):
        raise SessionError(f"unexpected message {type(msg).__name__} at {server}")
    if msg.session in sessions:
        raise SessionError(f"session {msg.session!r} is already open")
    check_prompt(msg.prompt, engine)
    if msg.max_new_tokens < 1:  # an int: its type was checked with the fields
        raise SessionError(f"max_new_tokens must be an integer >= 1, got {msg.max_new_tokens!r}")
    check_ids(msg.stop_ids, engine.info.vocab_size, "stop ids")
    check_sampling(msg.temperature, msg.top_k, msg.top_p, msg.seed)


def _refused(env: Envelope) -> Envelope:
    """``env``, unless it is the cloud's :class:`Failure` of the session: then raise it."""
    if isinstance(env.msg, Failure):
        raise CloudRefused(f"the cloud failed the session: {env.msg.reason}")
    return env


class SerialUploader:
    """The edge's communication interface: sends prepared uploads one at a time, each
    acknowledged by the cloud before the next one starts (a sender of blocking requests,
    as PipeSD's implementation has). An upload still queued when a verdict discards its
    window is dropped unsent, as such a sender cancels requests it has not started; one on
    the wire is not recalled. ``on_acked(msg, seconds)`` sees each sent upload's time from
    send to acknowledgement."""

    def __init__(self, edge: SpeculativeEdge, on_acked: Callable[[Upload, float], None] | None = None):
        self.edge, self.on_acked = edge, on_acked
        self.clock = edge.ctx.clock
        self.queue: asyncio.Queue[Upload] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def put(self, msg: Upload) -> None:
        """Queue an upload prepared with ``ack=True``."""
        if not msg.ack:
            raise ValueError("SerialUploader: prepare uploads with ack=True; the next one waits for the ack")
        self.queue.put_nowait(msg)

    async def _run(self) -> None:
        while True:
            msg = await self.queue.get()
            try:
                if self.edge.is_void(msg):
                    self.edge.discard(msg)
                    continue
                t0 = self.clock.now()
                await self.edge.send(msg)
                await self.edge.next_ack()
                if self.on_acked is not None:
                    self.on_acked(msg, self.clock.now() - t0)
            finally:
                self.queue.task_done()

    async def drain(self) -> None:
        """Wait until every queued upload is sent (or dropped); raises the sender's error."""
        join = asyncio.ensure_future(self.queue.join())
        done, _ = await asyncio.wait({join, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            join.cancel()
            self.task.result()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# ---- the cloud ---------------------------------------------------------------------------
def _verify_each(items: Sequence[tuple]) -> list:
    """:func:`systems.api.verify_batch`'s one forward pass over every member, each member's
    decision taken apart: one that raises (its own draft data or sampling settings: a q(x) of
    0, a distribution with no mass) gets its exception as its outcome, the others their
    :class:`Outcome`. So a bad member cannot fail the pass for the members batched with it."""
    engine = items[0][0].engine
    bases = [v.committed for v, *_ in items]
    rows = engine.score_batch([(v.session, block) for v, block, *_ in items])
    outcomes = []
    for (v, block, q_token, q_rows), base, r in zip(items, bases, rows):
        try:
            outcomes.append(v.decide(base, block, r, q_token, q_rows))
        except Exception as exc:  # noqa: BLE001 - handed to the worker, which fails that session
            outcomes.append(exc)
    return outcomes


SESSION_FAULTS = (SessionError, ValueError, EngineError)
"""What serving a message may raise that is its session's fault, not the server's."""


class GuardedCloud(CloudPolicy):
    """A cloud policy that keeps its sessions apart: each edge message is checked before it
    touches a model (its fields' types, :func:`check_fields`; then against its session,
    :meth:`check`), and one the cloud cannot serve fails that session alone (:meth:`fail`: its
    state dropped, a :class:`Failure` naming the reason sent to its edge); the rest of what a
    failed session has on the link is ignored up to its CloseSession, and the server and every
    other session are served on. A policy calls :meth:`begin` when it starts serving and
    :meth:`receive` for each message; it implements :meth:`check`, :meth:`handle` and :meth:`drop`.
    """

    def begin(self, ctx: CloudContext) -> None:
        """Start serving on ``ctx``, with no session failed yet."""
        self.ctx = ctx
        self.failed: set[str] = set()  # sessions the cloud failed (the reason went to their edge)

    @abstractmethod
    def check(self, msg) -> None:
        """Raise :class:`SessionError` for a message this cloud cannot serve."""

    @abstractmethod
    async def handle(self, env: Envelope) -> None:
        """Serve one message :meth:`check` passed."""

    @abstractmethod
    def drop(self, session: str) -> None:
        """Release what the cloud holds for ``session`` and its queued work (it failed)."""

    async def receive(self, env: Envelope) -> None:
        """Check and serve one message; a fault of its session fails that session only."""
        session = getattr(env.msg, "session", "")
        if session in self.failed:
            # The rest of what a failed session had on the link is dropped, up to its
            # CloseSession: then its name is free again (its Failure may never have reached an
            # edge that closed it first; a later session of that name must be served or failed).
            if isinstance(env.msg, CloseSession):
                self.failed.discard(session)
            return
        try:
            check_fields(env.msg)
            self.check(env.msg)
            await self.handle(env)
        except SESSION_FAULTS as exc:  # that session's fault, not the server's
            await self.fail(session, f"{type(exc).__name__}: {exc}")

    async def fail(self, session: str, reason: str) -> None:
        """Close ``session`` and its queued work, and tell its edge why (:class:`Failure`)."""
        self.failed.add(session)
        self.drop(session)
        try:
            await self.ctx.link.send(Failure(session, reason))
        except Exception:  # noqa: BLE001 - no route back (a session never opened): nobody to tell
            pass


@dataclass
class _Entry:
    token: int
    round: int
    fixed: bool
    q_token: float | None = None
    q_row: np.ndarray | None = None


@dataclass
class CloudSession:
    """Cloud state of one edge session: the verifier and the buffered uploads."""

    name: str
    verifier: Verifier
    tokens: list[int]  # committed sequence as the event loop knows it
    buffer: dict[int, _Entry] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)  # windows discarded
    killed: set[int] = field(default_factory=set)  # windows whose verdict voided what was drafted on top
    closed: bool = False


@dataclass
class Job:
    """Queued cloud work: a prefill or the verification of one window."""

    kind: str
    session: str
    round: int = -1
    end: int = 0
    t_arrived: float = 0.0
    deadline: float | None = None  # when the session's next token is due (its SLO), cloud clock


_JOB_SESSION = operator.attrgetter("session")


class VerifyingCloud(GuardedCloud):
    """Generic verification server: buffers uploads, verifies windows in arrival order.

    Scheduling is in :meth:`next_batch` (by default :meth:`take_batch`: one job at a time,
    first come first served). Batching or deadline-aware plug-ins override either; one that
    predicts a pass's time says so in :meth:`predict`, and may leave notes on the next batch
    record in :attr:`batch_notes`. Every verification pass is reported to the context's
    recorder as a :class:`BatchRecord`.
    """

    batch_notes: dict  # set per pass by a scheduler (see serve)

    async def serve(self, ctx: CloudContext) -> None:
        self.begin(ctx)
        self.sessions: dict[str, CloudSession] = {}
        self.jobs: list[Job] = []
        self.batch_notes = {}
        self._batches = 0
        self._in_pass: set[str] = set()  # sessions of the pass running now
        self._closing: list[CloudSession] = []  # closed while in that pass: their verifiers, released after it
        self._wake = asyncio.Event()
        worker = asyncio.get_running_loop().create_task(self._work())
        try:
            while True:
                # Wait on the worker too: an error in verification surfaces at once, not when
                # (if ever) the next message arrives (a stop-and-wait edge sends none).
                recv = asyncio.ensure_future(ctx.link.recv())
                await asyncio.wait({recv, worker}, return_when=asyncio.FIRST_COMPLETED)
                if worker.done():
                    recv.cancel()
                    worker.result()
                    raise ProtocolError("the verification worker stopped")
                await self.receive(recv.result())
        finally:
            worker.cancel()
            # Sessions whose CloseSession is still on the link when serving stops.
            for sess in self.sessions.values():
                sess.verifier.close()
            self.sessions.clear()

    def take_batch(self) -> list[Job]:
        """Pick the jobs for the next forward pass; default FCFS, one job."""
        return [self.jobs.pop(0)]

    async def next_batch(self) -> list[Job]:
        """Wait for and pick the next forward pass's jobs (called with at least one queued);
        a policy that holds jobs back for a batching window overrides this."""
        return self.take_batch()

    def after_batch(self, record: BatchRecord, outcomes: Sequence) -> None:
        """Called after each verification pass with its record and the members' outcomes
        (:class:`systems.sampling.Outcome`), for a policy that learns from them."""

    def predict(self, members: Sequence[tuple[int, int]]) -> float | None:
        """Seconds a verification pass over ``members`` ((new tokens, cached context) each)
        is expected to take; None: this policy makes no prediction."""
        return None

    # ---- arrivals (event loop only: never touches the model) ----------------------------
    async def handle(self, env: Envelope) -> None:
        msg = env.msg
        if isinstance(msg, Upload) and msg.probe:
            await self.ctx.link.send(Ack(msg.session, msg.round, len(msg.tokens), probe=True))
        elif isinstance(msg, OpenSession):
            params = SamplingParams(msg.temperature, msg.top_k, msg.top_p)
            verifier = Verifier(self.ctx.engine, params, np.random.default_rng(msg.seed + 1), msg.rule, msg.sparse_k)
            verifier.start(msg.prompt)
            self.sessions[msg.session] = CloudSession(msg.session, verifier, list(msg.prompt))
            self._enqueue(Job("prefill", msg.session, t_arrived=env.t_recv))
        elif isinstance(msg, Upload):
            self._buffer(self.sessions[msg.session], msg)
            if msg.ack:
                await self.ctx.link.send(Ack(msg.session, msg.round, len(msg.tokens)))
            if msg.verify:
                deadline = None if msg.slack is None else env.t_sent + msg.slack
                self._enqueue(Job("verify", msg.session, msg.round, msg.start + len(msg.tokens), env.t_recv,
                                  deadline))
        elif isinstance(msg, CloseSession):
            self.drop(msg.session)
        else:
            raise ProtocolError(f"unexpected message {type(msg).__name__} at the verifier")

    def check(self, msg) -> None:
        check_message(msg, self.sessions, self.ctx.engine)

    def drop(self, session: str) -> None:
        sess = self.sessions.pop(session, None)
        if sess is not None:
            sess.closed = True
            if session in self._in_pass:
                self._closing.append(sess)  # its verifier is in the running pass: released after it
            else:
                sess.verifier.close()
        if session in map(_JOB_SESSION, self.jobs):  # a closing session rarely has work queued: look first, at C speed
            self.jobs = [j for j in self.jobs if j.session != session]

    def _enqueue(self, job: Job) -> None:
        self.jobs.append(job)
        self._wake.set()

    def _buffer(self, sess: CloudSession, msg: Upload) -> None:
        if msg.parent in sess.killed or msg.parent in sess.dead or msg.round in sess.dead:
            sess.dead.add(msg.round)
            return
        committed = len(sess.tokens)
        for i, tok in enumerate(msg.tokens):
            pos = msg.start + i
            fixed = i < msg.n_fixed
            if pos < committed:
                if tok != sess.tokens[pos]:  # drafted on a prefix the verdict replaced
                    sess.dead.add(msg.round)
                    self._drop_from(sess, pos)
                    return
                continue
            j = i - msg.n_fixed
            row = j - 1 if msg.lead_implied else j
            sess.buffer[pos] = _Entry(
                tok, msg.round, fixed,
                q_token=None if fixed or msg.q_token is None else float(msg.q_token[j]),
                q_row=None if fixed or msg.q_rows is None or row < 0 else msg.q_rows[row],
            )

    def _drop_from(self, sess: CloudSession, pos: int) -> None:
        for p in [p for p in sess.buffer if p >= pos]:
            sess.dead.add(sess.buffer.pop(p).round)

    # ---- the worker ----------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            while not self.jobs:
                self._wake.clear()
                await self._wake.wait()
            batch = await self.next_batch()
            # A session closed or failed while its pass runs (the model may be computing it on
            # another thread) keeps its verifier until the pass is over: closing it mid-pass
            # would fail the pass, and with it every other session in the batch.
            self._in_pass = {j.session for j in batch}
            try:
                await self.run_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a pass that fails fails its sessions, not the server
                for name in dict.fromkeys(j.session for j in batch):
                    await self.fail(name, f"verification failed: {type(exc).__name__}: {exc}")
            finally:
                self._in_pass = set()
                closing, self._closing = self._closing, []
                for sess in closing:
                    sess.verifier.close()

    async def run_batch(self, batch: Sequence[Job]) -> None:
        for job in [j for j in batch if j.kind == "prefill"]:
            sess = self.sessions.get(job.session)
            if sess is not None:
                await self.ctx.compute.run(Op("prefill", len(sess.tokens), 0, sessions=(sess.name,)),
                                           sess.verifier.prefill)
        items, ready = [], []
        for job in [j for j in batch if j.kind == "verify"]:
            sess = self.sessions.get(job.session)
            if sess is None:
                continue
            try:
                block = self._block(sess, job)
            except SESSION_FAULTS as exc:  # this session's own uploads: it fails alone, the pass goes on
                await self.fail(sess.name, f"verification failed: {type(exc).__name__}: {exc}")
                continue
            if block is None:
                await self._send(sess, job, Verdict(sess.name, job.round, len(sess.tokens), 0, 0, None,
                                                    stale=True, committed=len(sess.tokens), t_arrived=job.t_arrived))
                continue
            tokens, q_token, q_rows = block
            items.append((sess.verifier, tokens, q_token, q_rows))
            ready.append((sess, job, len(sess.tokens), tokens))
        notes, self.batch_notes = self.batch_notes, {}
        if not items:
            return
        t0 = self.ctx.clock.now()
        context = sum(len(s.tokens) for s, *_ in ready)
        predicted = self.predict([(len(t), base) for _, _, base, t in ready])
        op = Op("verify", max(len(t) for *_, t in ready), context, batch=len(items),
                sessions=tuple(s.name for s, *_ in ready))
        outcomes = await self.ctx.compute.run(op, lambda: _verify_each(items))
        t_verify = self.ctx.clock.now() - t0
        record = BatchRecord(
            index=self._batches, kind="verify", start=t0, end=t0 + t_verify,
            sessions=[s.name for s, *_ in ready], rounds=[j.round for _, j, *_ in ready],
            new_tokens=[len(t) for *_, t in ready], context_tokens=[b for _, _, b, _ in ready],
            arrived=[j.t_arrived for _, j, *_ in ready], actual_s=t_verify, predicted_s=predicted,
            policy=type(self).__name__, extra=notes)
        if self.ctx.recorder is not None:
            self.ctx.recorder.batch(record)
        self._batches += 1
        # a member whose decision failed counts as accepting nothing (it is failed below)
        self.after_batch(record, [Outcome(0, None) if isinstance(o, Exception) else o for o in outcomes])
        for (sess, job, base, tokens), out in zip(ready, outcomes):
            if isinstance(out, Exception):  # that member's own data or settings: it fails alone
                await self.fail(sess.name, f"verification failed: {type(out).__name__}: {out}")
                continue
            self._commit(sess, job, base, tokens, out)
            await self._send(sess, job, Verdict(
                sess.name, job.round, base, len(tokens), out.n_accepted, out.token,
                list(out.topk_ids), list(out.topk_probs), committed=len(sess.tokens),
                digest=sess.verifier.digest(), t_arrived=job.t_arrived,
                t_queue=t0 - job.t_arrived, t_verify=t_verify, batch_size=len(items)))

    def _block(self, sess: CloudSession, job: Job):
        """The draft tokens a verification job covers, or None if its window was discarded."""
        if job.round in sess.dead:
            return None
        pos = len(sess.tokens)
        while pos in sess.buffer and sess.buffer[pos].fixed:  # corrections decided by the edge
            entry = sess.buffer.pop(pos)
            sess.verifier.append([entry.token])
            sess.tokens.append(entry.token)
            pos += 1
        if job.end < pos:
            return None
        entries = [sess.buffer.get(p) for p in range(pos, job.end)]
        if any(e is None or e.round != job.round or e.fixed for e in entries):
            return None
        tokens = [e.token for e in entries]
        q_token = [e.q_token for e in entries]
        rows = [e.q_row for e in entries]
        with_rows = sum(r is not None for r in rows)
        if 0 < with_rows < len(rows):
            raise SessionError(f"window {job.round}: a token uploaded without its distribution reached "
                               "verification (only a token a pending verdict settles may go without one)")
        q_rows = np.stack(rows) if with_rows else None
        return tokens, q_token, q_rows

    def _commit(self, sess: CloudSession, job: Job, base: int, tokens: Sequence[int], out) -> None:
        for p in range(base, base + len(tokens)):
            sess.buffer.pop(p, None)
        sess.tokens[base:] = list(tokens[: out.n_accepted])
        pos = base + out.n_accepted
        if out.token is not None:
            sess.tokens.append(out.token)
        if out.n_accepted < len(tokens) or out.token is None:
            # Rejection: whatever was drafted on top of this window is void.
            sess.killed.add(job.round)
            self._drop_from(sess, pos)
            return
        entry = sess.buffer.pop(pos, None)
        if entry is not None and entry.token != out.token:
            sess.killed.add(job.round)
            sess.dead.add(entry.round)
            self._drop_from(sess, pos)

    async def _send(self, sess: CloudSession, job: Job, verdict: Verdict) -> None:
        if not sess.closed:
            await self.ctx.link.send(verdict)
