"""Edge and cloud policies of split inference: one autoregressive target, cut by layers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from systems.api import CloudContext, CloudPolicy, EdgeContext, EdgePolicy, GenerationRequest, Op
from systems.engines.base import ModelPart
from systems.messages import CloseSession, HiddenStates, TokenOut
from systems.protocol import ProtocolError, receive_token
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
    busy: asyncio.Task | None = field(default=None, repr=False)


class SplitCloud(CloudPolicy):
    """Run the target's remaining layers, its final norm and head on each session's hidden
    states as they arrive, sample the next token (:mod:`systems.sampling`) and send it down."""

    config: SplitInferenceConfig

    async def serve(self, ctx: CloudContext) -> None:
        split = layers_of(self.config, ctx.engine)
        sessions: dict[str, _Session] = {}
        steps: set[asyncio.Task] = set()
        recv = None
        try:
            while True:
                # Wait on the steps too: a failed step surfaces at once, not with the next
                # message (its edge, waiting for the token, sends none).
                recv = recv or asyncio.ensure_future(ctx.link.recv())
                done, _ = await asyncio.wait({recv, *steps}, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {recv}:
                    steps.discard(task)
                    task.result()
                if recv not in done:
                    continue
                msg, recv = recv.result().msg, None
                if isinstance(msg, HiddenStates):
                    sess = sessions.get(msg.session)
                    if sess is None:
                        # Seeded as cloud-only seeds its stream, so both sample the same tokens.
                        sess = sessions[msg.session] = _Session(
                            split.open_part(self.config.edge_layers, split.n_layers),
                            SamplingParams(msg.temperature, msg.top_k, msg.top_p),
                            np.random.default_rng(msg.seed + 1))
                    if sess.busy is not None and not sess.busy.done():
                        raise ProtocolError(f"session {msg.session}: hidden states arrived before the last token left")
                    sess.busy = asyncio.get_running_loop().create_task(self._step(ctx, msg, sess, split.n_layers))
                    steps.add(sess.busy)
                elif isinstance(msg, CloseSession):
                    sess = sessions.pop(msg.session, None)
                    if sess is not None:
                        sess.part.close()
                else:
                    raise ProtocolError(f"unexpected message {type(msg).__name__} at the split-inference cloud")
        finally:
            if recv is not None:
                recv.cancel()
            for task in steps:
                task.cancel()
            for sess in sessions.values():
                sess.part.close()

    async def _step(self, ctx: CloudContext, msg: HiddenStates, sess: _Session, n_layers: int) -> None:
        part = sess.part
        if msg.start != part.length:
            raise ProtocolError(f"session {msg.session}: hidden states for position {msg.start}, "
                                f"the cloud holds {part.length}")
        states = np.asarray(msg.states, dtype=np.float32)
        layers = (self.config.edge_layers, n_layers, n_layers)
        op = _layers_op(msg.session, msg.start, len(states), layers)
        t0 = ctx.clock.now()
        logits = await ctx.compute.run(op, lambda: part.run(states))
        token = sample(probabilities(logits[-1], sess.params), sess.rng)
        index, sess.tokens = sess.tokens, sess.tokens + 1
        await ctx.link.send(TokenOut(msg.session, index, token, False, ctx.clock.now() - t0))
