"""Cloud-only autoregressive decoding: the edge asks, the cloud streams tokens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from systems.api import CloudContext, CloudPolicy, EdgeContext, EdgePolicy, GenerationRequest, Op
from systems.messages import CloseSession, Generate, TokenOut
from systems.protocol import ProtocolError, receive_token
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


class CloudOnlyCloud(CloudPolicy):
    """Decode each session's request token by token on the target; sessions interleave."""

    async def serve(self, ctx: CloudContext) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                env = await ctx.link.recv()
                if isinstance(env.msg, Generate):
                    task = asyncio.get_running_loop().create_task(self._decode(ctx, env.msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif not isinstance(env.msg, CloseSession):
                    raise ProtocolError(f"unexpected message {type(env.msg).__name__} at the cloud-only server")
                for t in [t for t in tasks if t.done()]:
                    t.result()
        finally:
            for t in tasks:
                t.cancel()

    async def _decode(self, ctx: CloudContext, req: Generate) -> None:
        params = SamplingParams(req.temperature, req.top_k, req.top_p)
        rng = np.random.default_rng(req.seed + 1)
        stops = set(req.stop_ids) | set(ctx.engine.eos_token_ids)
        session = ctx.engine.new_session()
        try:
            session.extend(req.prompt)
            for index in range(req.max_new_tokens):
                op = (Op("prefill", len(req.prompt), 0, sessions=(req.session,)) if index == 0
                      else Op("decode", 1, len(session), sessions=(req.session,)))
                t0 = ctx.clock.now()
                logits = await ctx.compute.run(op, session.next_logits)
                token = sample(probabilities(logits, params), rng)
                session.extend([token])
                last = token in stops or index + 1 == req.max_new_tokens
                await ctx.link.send(TokenOut(req.session, index, token, last, ctx.clock.now() - t0))
                if last:
                    break
        finally:
            session.close()
