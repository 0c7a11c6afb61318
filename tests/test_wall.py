"""Wall mode: cloud and edges as separate processes over the gRPC data plane.

Fast tests use the toy pair; the one test on the real default pair is marked slow.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from harness.inprocess import run_system
from harness.pairs import ensure_pair, load_pair, open_engines
from harness.transport import frames
from harness.transport.frames import decode_frame, encode_frame
from harness.transport.grpc_link import GrpcCloudLink, GrpcEdgeLink, LinkClosedError
from harness.wall import REPO_ROOT, WallRunError, cpu_plan, run_wall
from systems.api import GenerationRequest
from systems.messages import CloseSession, OpenSession, Verdict, encode

TOY_REQUESTS = [GenerationRequest(f"r{i}", [1 + i, 2, 3], 24, seed=i) for i in range(4)]


# ---- helpers ---------------------------------------------------------------------------------
def _children() -> list[int]:
    """Live (non-zombie) child processes of this test process."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return [p.pid for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE]
    me, kids = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _port_free(port: int) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _inprocess(system: str, requests, config=None):
    pair = load_pair("toy")
    draft, target = open_engines(pair, ensure_pair(pair, progress=False))
    return run_system(system, draft, target, requests, config)


# ---- the frame encoding and the .proto ---------------------------------------------------------
def test_frame_codec_matches_the_proto():
    text = frames.PROTO_FILE.read_text()
    assert re.search(r"^package\s+specwan\.v1\s*;", text, re.M)
    assert frames.PACKAGE == "specwan.v1"
    service = re.search(r"service\s+(\w+)\s*\{[^}]*rpc\s+(\w+)\s*\(\s*stream\s+Frame\s*\)\s*returns\s*"
                        r"\(\s*stream\s+Frame\s*\)", text, re.S)
    assert service and (service.group(1), service.group(2)) == (frames.SERVICE, frames.METHOD)
    message = re.search(r"message\s+Frame\s*\{([^}]*)\}", text, re.S).group(1)
    fields = {name: (kind, int(num)) for kind, name, num in re.findall(r"(\w+)\s+(\w+)\s*=\s*(\d+)\s*;", message)}
    assert fields == {"payload": ("bytes", frames.PAYLOAD_FIELD), "t_sent": ("double", frames.T_SENT_FIELD)}

    # protobuf wire format, byte for byte: field 1 length-delimited, field 2 fixed64
    assert encode_frame(b"ab", 1.5) == b"\x0a\x02ab\x11" + struct.pack("<d", 1.5)
    assert encode_frame(b"", 0.0) == b""  # proto3 defaults are not written
    big = bytes(300)
    assert encode_frame(big, 0.0)[:3] == b"\x0a\xac\x02"  # varint length 300
    for payload, t in [(b"xyz", 123.25), (big, -0.0), (b"", 7.0)]:
        got_payload, got_t = decode_frame(encode_frame(payload, t))
        assert got_payload == payload and struct.pack("<d", got_t) == struct.pack("<d", t)
    # unknown fields from a newer peer are skipped
    newer = b"\x18\x05" + encode_frame(b"p", 2.0) + b"\x22\x01z" + b"\x2d\x00\x00\x00\x00"
    assert decode_frame(newer) == (b"p", 2.0)
    with pytest.raises(ValueError):
        decode_frame(b"\x0a\x05ab")


