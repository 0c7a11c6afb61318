"""Centralized serving: autoregressive decoding on the target, continuously batched."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from systems.api import CloudContext, Op
from systems.engines.base import EngineSession
from systems.messages import CloseSession, Generate, TokenOut
from systems.protocol import GuardedCloud, ProtocolError, check_generation, check_sampling
from systems.records import BatchRecord
from systems.sampling import SamplingParams, probabilities, sample


@dataclass
class CentralizedConfig:
    """``max_batch``: the most sessions one decode step serves; later arrivals wait, not
    yet prefilled, until a session finishes."""

    max_batch: int = 16

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"centralized: max_batch must be >= 1, got {self.max_batch}")


@dataclass
class _Stream:
    request: Generate
    arrived: float
    rng: np.random.Generator
    stops: set[int]
    params: SamplingParams
    session: EngineSession | None = None
    token: int = -1  # the last token sent, scored by the next step
    emitted: int = 0
    closed: bool = False
    done: bool = False


class CentralizedCloud(GuardedCloud):
    """Continuous batching on the target: each step first prefills the sessions that arrived
    (while fewer than ``max_batch`` are active; each prefill gives its session's first token),
    then runs one forward pass that decodes the next token of every active session. Sessions
    join at the next step and leave when they finish. Each session samples as cloud-only does
    (its own generator seeded ``seed + 1``), so both produce the same tokens.

    Each message is checked before it touches the model (:func:`check_generation`); a bad one
    fails that session alone (:class:`GuardedCloud`), as does a full context. A pass that fails
    fails its members; the server and every other session are served on."""

    async def serve(self, ctx: CloudContext) -> None:
        self.begin(ctx)
        self.streams: dict[str, _Stream] = {}
        self.waiting: list[_Stream] = []
        self.active: list[_Stream] = []
        self._steps = 0
        self._wake = asyncio.Event()
        worker = asyncio.get_running_loop().create_task(self._work())
        try:
            while True:
                recv = asyncio.ensure_future(ctx.link.recv())
                await asyncio.wait({recv, worker}, return_when=asyncio.FIRST_COMPLETED)
                if worker.done():
                    recv.cancel()
                    worker.result()
                    raise ProtocolError("the centralized decode loop stopped")
                await self.receive(recv.result())
        finally:
            worker.cancel()
            for s in self.streams.values():
                if s.session is not None:
                    s.session.close()
            self.streams.clear()

    def check(self, msg) -> None:
        check_generation(msg, self.streams, self.ctx.engine, "the centralized server")

    async def handle(self, env) -> None:
        msg = env.msg
        if isinstance(msg, CloseSession):
            self.drop(msg.session)
            return
        params = check_sampling(msg.temperature, msg.top_k, msg.top_p, msg.seed)
        stream = _Stream(msg, env.t_recv, np.random.default_rng(msg.seed + 1),
                         set(msg.stop_ids) | set(self.ctx.engine.eos_token_ids), params)
        self.streams[msg.session] = stream
        self.waiting.append(stream)
        self._wake.set()

    def drop(self, session: str) -> None:
        # The worker finishes it before its next step (never mid-pass: the model may be running it).
        stream = self.streams.pop(session, None)
        if stream is not None:
            stream.closed = True

    async def _work(self) -> None:
        while True:
            while not self.waiting and not self.active:
                self._wake.clear()
                await self._wake.wait()
            for s in [s for s in self.waiting + self.active if s.closed]:
                self._finish(s)
            self.waiting = [s for s in self.waiting if not s.done]
            self.active = [s for s in self.active if not s.done]
            while self.waiting and len(self.active) < self.config.max_batch:
                await self._prefill(self.waiting.pop(0))
            await self._fail_full()
            if self.active:
                await self._step()

    async def _prefill(self, s: _Stream) -> None:
        req = s.request
        s.session = self.ctx.engine.new_session()
        t0 = self.ctx.clock.now()
        try:
            logits = await self.ctx.compute.run(Op("prefill", len(req.prompt), 0, sessions=(req.session,)),
                                                lambda: s.session.prefill(req.prompt))
        except Exception as exc:  # noqa: BLE001 - a prefill that fails fails its session, not the server
            await self._fail_members([s], exc)
            return
        await self._emit(s, logits, self.ctx.clock.now() - t0)
        if not s.done:
            self.active.append(s)

    async def _fail_full(self) -> None:
        """Fail the active sessions whose context has no room for the next step's token."""
        n_ctx = self.ctx.engine.info.n_ctx
        for s in [s for s in self.active if not s.closed and len(s.session) + 1 > n_ctx]:
            await self.fail(s.request.session, f"SessionError: the context of {n_ctx} is full after "
                                               f"{s.emitted} new tokens")
            self._finish(s)
        self.active = [s for s in self.active if not s.done]

    async def _fail_members(self, members: list[_Stream], exc: Exception) -> None:
        for s in members:
            if not s.closed:
                await self.fail(s.request.session, f"decoding failed: {type(exc).__name__}: {exc}")
            self._finish(s)
        self.active = [s for s in self.active if not s.done]

    async def _step(self) -> None:
        members = list(self.active)
        names = [s.request.session for s in members]
        context = [len(s.session) for s in members]
        items = [(s.session, [s.token]) for s in members]
        # One token per session in one pass: priced as a verification pass of a one-token
        # block per session (RoleProfile.cost: step at the mean context + one verified token
        # + batch_s_per_session per session beyond the first).
        op = Op("verify", 1, sum(context), batch=len(members), sessions=tuple(names))
        t0 = self.ctx.clock.now()
        try:
            rows = await self.ctx.compute.run(op, lambda: self.ctx.engine.score_batch(items))
        except Exception as exc:  # noqa: BLE001 - a pass that fails fails its members, not the server
            await self._fail_members(members, exc)
            return
        t_step = self.ctx.clock.now() - t0
        if self.ctx.recorder is not None:
            self.ctx.recorder.batch(BatchRecord(
                index=self._steps, kind="decode", start=t0, end=t0 + t_step, sessions=names,
                rounds=[-1] * len(members), new_tokens=[1] * len(members), context_tokens=context,
                arrived=[s.arrived for s in members], actual_s=t_step, predicted_s=None, policy="centralized"))
        self._steps += 1
        for s, r in zip(members, rows):
            await self._emit(s, r[-1], t_step)
        self.active = [s for s in self.active if not s.done]

    async def _emit(self, s: _Stream, logits: np.ndarray, t_compute: float) -> None:
        if s.closed:  # closed or failed while its pass ran: nothing more goes to its edge
            return
        req = s.request
        try:
            token = sample(probabilities(logits, s.params), s.rng)
        except ValueError as exc:  # its own sampling settings (no mass left): it fails alone
            await self._fail_members([s], exc)
            return
        index, s.token = s.emitted, token
        s.emitted += 1
        last = token in s.stops or s.emitted == req.max_new_tokens
        if last:
            self._finish(s)
        await self.ctx.link.send(TokenOut(req.session, index, token, last, t_compute))

    def _finish(self, s: _Stream) -> None:
        s.done = True
        if s.session is not None:
            s.session.close()
        if self.streams.get(s.request.session) is s:
            del self.streams[s.request.session]
