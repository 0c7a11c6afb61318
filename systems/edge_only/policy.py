"""Edge-only autoregressive decoding with the draft model."""

from __future__ import annotations

from dataclasses import dataclass

from systems.api import EdgeContext, EdgePolicy, GenerationRequest, Op


@dataclass
class EdgeOnlyConfig:
    """No options: the draft model decodes alone."""


class EdgeOnlyEdge(EdgePolicy):
    """Sample each token from the draft model and emit it at once."""

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        drafter = ctx.drafter
        stops = set(request.stop_ids) | set(drafter.engine.eos_token_ids)
        drafter.start(request.prompt)
        output: list[int] = []
        try:
            await ctx.compute.run(Op("prefill", len(request.prompt), 0), drafter.prefill)
            while len(output) < request.max_new_tokens:
                d = await ctx.compute.run(Op("draft", 1, drafter.position), drafter.draft)
                drafter.commit_all()
                output.append(d.token)
                ctx.recorder.emit([d.token])
                if d.token in stops:
                    break
        finally:
            drafter.close()
        return output
