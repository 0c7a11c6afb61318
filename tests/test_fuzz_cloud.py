"""The cloud server's data plane fuzzed with Hypothesis: a real ``harness.cloud_server``
process (toy pair), for vanilla (a speculative verifier) and centralized (a batching server
that decodes alone), takes sequences of messages of every type with random fields (random
session names, ids, positions, shapes, values of the wrong type, in random order) from
several concurrent bad clients, each on its own gRPC stream, plus raw frames that do not
decode, while honest clients run real requests through the same server.

What must hold: the server stays up (``/healthz`` ok, the same pid: never restarted); each
honest request's output is the target's greedy decode (lossless); every session a bad client
used ends in a :class:`Failure` (each bad client finally sends every session it used a
message no cloud serves), or the server ended that client's stream, never a hang (every wait
is bounded); a stream that sent an undecodable message is ended with an error status.

The counts (messages sent, sessions failed, streams ended, server restarts) are printed, put
in the test's report (``record_property``, e.g. ``--junitxml``), in the session's measured
figures, and kept in :data:`COUNTS`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, fields

import grpc
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.clock import LoopClock
from harness.compute import InstantCompute
from harness.inprocess import RequestRecorder, serve_request
from harness.pairs import load_pair, open_engines
from harness.transport.auth import bearer
from harness.transport.frames import MD_PROTOCOL, MD_SYSTEM, MD_VOCAB, METHOD_PATH, encode_frame
from harness.transport.grpc_link import GrpcEdgeLink, LinkClosedError
from systems.api import GenerationRequest, get_system
from systems.messages import (
    PROTOCOL_VERSION,
    Ack,
    CloseSession,
    Failure,
    Generate,
    HiddenStates,
    OpenSession,
    TokenOut,
    Upload,
    Verdict,
    encode,
)
from systems.sampling import RULES
from tests.support import cloud, greedy_decode, toy_vocab_fingerprint

# a speculative verifier and a batching server; SPECWAN_FUZZ_SYSTEMS=a,b,... fuzzes others
SYSTEMS = tuple(os.environ.get("SPECWAN_FUZZ_SYSTEMS", "vanilla,centralized").split(","))
# per system (each example runs several clients at once); SPECWAN_FUZZ_EXAMPLES=N fuzzes longer
MAX_EXAMPLES = int(os.environ.get("SPECWAN_FUZZ_EXAMPLES", "25"))
BAD_CLIENTS = 3  # bad clients on streams of their own, per example, besides one raw client
REPLY_TIMEOUT_S = 30.0  # for a bad client's last Failure: generous on 2 busy cores, and far from a hang
HONEST_TIMEOUT_S = 60.0
EXAMPLE_TIMEOUT_S = 120.0  # for everything one example runs: nothing in it may wait unbounded
MESSAGES = (OpenSession, Upload, Verdict, Generate, TokenOut, CloseSession, Ack, HiddenStates, Failure)
VOCAB = 64  # the toy pair's
N_CTX = 4096

COUNTS: dict[str, Counter] = {}  # per system: what the fuzzing sent and saw (see the module docstring)


# ---- what the bad clients send -----------------------------------------------------------------
def _array(rows: int, cols: int, dtype: str, fill: float) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full((rows, cols), fill).astype(dtype)


_INT = st.one_of(st.integers(-3, 80), st.sampled_from([-(2 ** 63), 2 ** 63 - 1, N_CTX - 1, N_CTX, N_CTX + 1, 10 ** 9]))
_FLOAT = st.one_of(st.sampled_from([0.0, 0.5, 1.0, -1.0]), st.floats())  # floats(): nan and infinities too
_IDS = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),  # ids of the vocabulary
    st.lists(_INT, max_size=12),
    st.sampled_from([N_CTX - 1, N_CTX, N_CTX + 50]).map(lambda n: [1] * n),  # prompts at the context's edge
)
_ARRAY = st.builds(_array, rows=st.integers(0, 5), cols=st.sampled_from([0, 1, 3, VOCAB, VOCAB + 1]),
                   dtype=st.sampled_from(["<f4", "<f2", "<f8", "<i4", "|u1", "|b1"]), fill=_FLOAT)
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(), st.text(max_size=3),
                  st.binary(max_size=3), st.lists(st.integers(-2, 2), max_size=2),
                  st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=1))
_BY_TYPE = {
    "int": _INT,
    "float": _FLOAT,
    "bool": st.booleans(),
    "str": st.one_of(st.sampled_from(RULES), st.text(max_size=5)),
    "list[int]": _IDS,
    "list[float]": st.lists(_FLOAT, max_size=6),
    "np.ndarray": _ARRAY,
    "None": st.none(),
}
_NAMES = st.sampled_from(["a", "b", "c", "h0"])  # few, so they collide, reopen and close


def _of_type(annotation: str) -> st.SearchStrategy:
    """Values of a message field's declared type (any of them, valid or not)."""
    return st.one_of(*[_BY_TYPE[alt.strip()] for alt in annotation.split("|")])


