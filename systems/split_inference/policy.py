"""Edge and cloud policies of split inference: one autoregressive target, cut by layers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from systems.api import CloudContext, EdgeContext, EdgePolicy, GenerationRequest, Op
from systems.engines.base import ModelPart
from systems.messages import CloseSession, HiddenStates, TokenOut
from systems.protocol import GuardedCloud, SessionError, check_sampling, is_int, receive_token
from systems.sampling import SamplingParams, probabilities, sample
from systems.split_inference.config import SplitInferenceConfig, layers_of


def _layers_op(session: str, start: int, positions: int, layers: tuple[int, int, int]) -> Op:
    """The work of running a slice of the target's layers on new positions from ``start``: the
    prompt's prefill at position 0, one decode step after it."""
    if start == 0:
        return Op("prefill", positions, 0, sessions=(session,), layers=layers)
    return Op("decode", 1, start, sessions=(session,), layers=layers)


class SplitEdge(EdgePolicy):
    """Run the target's first layers on the new position(s), send their hidden states up,
    emit the token that comes back; one round per token."""

    config: SplitInferenceConfig

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        split = layers_of(self.config, ctx.engine)
        layers = (0, self.config.edge_layers, split.n_layers)
        dtype = np.dtype(self.config.hidden_dtype)
        stops = set(request.stop_ids) | set(ctx.engine.eos_token_ids)
        p = request.sampling
        part = split.open_part(0, self.config.edge_layers)
        output: list[int] = []
        inputs = list(request.prompt)
        t_prev = ctx.clock.now()
        try:
            while True:
                start = part.length
                op = _layers_op(ctx.session, start, len(inputs), layers)
                t0 = ctx.clock.now()
                hidden = await ctx.compute.run(op, lambda: part.run(inputs))
                t_edge = ctx.clock.now() - t0
                states = hidden.astype(dtype)
                nbytes = await ctx.link.send(HiddenStates(ctx.session, start, states, p.temperature, p.top_k,
                                                          p.top_p, request.seed))
                msg = await receive_token(ctx, request, output, t_prev, nbytes, "split-inference", extra={
                    "positions": len(states), "hidden_bytes": states.nbytes, "hidden_dtype": dtype.name,
                    "t_edge": t_edge, "edge_layers": self.config.edge_layers, "n_layers": split.n_layers})
                t_prev = ctx.clock.now()
                if msg.token in stops or len(output) >= request.max_new_tokens:
                    break
                inputs = [msg.token]
        finally:
            part.close()
        await ctx.link.send(CloseSession(ctx.session))
        return output


@dataclass
class _Session:
    part: ModelPart
    params: SamplingParams
    rng: np.random.Generator
    tokens: int = 0
    expected: int = 0  # the position the next hidden states must start at
    busy: asyncio.Task | None = field(default=None, repr=False)
    closed: bool = False


def check_hidden_states(msg: HiddenStates, sess: _Session | None, width: int, n_ctx: int) -> None:
    """Raise :class:`SessionError` (one line) unless ``msg`` carries finite float hidden states
    of ``width`` for one or more positions, starting where the session's cloud half stands
    (0 for a new session), with its last token sent, and inside the context."""
    states = msg.states
    if not isinstance(states, np.ndarray) or states.ndim != 2 or states.shape[1] != width or states.dtype.kind != "f":
        shape = getattr(states, "shape", None)
        raise SessionError(f"hidden states must be floats of shape (positions, {width}), got "
                           f"{type(states).__name__} of shape {shape}")
    if len(states) < 1:
        raise SessionError("hidden states for no positions")
    with np.errstate(over="ignore"):
        if not np.isfinite(states.astype(np.float32)).all():
            raise SessionError("hidden states that are not finite (in float32)")
    expected = 0 if sess is None else sess.expected
    if not is_int(msg.start) or msg.start != expected:
        raise SessionError(f"hidden states for position {msg.start!r}, the cloud expects {expected}")
    if sess is not None and sess.busy is not None and not sess.busy.done():
        raise SessionError("hidden states arrived before the last token left")
    if msg.start + len(states) > n_ctx:
        raise SessionError(f"hidden states reaching position {msg.start + len(states)} are past the context "
                           f"of {n_ctx}")


class SplitCloud(GuardedCloud):
    """Run the target's remaining layers, its final norm and head on each session's hidden
    states as they arrive, sample the next token (:mod:`systems.sampling`) and send it down.

    Each message is checked before it touches the model (:func:`check_hidden_states`); a bad
    one, or a step that fails, fails that session alone (:class:`GuardedCloud`)."""

    config: SplitInferenceConfig

    async def serve(self, ctx: CloudContext) -> None:
        self.begin(ctx)
        self.split = layers_of(self.config, ctx.engine)
        self.sessions: dict[str, _Session] = {}
        try:
            while True:
                await self.receive(await ctx.link.recv())
        finally:
            for sess in self.sessions.values():
                if sess.busy is not None:
                    sess.busy.cancel()
                sess.part.close()

    def check(self, msg) -> None:
        if isinstance(msg, CloseSession):
            return
        if not isinstance(msg, HiddenStates):
            raise SessionError(f"unexpected message {type(msg).__name__} at the split-inference cloud")
        check_hidden_states(msg, self.sessions.get(msg.session), self.split.hidden_size, self.ctx.engine.info.n_ctx)

    async def handle(self, env) -> None:
        msg = env.msg
        if isinstance(msg, CloseSession):
            self.drop(msg.session)
            return
        sess = self.sessions.get(msg.session)
        if sess is None:
            params = check_sampling(msg.temperature, msg.top_k, msg.top_p, msg.seed)
            # Seeded as cloud-only seeds its stream, so both sample the same tokens.
            sess = self.sessions[msg.session] = _Session(
                self.split.open_part(self.config.edge_layers, self.split.n_layers), params,
                np.random.default_rng(msg.seed + 1))
        sess.expected = msg.start + len(msg.states)
        sess.busy = asyncio.get_running_loop().create_task(self._step(msg, sess))

    def drop(self, session: str) -> None:
        sess = self.sessions.pop(session, None)
        if sess is not None:
            sess.closed = True
            if sess.busy is None or sess.busy.done():
                sess.part.close()  # else its step closes it when the model is done with it

    async def _step(self, msg: HiddenStates, sess: _Session) -> None:
        try:
            await self._run(msg, sess)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a step that fails fails its session, not the server
            if not sess.closed:
                await self.fail(msg.session, f"the cloud's layers failed: {type(exc).__name__}: {exc}")
        finally:
            if sess.closed:
                sess.part.close()

    async def _run(self, msg: HiddenStates, sess: _Session) -> None:
        ctx, part, n_layers = self.ctx, sess.part, self.split.n_layers
        states = np.asarray(msg.states, dtype=np.float32)
        layers = (self.config.edge_layers, n_layers, n_layers)
        op = _layers_op(msg.session, msg.start, len(states), layers)
        t0 = ctx.clock.now()
        logits = await ctx.compute.run(op, lambda: part.run(states))
        if sess.closed:
            return
        token = sample(probabilities(logits[-1], sess.params), sess.rng)
        index, sess.tokens = sess.tokens, sess.tokens + 1
        await ctx.link.send(TokenOut(msg.session, index, token, False, ctx.clock.now() - t0))