# ---- the gRPC link in one process --------------------------------------------------------------
def test_grpc_link_demultiplexes_sessions_and_refuses_a_mismatch():
    import grpc

    async def scenario():
        cloud = GrpcCloudLink(system="vanilla", model="m", vocab_fingerprint="fp")
        server = grpc.aio.server()
        cloud.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        async def echo():  # answer each message with a verdict for its session
            while True:
                env = await cloud.recv()
                if not isinstance(env.msg, CloseSession):
                    await cloud.send(Verdict(env.msg.session, 0, 0, 0, 0, int(env.msg.prompt[0])))

        task = asyncio.get_running_loop().create_task(echo())
        try:
            link = GrpcEdgeLink(f"127.0.0.1:{port}", system="vanilla", vocab_fingerprint="fp", device="d")
            info = await link.connect()
            assert info[frames.MD_SYSTEM] == "vanilla" and info[frames.MD_MODEL] == "m"
            a, b = link.session("d-a"), link.session("d-b")
            n = await b.send(OpenSession("d-b", [7]))
            await a.send(OpenSession("d-a", [5]))
            env_a, env_b = await a.recv(), await b.recv()
            assert (env_a.msg.session, env_a.msg.token) == ("d-a", 5)
            assert (env_b.msg.session, env_b.msg.token) == ("d-b", 7)
            assert env_b.t_sent <= env_b.t_recv and env_b.nbytes == len(encode(env_b.msg))
            assert link.up.bytes >= n and link.up.messages == 2 and link.down.messages == 2
            stats = cloud.snapshot()
            assert stats["sessions_open"] == 2 and stats["verify_jobs"] == 2 and stats["messages_up"] == 2
            await a.send(CloseSession("d-a"))
            await link.close()
            for _ in range(100):  # the stream ends; the open session is closed for the policy
                if cloud.streams_open == 0:
                    break
                await asyncio.sleep(0.01)
            assert cloud.sessions_open == 0 and cloud.stats.sessions_abandoned == 1

            wrong = GrpcEdgeLink(f"127.0.0.1:{port}", system="vanilla", vocab_fingerprint="other")
            with pytest.raises(LinkClosedError, match="vocabulary fingerprints differ"):
                await wrong.connect()
            other = GrpcEdgeLink(f"127.0.0.1:{port}", system="cloud_only", vocab_fingerprint="fp")
            with pytest.raises(LinkClosedError, match="serves 'vanilla'"):
                await other.connect()
            assert cloud.stats.streams_refused == 2
        finally:
            task.cancel()
            await server.stop(None)

        # a cloud that goes away: recv fails with the reason
        server = grpc.aio.server()
        cloud = GrpcCloudLink(system="vanilla")
        cloud.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        link = GrpcEdgeLink(f"127.0.0.1:{port}", system="vanilla")
        await link.connect()
        s = link.session("x")
        await s.send(OpenSession("x", [1]))
        await cloud.recv()
        await server.stop(None)
        with pytest.raises(LinkClosedError, match="cloud"):
            await asyncio.wait_for(s.recv(), 10)
        assert link.broken.is_set()
        with pytest.raises(LinkClosedError):
            await s.send(OpenSession("x", [1]))
        await link.close()

    asyncio.run(scenario())


# ---- wall mode on the toy pair -------------------------------------------------------------------
@pytest.mark.parametrize("system,clients", [("vanilla", 2), ("cloud_only", 1)])
def test_wall_mode_matches_inprocess(system, clients, tmp_path):
    started = {}
    records = run_wall(system, "toy", TOY_REQUESTS, clients=clients, timeout_s=60, workdir=tmp_path,
                       on_start=lambda run: started.update(run=run))
    reference = _inprocess(system, TOY_REQUESTS)
    assert [r.request_id for r in records] == [r.request_id for r in TOY_REQUESTS]
    for got, want in zip(records, reference):
        assert got.error is None
        assert got.output_tokens == want.output_tokens
        assert [(r.accepted, r.emitted) for r in got.rounds] == [(r.accepted, r.emitted) for r in want.rounds]
        assert (got.bytes_up, got.bytes_down) == (want.bytes_up, want.bytes_down)  # payload bytes only
        # each verdict's (or streamed token's) flight lies within the request, on the one wall
        # clock; a verdict's lies within its round too (cloud-only tokens overlap in flight)
        assert all(r.t_downlink is not None and 0 <= r.t_downlink <= got.e2e for r in got.rounds)
        if system != "cloud_only":
            assert all(r.t_downlink <= r.end - r.start for r in got.rounds)
    run = started["run"]
    assert len(run.edges) == clients
    assert all(c.proc.returncode == 0 for c in run.children)
    assert not _children()
    assert _port_free(run.grpc_port) and _port_free(run.http_port)