def _message(cls, junk: bool) -> st.SearchStrategy:
    """A ``cls`` message with random fields; with ``junk``, a field may hold a value of any type."""
    kwargs = {}
    for f in fields(cls):
        if f.name == "session":
            kwargs[f.name] = _NAMES
        else:
            typed = _of_type(f.type)
            kwargs[f.name] = st.one_of(typed, typed, _JUNK) if junk else typed
    return st.builds(cls, **kwargs)


def _prompt() -> st.SearchStrategy:
    return st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=6)


@st.composite
def _plausible(draw) -> list:
    """Messages an honest edge could send, or nearly: a session opened and drafted on (at its
    true position, or one off), or a generation of a few tokens."""
    name, prompt = draw(_NAMES), draw(_prompt())
    if draw(st.booleans()):
        return [Generate(name, prompt, draw(st.integers(1, 12)))]
    start = len(prompt) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    tokens = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4))
    return [OpenSession(name, prompt), Upload(name, round=0, start=start, tokens=tokens, verify=True)]


_STEP = st.one_of(
    *[_message(cls, junk=False).map(lambda m: [m]) for cls in MESSAGES],
    *[_message(cls, junk=True).map(lambda m: [m]) for cls in MESSAGES],
    _plausible(),
)
_SCRIPT = st.lists(_STEP, min_size=1, max_size=6).map(lambda steps: [m for step in steps for m in step])

_UNDECODABLE = st.one_of(
    st.just(msgpack.packb([99, "a"])),  # an unknown tag
    st.just(msgpack.packb([1])),  # too few fields
    st.just(msgpack.packb(5)),  # not a message at all
    st.just(msgpack.packb([2, "a", {"__nd__": ["|O", [1], b"x"]}])),  # an array no one may build
    st.binary(max_size=8).map(lambda b: b"\xc1" + b),  # a byte msgpack never uses
)


@st.composite
def _raw_frames(draw) -> list[bytes]:
    """A raw client's frames: a few well-formed messages, then one whose payload does not decode."""
    before = draw(st.lists(_message(OpenSession, junk=False), max_size=2))
    return [encode_frame(encode(m), time.monotonic()) for m in before] + [encode_frame(draw(_UNDECODABLE), 1.0)]


_HONEST = st.lists(st.tuples(_prompt(), st.integers(4, 20)), min_size=1, max_size=2)


# ---- the clients -------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one bad client sent and what came of it."""

    sent: int = 0
    failed: set = field(default_factory=set)  # its sessions the cloud failed
    ended: str | None = None  # why the server ended its stream (None: it did not)
    code: grpc.StatusCode | None = None  # the status a raw client's stream ended with
    hung: list = field(default_factory=list)  # sessions still waiting for an answer at the timeout


def _poison(name: str) -> Verdict:
    """A message no cloud serves (a verdict travels down, never up): it fails the session."""
    return Verdict(name, 0, 0, 0, 0, None)


async def _bad_client(address: str, token: str, system: str, script: list) -> Outcome:
    """Send ``script`` on a stream of its own, then a poison for every session it used; wait
    (bounded) until each of them is failed or the server ends the stream."""
    out = Outcome()
    link = GrpcEdgeLink(address, system=system, token=token, vocab_fingerprint=toy_vocab_fingerprint())
    await link.connect()
    try:
        names = list(dict.fromkeys(m.session for m in script))
        for msg in script + [_poison(n) for n in names]:
            await link.send(msg)
            out.sent += 1
        waiting, loop = set(names), asyncio.get_running_loop()
        deadline = loop.time() + REPLY_TIMEOUT_S
        while waiting:
            env = await asyncio.wait_for(link.recv(), max(0.0, deadline - loop.time()))
            if isinstance(env.msg, Failure):
                waiting.discard(env.msg.session)
                out.failed.add(env.msg.session)
    except LinkClosedError as e:
        out.ended = str(e)
    except asyncio.TimeoutError:
        out.hung = sorted(waiting)
    finally:
        await link.close()
    return out


