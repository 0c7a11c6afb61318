"""A bad client never takes the cloud down: each message a cloud cannot serve fails that
client's session with a reason (a Failure message), and every other session keeps being served,
losslessly (in one process, toy pair, virtual time). The speculative verifiers, the clouds that
decode alone (cloud-only, centralized) and split inference's second half each get the bad
messages that make sense for them."""

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
from systems.messages import CloseSession, Failure, Generate, HiddenStates, OpenSession, TokenOut, Upload, Verdict
from systems.protocol import CloudRefused, SpeculativeEdge
from tests.support import greedy_decode

VOCAB = 16
N_CTX = 64  # small enough for a stream to reach its end before the toy target's EOS
PROMPT = [1, 2, 3]
REPLY_TIMEOUT_S = 5.0  # virtual seconds: a bad session's Failure comes at once, or never (a hang)
HONEST_TIMEOUT_S = 600.0  # virtual seconds for an honest request (they take well under one)


def _bad_messages(n_ctx: int) -> list[tuple[str, list]]:
    """(what is wrong, the messages of one bad session) at a verifier: each reproduces a way one
    message used to stop the cloud for everyone."""
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
        ("fields of the wrong type", [OpenSession("bad-k", PROMPT),
                                      Upload("bad-k", round=0, start="3", tokens=True, verify=True)]),
        ("sparse_k of the wrong type", [OpenSession("bad-l", PROMPT, sparse_k="ten")]),
        ("a q(x) of 0 for a drafted token", [OpenSession("bad-m", PROMPT, temperature=1.0, rule="rejection"),
                                             Upload("bad-m", round=0, start=3, tokens=[1, 2], verify=True,
                                                    q_rows=np.zeros((2, VOCAB)))]),
        ("a drafted token without its row", [OpenSession("bad-o", PROMPT, temperature=1.0, rule="rejection"),
                                             Upload("bad-o", round=0, start=3, tokens=[1], lead_implied=True),
                                             Upload("bad-o", round=0, start=4, tokens=[2], verify=True,
                                                    q_rows=np.ones((1, VOCAB)) / VOCAB)]),
        ("a temperature too small to sample at", [OpenSession("bad-n", PROMPT, temperature=1e-320, rule="sparse"),
                                                  Upload("bad-n", round=0, start=3, tokens=[1], verify=True,
                                                         q_token=[0.5])]),
    ]


def _bad_generations(n_ctx: int) -> list[tuple[str, list]]:
    """The same for a cloud that decodes each request alone (cloud-only, centralized)."""
    return [
        ("ids outside the vocabulary", [Generate("bad-a", [10 ** 9, -7], 8)]),
        ("a prompt past the context", [Generate("bad-b", [1] * (n_ctx + 10), 8)]),
        ("max_new_tokens of 0", [Generate("bad-c", PROMPT, 0)]),
        ("negative max_new_tokens", [Generate("bad-d", PROMPT, -3)]),
        ("an upload at a cloud that decodes alone", [Upload("bad-e", round=0, start=3, tokens=[1], verify=True)]),
        ("a session opened twice", [Generate("bad-f", PROMPT, 40), Generate("bad-f", PROMPT, 40)]),
        ("an empty prompt", [Generate("bad-g", [], 8)]),
        ("top_p of 0", [Generate("bad-h", PROMPT, 8, top_p=0.0)]),
        ("a stop id outside the vocabulary", [Generate("bad-i", PROMPT, 8, stop_ids=[VOCAB + 3])]),
        ("a verifier's session at a cloud that decodes alone", [OpenSession("bad-j", PROMPT)]),
        ("a cloud's own message sent up", [TokenOut("bad-k", 0, 1)]),
        ("more new tokens than the context holds", [Generate("bad-l", PROMPT, n_ctx + 10)]),
        ("fields of the wrong type", [Generate("bad-m", PROMPT, "8", stop_ids=None)]),
        ("a temperature too small to sample at", [Generate("bad-n", PROMPT, 8, temperature=1e-320)]),
        ("an infinite temperature", [Generate("bad-o", PROMPT, 8, temperature=float("inf"))]),
        ("a negative seed", [Generate("bad-p", PROMPT, 8, temperature=1.0, seed=-1)]),
    ]