def test_wall_mode_when_the_cloud_dies_mid_run(tmp_path):
    """Kill the cloud after the first request finished: the request in flight fails with an
    error, finished records are kept, run_wall says what happened, and nothing is left."""
    requests = [GenerationRequest(f"k{i}", [1, 2, 3 + i % 5], 200, seed=i) for i in range(40)]
    started = {}

    def on_start(run):
        started["run"] = run

        def killer():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = run.outputs[0]
                if out.is_file() and out.read_text().count("\n") >= 1:
                    os.kill(run.cloud.pid, signal.SIGKILL)
                    return
                time.sleep(0.005)

        threading.Thread(target=killer, daemon=True).start()

    with pytest.raises(WallRunError) as info:
        run_wall("vanilla", "toy", requests, timeout_s=60, workdir=tmp_path, on_start=on_start)
    err = info.value
    message = str(err)
    assert "cloud process" in message and "killed by SIGKILL (signal 9)" in message
    assert "not run" in message
    finished = [r for r in err.records if r.error is None]
    assert len(err.failed) == 1 and finished
    failed = err.failed[0]
    assert "cloud" in failed.error
    assert failed.request_id == requests[len(finished)].request_id
    run = started["run"]
    assert run.edges[0].proc.returncode == 1
    assert "stopped after" in run.edges[0].log.read_text()
    assert all(c.proc.returncode is not None for c in run.children)
    assert not _children()
    assert _port_free(run.grpc_port) and _port_free(run.http_port)


def test_wall_mode_refuses_a_cloud_with_another_vocabulary(tmp_path):
    pair = tmp_path / "mismatch.yaml"
    pair.write_text("name: mismatch\ndraft: {engine: toy, options: {vocab_size: 64}}\n"
                    "target: {engine: toy, options: {vocab_size: 32}}\n")
    with pytest.raises(WallRunError, match="vocabulary"):
        run_wall("vanilla", str(pair), TOY_REQUESTS[:1], timeout_s=60, workdir=tmp_path)
    assert not _children()