async def _raw_client(address: str, token: str, system: str, frames: list[bytes]) -> Outcome:
    """Send raw frames on a stream of its own; the status the server ends it with."""
    out = Outcome()
    channel = grpc.aio.insecure_channel(address)
    try:
        call = channel.stream_stream(METHOD_PATH, request_serializer=bytes, response_deserializer=bytes)(
            metadata=((MD_PROTOCOL, str(PROTOCOL_VERSION)), (MD_SYSTEM, system), (MD_VOCAB, toy_vocab_fingerprint()),
                      bearer(token)))
        for frame in frames:
            await call.write(frame)
            out.sent += 1
        await call.done_writing()
        async for _ in call:
            pass
        out.code = await call.code()
    except grpc.aio.AioRpcError as e:
        out.code = e.code()
    finally:
        await channel.close()
    out.ended = None if out.code is None else out.code.name
    return out


async def _honest(address: str, token: str, system: str, engines, requests: list[GenerationRequest]) -> list:
    """Serve ``requests`` at once over one stream, each with the system's own edge policy."""
    spec = get_system(system)
    draft = engines[1] if spec.edge_model == "target" else engines[0]
    clock, link = LoopClock(), GrpcEdgeLink(address, system=system, token=token, vocab_fingerprint=toy_vocab_fingerprint())
    await link.connect()
    try:
        return await asyncio.gather(*(serve_request(
            spec, spec.edge_cls(spec.make_config({})), req, session=req.request_id, clock=clock,
            compute=InstantCompute(), link=link.session(req.request_id), draft=draft, recorder=RequestRecorder(clock))
            for req in requests))
    finally:
        await link.close()


# ---- the server --------------------------------------------------------------------------------
def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _same_server(info: dict) -> bool:
    """The server answers /healthz ok, as the process it started as."""
    try:
        base = f"http://127.0.0.1:{info['http_port']}"
        return (info["proc"].poll() is None and _get(f"{base}/healthz")["status"] == "ok"
                and _get(f"{base}/info")["pid"] == info["pid"] == info["proc"].pid)
    except OSError:
        return False


def _log_tail(folder, lines: int = 5) -> str:
    """The last lines of the server's log that are not INFO."""
    text = (folder / "cloud.log").read_text(errors="replace").splitlines()
    return " | ".join([line for line in text if " INFO " not in line][-lines:])


@pytest.fixture(scope="module")
def engines():
    """The toy pair's (draft, target)."""
    return open_engines(load_pair("toy"), {})


@pytest.mark.parametrize("system", SYSTEMS)
def test_bad_clients_fail_only_themselves_on_a_running_server(system, engines, tmp_path, record_property, report):
    target = engines[1]
    counts = COUNTS.setdefault(system, Counter())
    problems: list[str] = []

    with cloud(tmp_path, system=system) as info:
        address, token = f"127.0.0.1:{info['grpc_port']}", info["token"]
        assert _get(f"http://127.0.0.1:{info['http_port']}/info")["vocab_size"] == VOCAB

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(scripts=st.lists(_SCRIPT, min_size=BAD_CLIENTS, max_size=BAD_CLIENTS), raw=_raw_frames(),
               honest=_HONEST)
        def example(scripts, raw, honest):
            if problems:
                return  # the first problem is the one to read; the server may be gone
            requests = [GenerationRequest(f"h{i}", prompt, n, seed=i) for i, (prompt, n) in enumerate(honest)]

            async def everyone():
                clients = [_bad_client(address, token, system, s) for s in scripts]
                clients.append(_raw_client(address, token, system, raw))
                honest_run = asyncio.wait_for(_honest(address, token, system, engines, requests), HONEST_TIMEOUT_S)
                return await asyncio.gather(asyncio.gather(*clients), honest_run, return_exceptions=True)

            try:
                outcome = asyncio.run(asyncio.wait_for(everyone(), EXAMPLE_TIMEOUT_S))
            except asyncio.TimeoutError:
                outcome = None
            if not _same_server(info):
                counts["server_restarts"] += 1
                problems.append(f"the server is down or another process after scripts {scripts!r}, raw frames "
                                f"{raw!r}; its log ends: {_log_tail(tmp_path)}")
            if outcome is None:
                problems.append(f"an example did not finish within {EXAMPLE_TIMEOUT_S:g} s: scripts {scripts!r}, "
                                f"raw frames {raw!r}, honest {honest!r}")
            else:
                problems.extend(_judge(*outcome, requests, target, scripts, counts))

        example()
        alive = _same_server(info)

    _report(system, counts, record_property, report)
    assert not problems, problems[0]
    assert alive and counts["server_restarts"] == 0, _log_tail(tmp_path)
    assert counts["sessions_failed"] > 0 and counts["messages_sent"] >= MAX_EXAMPLES * BAD_CLIENTS