def _bad_hidden_states(n_ctx: int, width: int) -> list[tuple[str, list]]:
    """The same for split inference's cloud half (hidden states of ``width`` per position)."""
    def states(rows: int, value: float = -1.0, cols: int = width) -> np.ndarray:
        h = np.full((rows, cols), value, dtype=np.float32)
        if cols:
            h[:, 0] = 1.0
        return h

    return [
        ("a first message not at position 0", [HiddenStates("bad-a", 5, states(3))]),
        ("hidden states of the wrong width", [HiddenStates("bad-b", 0, states(3, cols=width + 2))]),
        ("hidden states of one dimension", [HiddenStates("bad-c", 0, np.ones(3, dtype=np.float32))]),
        ("no positions", [HiddenStates("bad-d", 0, states(0))]),
        ("a prompt past the context", [HiddenStates("bad-e", 0, states(n_ctx + 10))]),
        ("not-a-number hidden states", [HiddenStates("bad-f", 0, states(3, value=np.nan))]),
        ("hidden states the model cannot read", [HiddenStates("bad-g", 0, states(3, value=0.5))]),
        ("a position the cloud does not hold", [HiddenStates("bad-h", 0, states(3)),
                                                HiddenStates("bad-h", 9, states(1))]),
        ("a session started twice", [HiddenStates("bad-i", 0, states(3)), HiddenStates("bad-i", 0, states(3))]),
        ("top_p of 0", [HiddenStates("bad-j", 0, states(3), top_p=0.0)]),
        ("a cloud-only request at split inference", [Generate("bad-k", PROMPT, 8)]),
        ("an upload at split inference", [Upload("bad-l", round=0, start=3, tokens=[1], verify=True)]),
        ("fields of the wrong type", [HiddenStates("bad-m", "0", states(3), temperature="hot")]),
        ("an infinite temperature", [HiddenStates("bad-n", 0, states(3), temperature=float("inf"))]),
        ("a negative seed", [HiddenStates("bad-o", 0, states(3), seed=-2)]),
    ]


# what each bad message's Failure must say (a part of its reason), by the cloud's kind
REASONS = {
    "verifier": {
        "upload for a session never opened": "upload for session 'bad-a', which is not open",
        "negative start": "upload positions out of range (start -4",
        "n_fixed past the tokens": "upload positions out of range (start 3, n_fixed 5",
        "greedy rule at temperature 1": "the greedy rule needs temperature 0",
        "unknown rule": "unknown acceptance rule 'nonsense'",
        "a cloud-only request at a verifier": "unexpected message Generate at the verifier",
        "a prompt past the context": "a prompt of 74 tokens leaves no room in the context of 64",
        "ids outside the vocabulary": "prompt: token ids must be integers in [0, 16)",
        "q_rows of the wrong shape": "q_rows of shape (1, 3) for 2 draft rows of 16 tokens",
        "a session opened twice": "session 'bad-j' is already open",
        "fields of the wrong type": "Upload.start must be int, got str",
        "sparse_k of the wrong type": "OpenSession.sparse_k must be int, got str",
        "a q(x) of 0 for a drafted token": "has q(x) = 0",
        "a temperature too small to sample at": "cannot sample from a distribution with no mass",
        "a drafted token without its row": "window 0: a token uploaded without its distribution reached verification",
    },
    "generation": {
        "ids outside the vocabulary": "prompt: token ids must be integers in [0, 16)",
        "a prompt past the context": "a prompt of 74 tokens leaves no room in the context of 64",
        "max_new_tokens of 0": "max_new_tokens must be an integer >= 1, got 0",
        "negative max_new_tokens": "max_new_tokens must be an integer >= 1, got -3",
        "an upload at a cloud that decodes alone": "unexpected message Upload at the",
        "a session opened twice": "session 'bad-f' is already open",
        "an empty prompt": "an empty prompt",
        "top_p of 0": "top_p must be in (0, 1]",
        "a stop id outside the vocabulary": "stop ids: token ids must be integers in [0, 16)",
        "a verifier's session at a cloud that decodes alone": "unexpected message OpenSession at the",
        "a cloud's own message sent up": "unexpected message TokenOut at the",
        "more new tokens than the context holds": "the context of 64 is full after 62 new tokens",
        "fields of the wrong type": "Generate.max_new_tokens must be int, got str",
        "a temperature too small to sample at": "cannot sample from a distribution with no mass",
        "an infinite temperature": "temperature must be finite, got inf",
        "a negative seed": "seed must be an integer >= 0, got -1",
    },
    "split": {
        "a first message not at position 0": "hidden states for position 5, the cloud expects 0",
        "hidden states of the wrong width": "got ndarray of shape (3, 5)",
        "hidden states of one dimension": "got ndarray of shape (3,)",
        "no positions": "hidden states for no positions",
        "a prompt past the context": "hidden states reaching position 74 are past the context of 64",
        "not-a-number hidden states": "hidden states that are not finite",
        "hidden states the model cannot read": "holds no token ids",
        "a position the cloud does not hold": "hidden states for position 9, the cloud expects 3",
        "a session started twice": "hidden states for position 0, the cloud expects 3",
        "top_p of 0": "top_p must be in (0, 1]",
        "a cloud-only request at split inference": "unexpected message Generate at the split-inference cloud",
        "an upload at split inference": "unexpected message Upload at the split-inference cloud",
        "fields of the wrong type": "HiddenStates.start must be int, got str",
        "an infinite temperature": "temperature must be finite, got inf",
        "a negative seed": "seed must be an integer >= 0, got -2",
    },
}