def test_cloud_server_control_plane_and_sigterm(tmp_path):
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cloud_server", "--pair", "toy", "--system", "vanilla",
                             "--config", '{"gamma": 3}', "--grpc-port", "0", "--http-port", "0",
                             "--ready-file", str(ready)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not ready.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ports = json.loads(ready.read_text())

        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['http_port']}{path}", timeout=5) as r:
                return json.loads(r.read())

        assert get("/healthz")["status"] == "ok"
        info = get("/info")
        assert info["system"] == "vanilla" and info["config"]["gamma"] == 3
        assert info["vocab_size"] == 64 and info["eos_token_ids"] == [0]
        assert info["protocol_version"] >= 1 and info["grpc_port"] == ports["grpc_port"]
        target = load_pair("toy").target
        from systems.engines import create_engine
        assert info["vocab_fingerprint"] == create_engine("toy", role="target", **target.options).info.vocab_fingerprint
        stats = get("/stats")
        assert stats["sessions_open"] == 0 and stats["messages_up"] == 0 and stats["verify_jobs"] == 0
        assert "/shutdown" in get("/openapi.json")["paths"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _port_free(ports["grpc_port"]) and _port_free(ports["http_port"])
    assert not ready.exists()


# ---- the real default pair -----------------------------------------------------------------------
@pytest.mark.slow
def test_wall_mode_on_the_default_pair_matches_inprocess(tmp_path, default_pair_paths):
    from harness.pairs import DEFAULT_PAIR
    from systems.engines import create_engine
    from workloads.smoke import SMOKE_PROMPTS

    pair = load_pair(DEFAULT_PAIR)
    # the engines the wall processes build: the pair's options, one thread per core they get
    cloud_cpus, edge_cpus = cpu_plan(1)
    cores = {"target": cloud_cpus, "draft": edge_cpus[0]}
    engines = {}
    for role, spec in pair.roles().items():
        threads = len(cores[role]) if cores[role] else len(os.sched_getaffinity(0))
        engines[role] = create_engine(spec.engine, model_path=str(default_pair_paths[role]),
                                      **{**spec.options, "n_threads": threads})
    try:
        target = engines["target"]
        requests = []
        for i, p in enumerate(SMOKE_PROMPTS[:2]):
            text = target.apply_chat_template([{"role": "user", "content": p["turns"][0]}])
            requests.append(GenerationRequest(p["id"], target.tokenize(text), 16, seed=i))
        reference = run_system("vanilla", engines["draft"], target, requests, {"gamma": 4})
    finally:
        for e in engines.values():
            e.close()
    records = run_wall("vanilla", DEFAULT_PAIR, requests, {"gamma": 4}, timeout_s=300, workdir=tmp_path)
    for got, want in zip(records, reference):
        assert got.error is None and got.n_tokens > 0
        assert got.output_tokens == want.output_tokens
    assert not _children()


# ---- the cloud's batch records in wall mode -------------------------------------------------------
def _session_request(session: str) -> str:
    return session.split("-", 1)[1].rsplit("@", 1)[0]  # "<edge device>-<request id>@<stream>"; devices c0, c1...


def _toy_greedy(requests) -> list[list[int]]:
    from tests.support import greedy_decode

    pair = load_pair("toy")
    _, target = open_engines(pair, ensure_pair(pair, progress=False))
    return [greedy_decode(target, r.prompt, r.max_new_tokens)[0] for r in requests]


def test_wall_mode_delivers_vanilla_verification_batches(tmp_path):
    """Every verification round the edges recorded is a member of one of the cloud's batch
    records (same session and round, same pass time and batch size), and each pass lies
    within its round on the one wall clock."""
    requests = [GenerationRequest(f"v{i}", [1 + i, 2, 3], 24, seed=i) for i in range(3)]
    got, started = [], {}
    records = run_wall("vanilla", "toy", requests, clients=3, timeout_s=60, workdir=tmp_path,
                       on_start=lambda run: started.update(run=run), on_batch=got.append)
    assert started["run"].batches == got and got  # delivered before run_wall returned
    assert (tmp_path / "batches.jsonl").read_text().count("\n") == len(got)
    assert [b.index for b in got] == list(range(len(got)))  # none lost, in the order they ran
    assert [r.output_tokens for r in records] == _toy_greedy(requests)
    members = {}
    for b in got:
        assert b.kind == "verify" and b.policy == "VanillaCloud" and b.end >= b.start
        assert len(b.sessions) == len(b.rounds) == len(b.new_tokens) == len(b.arrived)
        for s, rnd, arrived in zip(b.sessions, b.rounds, b.arrived):
            assert arrived <= b.start
            members[(_session_request(s), rnd)] = b
    rounds = [(rec.request_id, r) for rec in records for r in rec.rounds if r.t_verify is not None]
    assert len(rounds) == len(members) == sum(len(b.sessions) for b in got)
    for request_id, r in rounds:
        b = members[(request_id, r.round)]
        assert r.t_verify == pytest.approx(b.actual_s, rel=1e-9)
        assert r.batch_size == len(b.sessions)
        assert r.start <= b.start <= b.end <= r.end
    assert not _children()


def test_wall_mode_delivers_centralized_decode_batches(tmp_path):
    """Three edges, one request each, decoded by one continuously batched cloud: steps serve
    several sessions at once, and each session is in one step per token after its first.

    Requests are long (500 tokens, about half a second of streaming) so they overlap
    although the three edge processes start their requests some tens of milliseconds apart;
    at 24 tokens a request is over in a few milliseconds and may never share a step."""
    n = 500
    requests = [GenerationRequest(f"d{i}", [1 + i, 2, 3], n, seed=i) for i in range(3)]
    got = []
    records = run_wall("centralized", "toy", requests, clients=3, timeout_s=60, workdir=tmp_path,
                       on_batch=got.append)
    assert [r.output_tokens for r in records] == _toy_greedy(requests)
    assert [b.index for b in got] == list(range(len(got)))
    assert all(b.kind == "decode" and b.new_tokens == [1] * len(b.sessions) for b in got)
    assert max(len(b.sessions) for b in got) > 1
    steps = {}
    span = {r.request_id: (r.start, r.end) for r in records}
    for b in got:
        for s in b.sessions:
            steps[_session_request(s)] = steps.get(_session_request(s), 0) + 1
            start, end = span[_session_request(s)]
            assert start <= b.start <= b.end <= end  # one clock for the cloud and the edges
    assert steps == {r.request_id: r.n_tokens - 1 for r in records}  # the first token is the prefill's
    assert not _children()


def test_wall_mode_delivers_the_batches_of_a_failed_run(tmp_path):
    """The cloud is killed mid-run: the passes it recorded before it died are delivered with
    the error, and cover every round of the requests that finished."""
    requests = [GenerationRequest(f"f{i}", [1, 2, 3 + i % 5], 200, seed=i) for i in range(20)]
    got = []

    def on_start(run):
        def killer():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = run.outputs[0]
                if out.is_file() and out.read_text().count("\n") >= 1:
                    os.kill(run.cloud.pid, signal.SIGKILL)
                    return
                time.sleep(0.005)

        threading.Thread(target=killer, daemon=True).start()

    with pytest.raises(WallRunError, match=r"killed by SIGKILL \(signal 9\)") as info:
        run_wall("vanilla", "toy", requests, timeout_s=60, workdir=tmp_path, on_start=on_start, on_batch=got.append)
    err = info.value
    assert got and err.batches == got
    assert [b.index for b in got] == list(range(len(got)))
    members = {(_session_request(s), rnd) for b in got for s, rnd in zip(b.sessions, b.rounds)}
    finished = [r for r in err.records if r.error is None]
    assert finished
    assert all((rec.request_id, r.round) in members for rec in finished for r in rec.rounds if r.t_verify is not None)
    assert not _children()


def test_read_batches_skips_a_torn_last_line(tmp_path):
    from harness.wall import batch_to_json, read_batches
    from systems.records import BatchRecord

    recs = [BatchRecord(i, "verify", 1.0 + i, 1.5 + i, ["c0-r0"], [i], [4], [3 + i], [0.5 + i], 0.5) for i in range(2)]
    path = tmp_path / "batches.jsonl"
    path.write_text("".join(batch_to_json(r) + "\n" for r in recs) + batch_to_json(recs[0])[:20])
    assert read_batches(path) == recs
    assert read_batches(tmp_path / "absent.jsonl") == []


def test_a_child_ended_by_a_signal_is_named_by_it():
    from harness.wall import exit_reason

    assert exit_reason(-9) == "was killed by SIGKILL (signal 9)"
    assert exit_reason(-15) == "was killed by SIGTERM (signal 15)"
    assert exit_reason(3) == "exited with code 3"


def test_a_harness_killed_mid_wall_run_keeps_every_finished_request(tmp_path):
    """kill -9 of the harness during a wall run: the requests its edges had finished are in
    the run folder already (appended as each edge reported it), and the edges die with it."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness.cli", "run", "mode=wall", "pair=toy", "workload=humaneval",
           "workload.size=40", "workload.chat_template=false", "max_new_tokens=400", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = run_dir / "requests.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: give it more work"
        # the records reached the folder while the edges were still serving, not after the run
        edges = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if "harness.edge_client" in " ".join(c.cmdline())]
        assert edges, "records reached the run folder only once every edge had finished"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    from netem.tempdirs import remove_stale

    for prefix in ("specwan-link-", "specwan-wall-"):  # what the killed harness could not remove
        remove_stale(prefix)
    lines = [json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
    assert 2 <= len(lines) < 40 and all(x["error"] is None for x in lines)
    assert len({x["request_id"] for x in lines}) == len(lines)


def test_the_message_limit_fits_the_largest_message_the_protocol_sends():
    """The gRPC limit (far below gRPC's 1 GiB maximum, so a bad client cannot make the cloud
    buffer a huge message) still carries the protocol's largest messages on the default pair:
    32 float32 draft rows of its 151,936-token vocabulary, and a 4,096-position prompt's float32
    hidden states of its 1.5B target (1,536 wide), framed."""
    import numpy as np

    from harness.transport.frames import encode_frame
    from harness.transport.grpc_link import MAX_MESSAGE_BYTES
    from systems.messages import HiddenStates, Upload

    rows = Upload("e0-r", round=0, start=4000, tokens=list(range(32)), verify=True,
                  q_rows=np.zeros((32, 151_936), dtype=np.float32))
    states = HiddenStates("e0-r", start=0, states=np.zeros((4096, 1536), dtype=np.float32))
    for msg in (rows, states):
        size = len(encode_frame(encode(msg), 0.0))
        assert size <= MAX_MESSAGE_BYTES, (type(msg).__name__, size)
    assert MAX_MESSAGE_BYTES <= 128 << 20