def _judge(bad, records, requests, target, scripts, counts: Counter) -> list[str]:
    """Count one example's outcomes; what went wrong, one line each."""
    problems = []
    if isinstance(bad, BaseException):
        return [f"a bad client raised {type(bad).__name__}: {bad}"]
    *typed, raw = bad
    for out, script in zip(typed, scripts):
        counts["messages_sent"] += out.sent
        counts["sessions_failed"] += len(out.failed)
        counts["streams_ended"] += out.ended is not None
        if out.hung:
            problems.append(f"sessions {out.hung} neither failed nor ended within {REPLY_TIMEOUT_S:g} s "
                            f"after {script!r}")
    counts["messages_sent"] += raw.sent
    counts["streams_ended"] += raw.ended is not None
    if raw.code is None or raw.code == grpc.StatusCode.OK:
        problems.append(f"a stream that sent an undecodable message ended with {raw.code}")
    if isinstance(records, BaseException):
        return problems + [f"an honest client failed: {type(records).__name__}: {records}"]
    for req, rec in zip(requests, records):
        counts["honest_requests"] += 1
        want = greedy_decode(target, req.prompt, req.max_new_tokens)[0]
        if rec.output_tokens != want:
            problems.append(f"honest request {req.prompt} gave {rec.output_tokens}, the target's greedy {want}")
    return problems


def _report(system: str, counts: Counter, record_property, report) -> None:
    names = ("messages_sent", "sessions_failed", "streams_ended", "server_restarts", "honest_requests")
    for name in names:
        record_property(name, counts[name])
    line = f"fuzz {system}: " + ", ".join(f"{n.replace('_', ' ')} {counts[n]}" for n in names)
    report(line)
    print(line)


def test_an_edge_waiting_for_a_verdict_from_a_cloud_that_dies_is_told(engines, tmp_path):
    """The cloud process is killed while an edge waits for its verdict: the wait ends with the
    link's failure (CloudRefused naming it), and closing the edge waits for no verdict."""
    from systems.api import Drafter, EdgeContext
    from systems.protocol import CloudRefused, SpeculativeEdge

    async def scenario(address: str, token: str, proc) -> str:
        link = GrpcEdgeLink(address, system="vanilla", token=token, vocab_fingerprint=toy_vocab_fingerprint())
        await link.connect()
        clock, rng, req = LoopClock(), np.random.default_rng(0), GenerationRequest("e", [1, 2, 3], 8)
        ctx = EdgeContext("e", clock, InstantCompute(), link.session("e"), RequestRecorder(clock),
                          Drafter(engines[0], req.sampling, rng), rng)
        edge = SpeculativeEdge(ctx, req, "greedy")
        try:
            await edge.open()
            await edge.draft()
            await edge.upload(verify=True)  # queued: the link's writer runs at the next await
            proc.kill()  # our own child, by its pid; dead before the upload can reach it
            proc.wait(timeout=15)
            with pytest.raises(CloudRefused, match="the link failed") as err:
                await asyncio.wait_for(edge.next_verdict(), REPLY_TIMEOUT_S)
            with pytest.raises(LinkClosedError):  # its CloseSession cannot go, but it waits for nothing
                await asyncio.wait_for(edge.close(), REPLY_TIMEOUT_S)
            return str(err.value)
        finally:
            await link.close()

    with cloud(tmp_path) as info:
        reason = asyncio.run(scenario(f"127.0.0.1:{info['grpc_port']}", info["token"], info["proc"]))
        assert info["proc"].returncode != 0
    assert "LinkClosedError" in reason


def test_a_frame_that_is_not_protobuf_ends_its_stream_with_an_error_status(tmp_path):
    with cloud(tmp_path) as info:
        address, token = f"127.0.0.1:{info['grpc_port']}", info["token"]
        out = asyncio.run(asyncio.wait_for(_raw_client(address, token, "vanilla", [b"\x0a\xff"]), REPLY_TIMEOUT_S))
        assert _same_server(info)
    assert out.code is not None and out.code != grpc.StatusCode.OK, out.code
