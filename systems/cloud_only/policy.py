"""Cloud-only autoregressive decoding: the edge asks, the cloud streams tokens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from systems.api import CloudContext, EdgeContext, EdgePolicy, GenerationRequest, Op
from systems.messages import CloseSession, Generate, TokenOut
from systems.protocol import GuardedCloud, SessionError, check_generation, check_sampling, receive_token
from systems.sampling import SamplingParams, probabilities, sample


@dataclass
class CloudOnlyConfig:
    """No options: the target decodes alone."""


class CloudOnlyEdge(EdgePolicy):
    """Send the prompt, then emit each token as it arrives; one round per token."""

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        p = request.sampling
        t_prev = ctx.clock.now()
        nbytes = await ctx.link.send(Generate(ctx.session, list(request.prompt), request.max_new_tokens,
                                              list(request.stop_ids), p.temperature, p.top_k, p.top_p, request.seed))
        output: list[int] = []
        first_up = nbytes
        while True:
            msg = await receive_token(ctx, request, output, t_prev, first_up, "cloud-only")
            first_up, t_prev = 0, ctx.clock.now()
            if msg.last:
                break
        await ctx.link.send(CloseSession(ctx.session))
        return output


@dataclass
class _Decode:
    """One session's decode at the cloud-only server; ``closed``: stop before the next step."""

    task: asyncio.Task | None = None
    closed: bool = False


class CloudOnlyCloud(GuardedCloud):
    """Decode each session's request token by token on the target; sessions interleave.

    Each message is checked before it touches the model (:func:`check_generation`); a bad
    one, or a decode that fails (its context full, an engine error), fails that session
    alone (:class:`GuardedCloud`)."""

    async def serve(self, ctx: CloudContext) -> None:
        self.begin(ctx)
        self.decodes: dict[str, _Decode] = {}
        try:
            while True:
                await self.receive(await ctx.link.recv())
        finally:
            for d in self.decodes.values():
                d.closed = True
                if d.task is not None:
                    d.task.cancel()

    def check(self, msg) -> None:
        check_generation(msg, self.decodes, self.ctx.engine, "the cloud-only server")

    async def handle(self, env) -> None:
        msg = env.msg
        if isinstance(msg, CloseSession):
            self.drop(msg.session)
            return
        params = check_sampling(msg.temperature, msg.top_k, msg.top_p, msg.seed)
        decode = self.decodes[msg.session] = _Decode()
        decode.task = asyncio.get_running_loop().create_task(self._run(msg, params, decode))

    def drop(self, session: str) -> None:
        # The decode stops at its next step (never mid-step: the model may be computing it).
        decode = self.decodes.pop(session, None)
        if decode is not None:
            decode.closed = True

    async def _run(self, req: Generate, params: SamplingParams, decode: _Decode) -> None:
        try:
            await self._decode(self.ctx, req, params, decode)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a decode that fails fails its session, not the server
            if not decode.closed:
                await self.fail(req.session, f"decoding failed: {type(exc).__name__}: {exc}")
        finally:
            if self.decodes.get(req.session) is decode:
                del self.decodes[req.session]

    async def _decode(self, ctx: CloudContext, req: Generate, params: SamplingParams, decode: _Decode) -> None:
        rng = np.random.default_rng(req.seed + 1)
        stops = set(req.stop_ids) | set(ctx.engine.eos_token_ids)
        n_ctx = ctx.engine.info.n_ctx
        session = ctx.engine.new_session()
        try:
            session.extend(req.prompt)
            for index in range(req.max_new_tokens):
                if len(session) > n_ctx:
                    raise SessionError(f"the context of {n_ctx} is full after {index} new tokens")
                op = (Op("prefill", len(req.prompt), 0, sessions=(req.session,)) if index == 0
                      else Op("decode", 1, len(session), sessions=(req.session,)))
                t0 = ctx.clock.now()
                logits = await ctx.compute.run(op, session.next_logits)
                if decode.closed:
                    return
                token = sample(probabilities(logits, params), rng)
                session.extend([token])
                last = token in stops or index + 1 == req.max_new_tokens
                await ctx.link.send(TokenOut(req.session, index, token, last, ctx.clock.now() - t0))
                if last:
                    break
        finally:
            session.close()