# where each cloud keeps its sessions' state (model sessions, streams), by system
HELD = {"cloud_only": "decodes", "centralized": "streams"}

# messages that must fail nothing: the cloud answers none of them and serves on
HARMLESS = [
    ("a CloseSession for a session never opened", [CloseSession("nobody")]),
    ("a CloseSession twice", [CloseSession("nobody-2"), CloseSession("nobody-2")]),
]


def _kind(system: str) -> str:
    return {"cloud_only": "generation", "centralized": "generation", "split_inference": "split"}.get(system, "verifier")


def _cases(system: str, target) -> list[tuple[str, list]]:
    n_ctx, kind = target.info.n_ctx, _kind(system)
    if kind == "generation":
        return _bad_generations(n_ctx)
    if kind == "split":
        return _bad_hidden_states(n_ctx, target.layer_split().hidden_size)
    return _bad_messages(n_ctx)


def _serve_with_bad_clients(system: str, cases, harmless, requests, draft, target):
    """Serve ``requests`` honestly while bad clients send their cases' messages, all on one
    cloud; (each case's reply, each harmless client's replies, the honest records, the cloud,
    the sessions it held state for while it still served)."""
    spec = get_system(system)
    edge_engine = target if spec.edge_model == "target" else draft

    async def main():
        clock, cloud_end = LoopClock(), CloudEnd()
        cloud = spec.cloud_cls(spec.make_config({}))
        server = asyncio.get_running_loop().create_task(
            cloud.serve(CloudContext(target, clock, InstantCompute(), cloud_end)))

        def connect(session: str):
            link = cloud_end.new_link(LinkProfile())
            cloud_end.route(session, link)
            return link

        async def honest(req):
            session = f"honest-{req.request_id}"
            link = connect(session)
            return await asyncio.wait_for(serve_request(
                spec, spec.edge_cls(spec.make_config({})), req, session=session, clock=clock,
                compute=InstantCompute(), link=link.edge_end(session), draft=edge_engine,
                recorder=RequestRecorder(clock)), HONEST_TIMEOUT_S)

        async def bad(messages):
            """Send the messages; the replies until the Failure (what came before it: tokens
            of a stream the bad message then failed)."""
            session = messages[0].session
            end = connect(session).edge_end(session)
            for msg in messages:
                await end.send(msg)
            replies = []
            while not replies or not isinstance(replies[-1], Failure):
                replies.append((await asyncio.wait_for(end.recv(), REPLY_TIMEOUT_S)).msg)
            return replies

        async def quiet(messages):
            """Send the messages; whatever comes back within the reply timeout (nothing, if harmless)."""
            session = messages[0].session
            end = connect(session).edge_end(session)
            for msg in messages:
                await end.send(msg)
            try:
                return [(await asyncio.wait_for(end.recv(), REPLY_TIMEOUT_S)).msg]
            except asyncio.TimeoutError:
                return []

        replies = await asyncio.gather(*(bad(m) for _, m in cases), *(quiet(m) for _, m in harmless),
                                       *(honest(r) for r in requests))
        assert not server.done(), f"the cloud stopped serving: {server.exception() if server.done() else ''}"
        held = set(getattr(cloud, HELD.get(system, "sessions")))  # before stopping, which releases all
        server.cancel()
        n, k = len(cases), len(harmless)
        return replies[:n], replies[n:n + k], replies[n + k:], cloud, held

    return run(main(), virtual=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow at a temperature of 1e-320
@pytest.mark.parametrize("system", ["vanilla", "sled", "wisp", "pipesd", "cloud_only", "centralized",
                                    "split_inference"])
def test_bad_messages_fail_their_session_and_everyone_else_is_served(system):
    kw = dict(vocab_size=VOCAB, seed=1, n_ctx=N_CTX)
    draft, target = create_engine("toy", role="draft", agreement=0.7, **kw), create_engine("toy", role="target", **kw)
    requests = [GenerationRequest(f"r{i}", [i + 1, 2, 5], 24, seed=i) for i in range(3)]
    requests.append(GenerationRequest("r-one", [4, 2, 5], 1, seed=3))  # the smallest request there is
    cases = _cases(system, target)

    failures, quiet, records, cloud, held = _serve_with_bad_clients(system, cases, HARMLESS, requests, draft, target)
    for (what, messages), replies in zip(cases, failures):
        reply = replies[-1]
        assert isinstance(reply, Failure), f"{what}: got {replies!r}"
        assert reply.session == messages[0].session and "\n" not in reply.reason, what
        assert REASONS[_kind(system)][what] in reply.reason, f"{what}: the reason says {reply.reason!r}"
        assert all(isinstance(r, TokenOut) for r in replies[:-1]), f"{what}: {replies!r}"
    for (what, _), replies in zip(HARMLESS, quiet):
        assert replies == [], f"{what}: the cloud answered {replies!r}"
    assert cloud.failed == {m[0].session for _, m in cases}
    # a failed session's state is released, whatever it held when it failed (a session opened
    # twice, or opened and then sent a bad upload, holds a verifier or a stream)
    assert not held & cloud.failed, f"state kept for failed sessions {sorted(held & cloud.failed)}"
    for req, rec in zip(requests, records):
        assert rec.output_tokens == greedy_decode(target, req.prompt, req.max_new_tokens)[0]


@pytest.mark.parametrize("system", ["vanilla", "sled", "cloud_only", "centralized", "split_inference"])
def test_a_failed_sessions_name_is_free_again_after_its_close_session(system):
    """What a failed session still had on the link is dropped, up to its CloseSession; a later
    session of that name is served (here: failed again, for a message no cloud serves) and not
    ignored: its Failure may never have reached an edge that closed the session first."""
    spec = get_system(system)
    target = create_engine("toy", role="target", vocab_size=VOCAB, seed=1, n_ctx=N_CTX)

    async def main():
        clock, cloud_end = LoopClock(), CloudEnd()
        server = asyncio.get_running_loop().create_task(
            spec.cloud_cls(spec.make_config({})).serve(CloudContext(target, clock, InstantCompute(), cloud_end)))
        link = cloud_end.new_link(LinkProfile())
        cloud_end.route("x", link)
        end = link.edge_end("x")
        replies = []
        for msg in [Verdict("x", 0, 0, 0, 0, None), Verdict("x", 1, 0, 0, 0, None), CloseSession("x")]:
            await end.send(msg)
        replies.append((await asyncio.wait_for(end.recv(), REPLY_TIMEOUT_S)).msg)
        await clock.sleep(0.01)  # the cloud has taken the CloseSession: the transport drops the name's route
        cloud_end.route("x", link)  # a new session of that name is routed again, as the runner does
        await end.send(Verdict("x", 2, 0, 0, 0, None))
        replies.append((await asyncio.wait_for(end.recv(), REPLY_TIMEOUT_S)).msg)
        assert not server.done()
        server.cancel()
        return replies

    first, second = run(main(), virtual=True)
    assert isinstance(first, Failure) and isinstance(second, Failure)
    assert "unexpected message Verdict" in second.reason


class _GatedCompute(InstantCompute):
    """Runs work at once, except a verification pass: that waits until ``gate`` opens (as a
    pass the model computes on another thread while the event loop serves arrivals)."""

    def __init__(self):
        self.started, self.gate = asyncio.Event(), asyncio.Event()

    async def run(self, op, fn):
        if op.kind == "verify":
            self.started.set()
            await self.gate.wait()
        return await super().run(op, fn)


async def _gated_sled(target, names):
    """A SLED cloud on gated compute serving ``target`` in this loop, with a session opened for
    each name: (cloud, its server task, the compute, the cloud's end, each name's edge end)."""
    spec = get_system("sled")
    clock, cloud_end, compute = LoopClock(), CloudEnd(), _GatedCompute()
    cloud = spec.cloud_cls(spec.make_config({}))
    server = asyncio.get_running_loop().create_task(cloud.serve(CloudContext(target, clock, compute, cloud_end)))
    ends = {}
    for name in names:
        link = cloud_end.new_link(LinkProfile())
        cloud_end.route(name, link)
        ends[name] = link.edge_end(name)
        await ends[name].send(OpenSession(name, PROMPT))
    return cloud, server, compute, cloud_end, ends


def test_a_session_closed_while_its_pass_runs_leaves_the_others_in_it_served():
    """Two sessions in one batched pass (SLED); one edge closes its session while the pass
    runs: the other still gets its verdict (the closed one's verifier is released after the
    pass, not under it)."""
    target = create_engine("toy", role="target", vocab_size=VOCAB, seed=1, n_ctx=N_CTX)

    async def main():
        cloud, server, compute, cloud_end, ends = await _gated_sled(target, ("stays", "leaves"))
        for name in ("stays", "leaves"):
            await ends[name].send(Upload(name, round=0, start=3, tokens=[4, 5], verify=True))
        await asyncio.wait_for(compute.started.wait(), REPLY_TIMEOUT_S)
        await ends["leaves"].send(CloseSession("leaves"))
        await asyncio.sleep(0.01)  # the close is served while the pass waits
        compute.gate.set()
        reply = (await asyncio.wait_for(ends["stays"].recv(), REPLY_TIMEOUT_S)).msg
        late = await _next_or_none(ends["leaves"])
        assert not server.done()
        server.cancel()
        return reply, late, cloud_end.dropped, cloud.failed

    reply, late, dropped, failed = run(main(), virtual=True)
    assert isinstance(reply, Verdict) and not reply.stale and reply.batch_size == 2, reply
    # the closed session's verdict is not even sent (a link with no route for it would drop it)
    assert late is None and dropped == 0, f"the closed session was sent {late!r} ({dropped} dropped)"
    assert failed == set()


async def _next_or_none(end):
    """The next message on an edge's end, or None if none comes within the reply timeout."""
    try:
        return (await asyncio.wait_for(end.recv(), REPLY_TIMEOUT_S)).msg
    except asyncio.TimeoutError:
        return None


def test_a_closed_sessions_queued_work_goes_with_it_and_the_rest_stays_queued():
    """While a pass runs, two sessions queue verifications and one of them closes: its job
    leaves the queue at once (the queue holds the other's alone), nothing reaches it, and
    the other's verification is served by the next pass."""
    target = create_engine("toy", role="target", vocab_size=VOCAB, seed=1, n_ctx=N_CTX)

    async def main():
        cloud, server, compute, cloud_end, ends = await _gated_sled(target, ("first", "stays", "leaves"))
        await ends["first"].send(Upload("first", round=0, start=3, tokens=[4, 5], verify=True))
        await asyncio.wait_for(compute.started.wait(), REPLY_TIMEOUT_S)  # first's pass holds the model
        for name in ("stays", "leaves"):
            await ends[name].send(Upload(name, round=0, start=3, tokens=[6], verify=True))
        await asyncio.sleep(0.01)
        queued_before = sorted(j.session for j in cloud.jobs)
        await ends["leaves"].send(CloseSession("leaves"))
        await asyncio.sleep(0.01)
        queued_after = [j.session for j in cloud.jobs]
        compute.gate.set()
        replies = {name: await _next_or_none(ends[name]) for name in ends}
        assert not server.done()
        server.cancel()
        return queued_before, queued_after, replies

    queued_before, queued_after, replies = run(main(), virtual=True)
    assert queued_before == ["leaves", "stays"] and queued_after == ["stays"]
    assert isinstance(replies["first"], Verdict) and isinstance(replies["stays"], Verdict), replies
    assert replies["stays"].batch_size == 1 and replies["leaves"] is None, replies


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


def test_an_upload_on_a_replaced_prefix_during_its_sessions_pass_breaks_nothing():
    """While a pass judges a session's window, that session sends an upload on a prefix the
    cloud has replaced, which drops every token it holds from there on, the judged window's
    included: the pass still ends, and both its members get their verdicts."""
    target = create_engine("toy", role="target", vocab_size=VOCAB, seed=1, n_ctx=N_CTX)
    odd = (PROMPT[2] + 1) % VOCAB  # not the prompt's token at position 2

    async def main():
        cloud, server, compute, cloud_end, ends = await _gated_sled(target, ("odd", "honest"))
        for name in ("odd", "honest"):
            await ends[name].send(Upload(name, round=0, start=3, tokens=[4, 5], verify=True))
        await asyncio.wait_for(compute.started.wait(), REPLY_TIMEOUT_S)
        await ends["odd"].send(Upload("odd", round=5, start=2, tokens=[odd]))
        await asyncio.sleep(0.01)
        held = sorted(cloud.sessions["odd"].buffer)
        compute.gate.set()
        replies = {name: await _next_or_none(ends[name]) for name in ends}
        assert not server.done(), server.exception()
        server.cancel()
        return held, replies

    held, replies = run(main(), virtual=True)
    assert held == []  # the odd upload dropped what the pass is judging
    for name, reply in replies.items():
        assert isinstance(reply, Verdict) and reply.batch_size == 2, (name, reply)
