"""A bad client never takes the verifier down: each message a cloud cannot serve fails that
client's session with a reason (a Failure message), and every other session keeps being served,
losslessly (in one process, toy pair, virtual time)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from harness.clock import LoopClock, run
from harness.compute import InstantCompute
from harness.inprocess import RequestRecorder, serve_request
from harness.link import CloudEnd, LinkProfile
from systems.api import CloudContext, GenerationRequest, get_system
from systems.engines import create_engine
from systems.messages import CloseSession, Failure, Generate, OpenSession, Upload
from systems.protocol import CloudRefused, SpeculativeEdge
from tests.support import greedy_decode

VOCAB = 16
PROMPT = [1, 2, 3]


def _bad_messages(n_ctx: int) -> list[tuple[str, list]]:
    """(what is wrong, the messages of one bad session): each reproduces a way one message
    used to stop the cloud for everyone."""
    return [
        ("upload for a session never opened", [Upload("bad-a", round=0, start=3, tokens=[1], verify=True)]),
        ("negative start", [OpenSession("bad-b", PROMPT), Upload("bad-b", round=0, start=-4, tokens=[1])]),
        ("n_fixed past the tokens", [OpenSession("bad-c", PROMPT),
                                     Upload("bad-c", round=0, start=3, tokens=[1], n_fixed=5, verify=True)]),
        ("greedy rule at temperature 1", [OpenSession("bad-d", PROMPT, temperature=1.0, rule="greedy")]),
        ("unknown rule", [OpenSession("bad-e", PROMPT, rule="nonsense")]),
        ("a cloud-only request at a verifier", [Generate("bad-f", PROMPT, 8)]),
        ("a prompt past the context", [OpenSession("bad-g", [1] * (n_ctx + 10))]),
        ("ids outside the vocabulary", [OpenSession("bad-h", [10 ** 9, -7])]),
        ("q_rows of the wrong shape", [OpenSession("bad-i", PROMPT, temperature=1.0, rule="rejection"),
                                       Upload("bad-i", round=0, start=3, tokens=[1, 2], verify=True,
                                              q_rows=np.ones((1, 3)) / 3)]),
        ("a session opened twice", [OpenSession("bad-j", PROMPT), OpenSession("bad-j", PROMPT)]),
    ]


@pytest.mark.parametrize("system", ["vanilla", "sled", "wisp", "pipesd"])
def test_bad_messages_fail_their_session_and_everyone_else_is_served(system):
    spec = get_system(system)
    kw = dict(vocab_size=VOCAB, seed=1)
    draft, target = create_engine("toy", role="draft", agreement=0.7, **kw), create_engine("toy", role="target", **kw)
    requests = [GenerationRequest(f"r{i}", [i + 1, 2, 5], 24, seed=i) for i in range(3)]
    cases = _bad_messages(target.info.n_ctx)

    async def main():
        clock, cloud_end = LoopClock(), CloudEnd()
        cloud = spec.cloud_cls(spec.make_config({}))
        server = asyncio.get_running_loop().create_task(
            cloud.serve(CloudContext(target, clock, InstantCompute(), cloud_end)))

        async def honest(req):
            link = cloud_end.new_link(LinkProfile())
            session = f"honest-{req.request_id}"
            cloud_end.route(session, link)
            return await serve_request(spec, spec.edge_cls(spec.make_config({})), req, session=session, clock=clock,
                                       compute=InstantCompute(), link=link.edge_end(session), draft=draft,
                                       recorder=RequestRecorder(clock))

        async def bad(messages):
            link = cloud_end.new_link(LinkProfile())
            session = messages[0].session
            cloud_end.route(session, link)
            end = link.edge_end(session)
            for msg in messages:
                await end.send(msg)
            env = await asyncio.wait_for(end.recv(), timeout=5.0)
            return env.msg

        replies = await asyncio.gather(*(bad(m) for _, m in cases), *(honest(r) for r in requests))
        assert not server.done(), "the cloud stopped serving"
        server.cancel()
        return replies[: len(cases)], replies[len(cases):], cloud.failed

    failures, records, failed = run(main(), virtual=True)
    for (what, messages), reply in zip(cases, failures):
        assert isinstance(reply, Failure), f"{what}: got {reply!r}"
        assert reply.session == messages[0].session and reply.reason and "\n" not in reply.reason, what
    assert set(failed) == {m[0].session for _, m in cases}
    for req, rec in zip(requests, records):
        assert rec.output_tokens == greedy_decode(target, req.prompt, req.max_new_tokens)[0]


def test_an_edge_whose_session_is_failed_raises_the_clouds_reason():
    """The edge side of a failed session: its next wait (for a verdict) raises CloudRefused
    with the cloud's reason, and closing it does not wait for verdicts that will never come."""
    spec = get_system("vanilla")
    kw = dict(vocab_size=VOCAB, seed=1)
    draft, target = create_engine("toy", role="draft", **kw), create_engine("toy", role="target", **kw)

    async def main():
        from systems.api import Drafter, EdgeContext

        clock, cloud_end = LoopClock(), CloudEnd()
        cloud = spec.cloud_cls(spec.make_config({}))
        server = asyncio.get_running_loop().create_task(
            cloud.serve(CloudContext(target, clock, InstantCompute(), cloud_end)))
        link = cloud_end.new_link(LinkProfile())
        cloud_end.route("s", link)
        rng = np.random.default_rng(0)
        req = GenerationRequest("s", PROMPT, 8)
        ctx = EdgeContext("s", clock, InstantCompute(), link.edge_end("s"), RequestRecorder(clock),
                          Drafter(draft, req.sampling, rng), rng)
        edge = SpeculativeEdge(ctx, req, "greedy")
        await edge.open()
        await edge.draft()
        edge._sent_upto = edge.drafter.position  # as if uploaded; then send one whose start is off
        edge._in_flight.append(edge.window)
        await ctx.link.send(Upload("s", round=0, start=-1, tokens=[1], verify=True))
        with pytest.raises(CloudRefused, match="upload positions out of range"):
            await edge.next_verdict()
        await asyncio.wait_for(edge.close(), timeout=5.0)
        await ctx.link.send(CloseSession("s"))
        server.cancel()

    run(main(), virtual=True)
