"""Soak: one cloud server under mixed wall traffic for minutes, its memory and descriptors watched.

Starts one real cloud process (``harness.cloud_server``, toy pair and SLED by default) and,
for ``--minutes``, keeps traffic on it from this process over gRPC: ``--clients`` honest edge
devices (the system's edge policy on the pair's edge model, :func:`harness.inprocess.serve_request`
over :class:`harness.transport.grpc_link.GrpcEdgeLink`, as ``harness/edge_client.py`` does),
each opening a stream, serving a few greedy requests on it and closing it again; and one bad
client cycling through a session never opened, an undecodable frame, a wrong token, a session
abandoned mid-request by closing its stream, and a ``/shutdown`` with a wrong token (``--bad``;
``ill_typed``, a message that decodes with a string for a number, is left out by default: it
stops the cloud today).

Every honest request must be lossless: greedy requests (temperature 0) from a small fixed pool
of prompts, each output compared with the target's own greedy decode (computed here once per
prompt; a fixed pool also keeps the toy engine's per-context logit cache bounded, so the
cloud's memory measures the server, not the cache). Every bad client must be refused the
way the protocol says. Every ``--interval`` seconds the cloud's RSS, open descriptors and
threads (psutil, by its pid) and its ``/stats`` are sampled; idle samples are taken after a
warm-up request and again once the traffic has stopped and its streams are closed.

Writes ``samples.csv`` (one row per sample, written as taken), ``summary.json`` and the
cloud's log to ``--out`` (default ``results/soak-<pair>-<system>/``) and prints a summary:
start, end and max RSS and descriptors, requests served, failures, and whether each stayed
flat (RSS: the idle end within 10% or 16 MiB of the median of the traffic's first minute,
with a linear fit's slope per hour; descriptors: the idle end at most 4 above the idle start).
Exit status 1 when a request was not lossless or failed, a bad client was not refused as
expected, or the server died, stopped answering or did not stop cleanly.

    python benchmarks/soak.py [--pair toy] [--system sled] [--minutes 10 | --seconds S]
        [--clients 4] [--interval 5] [--tokens 32] [--bad never_opened,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import msgpack
import numpy as np
import psutil

from harness.clock import LoopClock
from harness.edge_client import cancel_task
from harness.inprocess import serve_request
from harness.pairs import ensure_pair, load_pair
from harness.transport.auth import TOKEN_ENV, bearer, new_token
from harness.transport.frames import (MD_DEVICE, MD_PROTOCOL, MD_SYSTEM, MD_VOCAB, METHOD_PATH, decode_frame,
                                      encode_frame)
from harness.transport.grpc_link import CHANNEL_OPTIONS, GrpcEdgeLink, LinkClosedError
from harness.wall import PARENT_ENV, REPO_ROOT, WallCompute, open_role_engine
from netem.tempdirs import owned_tempdir
from systems.api import GenerationRequest, get_system
from systems.messages import PROTOCOL_VERSION, Failure, OpenSession, Upload, decode, encode

DEFAULT_SYSTEM = "sled"
POOL = 8  # distinct greedy requests the honest clients cycle through
FD_MARGIN = 4  # descriptors the idle cloud may hold beyond its idle start
RSS_TOLERANCE = 0.10  # of the first minute's median RSS...
RSS_FLOOR_MIB = 16.0  # ...or this many MiB, whichever is larger
BASELINE_S = 60.0  # the traffic's first minute: the RSS baseline
STATS_FIELDS = ("sessions_open", "streams_open", "sessions_total", "streams_total", "streams_refused",
                "sessions_abandoned", "verify_jobs", "messages_up", "messages_down", "dropped_down")
MIB = 1 << 20


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into what SIGINT raises so both take the same clean-up path."""


# ---- the cloud process ---------------------------------------------------------------------
@dataclass
class Cloud:
    """The cloud process under test: its ports, pid and shared token."""

    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    token: str
    log: Path

    @property
    def pid(self) -> int:
        """The cloud process's id."""
        return self.proc.pid

    @property
    def address(self) -> str:
        """Its data plane, HOST:PORT."""
        return f"127.0.0.1:{self.grpc_port}"

    def url(self, path: str) -> str:
        """A control-plane URL."""
        return f"http://127.0.0.1:{self.http_port}{path}"


def start_cloud(pair: str, system: str, config: str, workdir: Path, log: Path, timeout_s: float = 600) -> Cloud:
    """Start ``harness.cloud_server`` on loopback with a fresh token; return once it serves."""
    token, ready = new_token(), workdir / "ready.json"
    env = {**os.environ, TOKEN_ENV: token, PARENT_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(log, "wb") as out:
        # its own session: a Ctrl-C at the terminal reaches this script, which then stops it
        proc = subprocess.Popen([sys.executable, "-m", "harness.cloud_server", "--pair", pair, "--system", system,
                                 "--config", config, "--ready-file", str(ready), "--log-level", "warning"],
                                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready.is_file():
            if proc.poll() is not None:
                raise RuntimeError(f"the cloud exited with status {proc.returncode}:\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cloud was not serving after {timeout_s:g} s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
    except BaseException:
        stop_process(proc)
        raise
    return Cloud(proc, info["grpc_port"], info["http_port"], token, log)


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict | None]:
    """GET (or POST ``body`` as JSON); the status and the decoded answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def shutdown_cloud(cloud: Cloud) -> int | None:
    """Ask the cloud to stop with its token; its exit status (None if it had to be killed)."""
    if cloud.proc.poll() is not None:
        return cloud.proc.returncode
    with contextlib.suppress(OSError):
        http_json(cloud.url("/shutdown"), {"token": cloud.token})
    try:
        return cloud.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        stop_process(cloud.proc)
        return None


# ---- samples -------------------------------------------------------------------------------
def sample(cloud: Cloud, t0: float, phase: str) -> dict:
    """The cloud's RSS, descriptors, threads, CPU time, health and /stats now."""
    proc = psutil.Process(cloud.pid)
    with proc.oneshot():
        row = {"t_s": round(time.monotonic() - t0, 3), "phase": phase,
               "rss_mib": round(proc.memory_info().rss / MIB, 3), "fds": proc.num_fds(),
               "threads": proc.num_threads(), "cpu_s": round(sum(proc.cpu_times()[:2]), 3)}
    try:
        row["healthy"] = http_json(cloud.url("/healthz"), timeout=5)[0] == 200
        stats = http_json(cloud.url("/stats"), timeout=5)[1] or {}
    except OSError:
        row["healthy"], stats = False, {}
    row.update({k: stats.get(k) for k in STATS_FIELDS})
    return row


class SampleFile:
    """``samples.csv``, one row per sample, flushed as written (a crash keeps what was taken)."""

    def __init__(self, path: Path):
        self.rows: list[dict] = []
        self._f = open(path, "w", newline="")
        self._w = csv.DictWriter(self._f, ["t_s", "phase", "rss_mib", "fds", "threads", "cpu_s", "healthy",
                                           *STATS_FIELDS])
        self._w.writeheader()

    def add(self, row: dict) -> dict:
        """Keep and write one sample."""
        self.rows.append(row)
        self._w.writerow(row)
        self._f.flush()
        return row

    def close(self) -> None:
        """Close the file."""
        self._f.close()


# ---- traffic -------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the traffic did, and each thing that went wrong (one line each), by kind."""

    served: int = 0  # honest requests finished with the greedy reference's output
    streams: int = 0  # honest streams opened (each closed again)
    bad: dict = field(default_factory=dict)  # bad-client kind -> times refused as expected
    lossy: list[str] = field(default_factory=list)  # honest requests whose output differs from greedy
    honest_failed: list[str] = field(default_factory=list)  # honest requests that failed or timed out
    bad_unexpected: list[str] = field(default_factory=list)  # bad clients not refused as the protocol says
    server: list[str] = field(default_factory=list)  # the cloud died, went unhealthy, or kept state

    @staticmethod
    def add(kind: list[str], what: str) -> None:
        """Record one problem of a kind."""
        kind.append(what.replace("\n", " ")[:500])

    def failures(self) -> list[str]:
        """Every problem, of every kind."""
        return [*self.lossy, *self.honest_failed, *self.bad_unexpected, *self.server]


@dataclass
class Traffic:
    """What the clients share: the cloud, the system, the engines and the request pool."""

    cloud: Cloud
    spec: object
    cfg: object
    draft: object
    fingerprint: str
    pool: list[tuple[list[int], int, list[int]]]  # (prompt, max new tokens, greedy reference)
    deadline: float
    request_timeout_s: float
    tally: Tally = field(default_factory=Tally)
    clock: LoopClock = field(default_factory=LoopClock)
    compute: WallCompute = field(default_factory=WallCompute)
    dead: asyncio.Event = field(default_factory=asyncio.Event)  # the cloud stopped serving

    def running(self) -> bool:
        """Whether the traffic goes on: before the deadline, with the cloud serving."""
        return time.monotonic() < self.deadline and not self.dead.is_set()

    def link(self, device: str, token: str | None = None) -> GrpcEdgeLink:
        """A new (unconnected) stream to the cloud for ``device``, with the cloud's token or ``token``."""
        return GrpcEdgeLink(self.cloud.address, system=self.spec.name, vocab_fingerprint=self.fingerprint,
                            device=device, token=self.cloud.token if token is None else token)


def greedy_reference(engine, prompt: list[int], max_new: int) -> list[int]:
    """The target's own greedy decode, one token per forward pass (what a lossless greedy
    request must output), stopping after an end-of-sequence token."""
    session = engine.new_session()
    try:
        logits, out = session.prefill(list(prompt)), []
        for _ in range(max_new):
            out.append(int(np.argmax(logits)))
            if out[-1] in set(engine.eos_token_ids):
                break
            logits = session.score([out[-1]])[-1]
        return out
    finally:
        session.close()


def request_pool(target, n: int, tokens: int) -> list[tuple[list[int], int, list[int]]]:
    """``n`` greedy requests (prompt, max new tokens) of a few lengths, with their references."""
    vocab = target.info.vocab_size
    pool = []
    for i in range(n):
        prompt = [(7 * i + 3 * j) % (vocab - 1) + 1 for j in range(3 + i % 4)]
        max_new = max(1, tokens - 4 * (i % 3))
        pool.append((prompt, max_new, greedy_reference(target, prompt, max_new)))
    return pool


async def serve_one(t: Traffic, link: GrpcEdgeLink, policy, device: str, request_id: str, seed: int) -> None:
    """One honest request over ``link``; a failure unless its output is the greedy reference.

    Like ``harness/edge_client.py``, it watches the link too: an edge policy waiting for a
    verdict on a link that broke can wait forever (its reader task died with the link)."""
    prompt, max_new, expected = t.pool[seed % len(t.pool)]
    req = GenerationRequest(request_id, prompt, max_new, seed=seed)
    session = f"{device}-{request_id}"
    task = asyncio.create_task(serve_request(t.spec, policy, req, session=session, clock=t.clock,
                                             compute=t.compute, link=link.session(session), draft=t.draft))
    broken = asyncio.create_task(link.broken.wait())
    try:
        await asyncio.wait({task, broken}, timeout=t.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        broken.cancel()
        if not task.done():
            await cancel_task(task)
        link.release(session)
    if not task.done() or task.cancelled():
        raise LinkClosedError(link.error) if link.error else TimeoutError(
            f"no answer within {t.request_timeout_s:g} s")
    rec = task.result()  # the request's own error, if it failed
    if rec.output_tokens != expected:
        t.tally.add(t.tally.lossy, f"request {request_id} not lossless: {rec.output_tokens} != greedy {expected}")
    else:
        t.tally.served += 1


async def honest_client(t: Traffic, i: int, think_s: float) -> None:
    """Streams of one to six honest requests each, opened and closed, until the deadline."""
    rng, n, device = random.Random(i), 0, f"soak{i}"
    while t.running():
        link = t.link(device)
        try:
            await link.connect()
            t.tally.streams += 1
            policy = t.spec.edge_cls(t.cfg)
            for _ in range(rng.randint(1, 6)):
                await serve_one(t, link, policy, device, f"h{i}-{n}", seed=n * 31 + i)
                n += 1
                await asyncio.sleep(think_s)
                if not t.running():
                    break
        except Exception as e:  # noqa: BLE001 - a broken link, a timeout, a policy error: each a failure
            t.tally.add(t.tally.honest_failed, f"client {i}, request h{i}-{n}: {type(e).__name__}: {e}")
            n += 1
            await asyncio.sleep(1.0)
        finally:
            await link.close()


# Each bad client returns None when refused the way the protocol says, else what happened.
async def bad_never_opened(t: Traffic, k: int) -> str | None:
    """An upload into a session this stream never opened: that session fails, nothing else."""
    async with t.link(f"bad{k}") as link:
        await link.send(Upload(f"ghost{k}", round=0, start=3, tokens=[1], verify=True))
        reply = (await asyncio.wait_for(link.recv(), 30)).msg
    return None if isinstance(reply, Failure) and "not open" in reply.reason else f"got {reply!r}"


@contextlib.asynccontextmanager
async def raw_stream(t: Traffic, device: str):
    """A stream to the cloud that sends whatever payload bytes it is given (with the token)."""
    metadata = ((MD_PROTOCOL, str(PROTOCOL_VERSION)), (MD_SYSTEM, t.spec.name), (MD_VOCAB, t.fingerprint),
                (MD_DEVICE, device), bearer(t.cloud.token))
    async with grpc.aio.insecure_channel(t.cloud.address, options=CHANNEL_OPTIONS) as channel:
        yield channel.stream_stream(METHOD_PATH, request_serializer=lambda b: b,
                                    response_deserializer=decode_frame)(metadata=metadata)


async def bad_undecodable(t: Traffic, k: int) -> str | None:
    """A frame whose payload is not a message: the stream ends with INVALID_ARGUMENT."""
    async with raw_stream(t, f"bad{k}") as call:
        await call.write(encode_frame(b"\xc1 is never msgpack", time.monotonic()))
        await call.done_writing()
        code = await asyncio.wait_for(call.code(), 30)
    return None if code == grpc.StatusCode.INVALID_ARGUMENT else f"the stream ended with {code.name}"


async def bad_ill_typed(t: Traffic, k: int) -> str | None:
    """A message that decodes but holds a string where a number belongs (an OpenSession whose
    ``sparse_k`` is "x"): its session fails, with a reason, and nothing else."""
    prompt, _, _ = t.pool[k % len(t.pool)]
    wire = msgpack.unpackb(encode(OpenSession(f"odd{k}", prompt)))  # [tag, field values...]
    wire[1 + [f.name for f in dataclasses.fields(OpenSession)].index("sparse_k")] = "x"
    async with raw_stream(t, f"bad{k}") as call:
        await call.write(encode_frame(msgpack.packb(wire), time.monotonic()))
        try:
            frame = await asyncio.wait_for(call.read(), 30)
        except grpc.aio.AioRpcError as e:
            return f"the stream ended with {e.code().name}: {e.details()}"
        call.cancel()
    reply = decode(frame[0]) if isinstance(frame, tuple) else frame
    return None if isinstance(reply, Failure) else f"got {reply!r}"


async def bad_wrong_token(t: Traffic, k: int) -> str | None:
    """A stream with another token: refused (UNAUTHENTICATED) before it opens."""
    link = t.link(f"bad{k}", token=new_token())
    try:
        await link.connect()
    except LinkClosedError as e:
        return None if "UNAUTHENTICATED" in str(e) else str(e)
    finally:
        await link.close()
    return "the stream was accepted"


async def bad_abandoned(t: Traffic, k: int) -> str | None:
    """A session opened, a window sent for verification, then its stream closed without
    CloseSession: the cloud must drop the session (checked by the idle end's sessions_open)."""
    prompt, _, _ = t.pool[k % len(t.pool)]
    async with t.link(f"bad{k}") as link:
        await link.send(OpenSession(f"gone{k}", prompt))
        await link.send(Upload(f"gone{k}", round=0, start=len(prompt), tokens=[1, 2], verify=True))
    return None


async def bad_shutdown(t: Traffic, k: int) -> str | None:
    """``POST /shutdown`` with a wrong token: 401, and the server serves on."""
    status, _ = await asyncio.to_thread(http_json, t.cloud.url("/shutdown"), {"token": new_token()})
    return None if status == 401 else f"answered {status}"


BAD_CLIENTS = {f.__name__.removeprefix("bad_"): f for f in (
    bad_never_opened, bad_undecodable, bad_wrong_token, bad_abandoned, bad_shutdown, bad_ill_typed)}
# ill_typed stops the cloud today (systems/protocol.py treats only SessionError, ValueError and
# EngineError as a session's fault; the TypeError ends the policy), so it is asked for by name.
DEFAULT_BAD = ("never_opened", "undecodable", "wrong_token", "abandoned", "shutdown")


async def bad_client(t: Traffic, kinds: list[str], every_s: float) -> None:
    """The bad clients ``kinds`` in turn, one every ``every_s`` seconds, until the deadline."""
    k = 0
    while t.running():
        name = kinds[k % len(kinds)]
        try:
            problem = await BAD_CLIENTS[name](t, k)
        except Exception as e:  # noqa: BLE001 - not the refusal the protocol promises
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            t.tally.bad[name] = t.tally.bad.get(name, 0) + 1
        else:
            t.tally.add(t.tally.bad_unexpected, f"bad client {name}: {problem}")
        k += 1
        await asyncio.sleep(every_s)


async def sampler(t: Traffic, samples: SampleFile, t0: float, interval_s: float, progress_s: float) -> None:
    """Sample the cloud every ``interval_s`` until the deadline; a progress line every ``progress_s``."""
    next_line = progress_s
    while t.running():
        await asyncio.sleep(min(interval_s, max(0.0, t.deadline - time.monotonic())))
        if t.cloud.proc.poll() is not None:
            t.tally.add(t.tally.server, f"the cloud process exited with status {t.cloud.proc.returncode}")
            t.dead.set()
            return
        row = samples.add(await asyncio.to_thread(sample, t.cloud, t0, "traffic"))
        if not row["healthy"]:
            t.tally.add(t.tally.server, f"the cloud did not answer /healthz at {row['t_s']:.0f} s")
        if row["t_s"] >= next_line:
            next_line += progress_s
            print(f"  [{row['t_s'] / 60:5.1f} min] rss {row['rss_mib']:.1f} MiB, fds {row['fds']}, "
                  f"threads {row['threads']}, served {t.tally.served}, streams {t.tally.streams}, "
                  f"bad refused {sum(t.tally.bad.values())}, failures {len(t.tally.failures())}", flush=True)


def quiet_link_errors(loop, context) -> None:
    """An edge policy's reader task dies with a broken link; the request's failure says why."""
    if not isinstance(context.get("exception"), LinkClosedError):
        loop.default_exception_handler(context)


async def drive(t: Traffic, samples: SampleFile, t0: float, args) -> None:
    """Warm up, sample idle, run the traffic to the deadline, let it settle, sample idle."""
    asyncio.get_running_loop().set_exception_handler(quiet_link_errors)
    link = t.link("warmup")
    async with link:
        await serve_one(t, link, t.spec.edge_cls(t.cfg), "warmup", "w0", seed=0)
    await asyncio.sleep(0.5)
    samples.add(await asyncio.to_thread(sample, t.cloud, t0, "idle_start"))
    t.deadline = time.monotonic() + args.seconds
    tasks = [asyncio.create_task(honest_client(t, i, args.think)) for i in range(args.clients)]
    tasks += [asyncio.create_task(bad_client(t, args.bad, args.bad_every)),
              asyncio.create_task(sampler(t, samples, t0, args.interval, args.progress))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if t.cloud.proc.poll() is None:
        samples.add(await asyncio.to_thread(settled_sample, t.cloud, t0))


def settled_sample(cloud: Cloud, t0: float, wait_s: float = 10.0) -> dict:
    """The idle end: once the cloud reports no open stream or session (or after ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        row = sample(cloud, t0, "idle_end")
        if (row["streams_open"] == 0 and row["sessions_open"] == 0) or time.monotonic() > deadline:
            return row
        time.sleep(0.25)


# ---- the verdict ---------------------------------------------------------------------------
def slope_per_hour(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of ``key`` over time, per hour (None with fewer than 3 samples)."""
    if len(rows) < 3:
        return None
    ts, ys = [r["t_s"] for r in rows], [float(r[key]) for r in rows]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((x - mt) ** 2 for x in ts)
    return None if var == 0 else sum((x - mt) * (y - my) for x, y in zip(ts, ys)) / var * 3600


def summarize(rows: list[dict], tally: Tally, args, exit_status: int | None) -> dict:
    """Start, end and max of RSS and descriptors, whether each stayed flat, and the problems
    by kind (``failures``: all of them; ``ok``: none)."""
    start = next((r for r in rows if r["phase"] == "idle_start"), None)
    end = next((r for r in rows if r["phase"] == "idle_end"), None)
    traffic = [r for r in rows if r["phase"] == "traffic"]
    if end is None:
        tally.add(tally.server, "no idle end sample: the cloud stopped during the run")
    elif end["sessions_open"] or end["streams_open"]:
        tally.add(tally.server, f"the idle cloud still holds {end['sessions_open']} sessions and "
                                f"{end['streams_open']} streams")
    if exit_status != 0:
        tally.add(tally.server, f"the cloud did not stop cleanly on /shutdown (exit status {exit_status})")
    summary = {"pair": args.pair, "system": args.system, "seconds": args.seconds, "clients": args.clients,
               "samples": len(rows), "requests_served": tally.served, "streams": tally.streams,
               "bad_refused": dict(tally.bad), "lossy": tally.lossy, "honest_failed": tally.honest_failed,
               "bad_unexpected": tally.bad_unexpected, "server": tally.server, "failures": tally.failures(),
               "cloud_exit_status": exit_status}
    summary["ok"] = not summary["failures"]
    if start is None or end is None:
        return summary
    window = min(BASELINE_S, args.seconds / 4)
    baseline = [r["rss_mib"] for r in traffic if r["t_s"] - start["t_s"] <= window] or [start["rss_mib"]]
    rss_base = statistics.median(baseline)
    rss_tol = max(RSS_TOLERANCE * rss_base, RSS_FLOOR_MIB)
    after = [r for r in traffic if r["t_s"] - start["t_s"] > window]
    summary["rss_mib"] = {"start": start["rss_mib"], "end": end["rss_mib"], "max": max(r["rss_mib"] for r in rows),
                          "first_minute_median": rss_base, "tolerance": round(rss_tol, 3),
                          "flat": end["rss_mib"] - rss_base <= rss_tol,
                          "slope_per_hour": slope_per_hour(after, "rss_mib")}
    summary["fds"] = {"start": start["fds"], "end": end["fds"], "max": max(r["fds"] for r in rows),
                      "margin": FD_MARGIN, "flat": end["fds"] <= start["fds"] + FD_MARGIN,
                      "slope_per_hour": slope_per_hour(traffic, "fds")}
    summary["threads"] = {"start": start["threads"], "end": end["threads"], "max": max(r["threads"] for r in rows)}
    summary["cloud_stats_end"] = {k: end[k] for k in STATS_FIELDS}
    return summary


def report(summary: dict) -> None:
    """Print the summary."""
    print(f"soak of {summary['system']} on the {summary['pair']} pair: {summary['seconds'] / 60:.1f} min, "
          f"honest clients: {summary['clients']}, samples: {summary['samples']}")
    print(f"  requests served (lossless): {summary['requests_served']} over {summary['streams']} streams; "
          f"bad clients refused: {summary['bad_refused']}")
    if "rss_mib" in summary:
        rss, fds = summary["rss_mib"], summary["fds"]
        slope = "n/a" if rss["slope_per_hour"] is None else f"{rss['slope_per_hour']:+.2f} MiB/h"
        print(f"  RSS MiB: start {rss['start']:.1f}, end {rss['end']:.1f}, max {rss['max']:.1f}; first minute's "
              f"median {rss['first_minute_median']:.1f}, end within {rss['tolerance']:.1f}: "
              f"{'flat' if rss['flat'] else 'GROWING'} (slope after it: {slope})")
        print(f"  descriptors: start {fds['start']}, end {fds['end']}, max {fds['max']}; end <= start + "
              f"{fds['margin']}: {'flat' if fds['flat'] else 'LEAKING'}")
    kinds = {k: len(summary[k]) for k in ("lossy", "honest_failed", "bad_unexpected", "server")}
    print(f"  failures: {len(summary['failures'])} ({', '.join(f'{k} {n}' for k, n in kinds.items())})")
    for line in summary["failures"][:20]:
        print(f"    {line}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="toy", help="pair name (conf/pair) or YAML file (default toy)")
    ap.add_argument("--system", default=DEFAULT_SYSTEM, help=f"registered system (default {DEFAULT_SYSTEM})")
    ap.add_argument("--config", default="{}", help="system config overrides as a JSON object")
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs (default 10)")
    length.add_argument("--seconds", type=float, default=None, help="the same, in seconds")
    ap.add_argument("--clients", type=int, default=4, help="concurrent honest edge clients (default 4)")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens of the longest requests (default 32)")
    ap.add_argument("--think", type=float, default=0.05, help="pause after each honest request, seconds")
    ap.add_argument("--bad", default=",".join(DEFAULT_BAD),
                    help=f"bad clients to cycle through, comma-separated, of {', '.join(BAD_CLIENTS)} "
                         f"(default {','.join(DEFAULT_BAD)})")
    ap.add_argument("--bad-every", type=float, default=1.0, help="seconds between bad clients (default 1)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines (default 60)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="a request taking longer fails")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default results/soak-<pair>-<system>/)")
    args = ap.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else args.minutes * 60
    args.bad = [b.strip() for b in args.bad.split(",") if b.strip()]
    if not args.bad or set(args.bad) - set(BAD_CLIENTS):
        ap.error(f"--bad takes names of {', '.join(BAD_CLIENTS)}")
    if args.seconds <= 0 or args.clients < 1 or args.interval <= 0:
        ap.error("--minutes/--seconds, --clients and --interval must be positive")
    args.out = args.out or Path("results") / f"soak-{Path(args.pair).stem}-{args.system}"
    return args


def _interrupt(signum, frame):
    raise Interrupted()


def main(argv: list[str] | None = None) -> dict:
    """Run the soak; returns the summary (also written to ``summary.json``)."""
    args = parse_args(argv)
    spec = get_system(args.system)
    cfg = spec.make_config(json.loads(args.config))
    if spec.cloud_cls is None or spec.edge_model != "draft":
        raise SystemExit(f"soak: {spec.name!r} is not a speculative system with a cloud verifier")
    pair = load_pair(args.pair)
    paths = ensure_pair(pair, progress=False)
    draft = open_role_engine(pair, "draft", paths.get("draft"))
    target = open_role_engine(pair, "target", paths.get("target"))
    args.out.mkdir(parents=True, exist_ok=True)
    work = owned_tempdir("specwan-soak-")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # signals reach only it
    samples, cloud, exit_status = SampleFile(args.out / "samples.csv"), None, None
    try:
        pool = request_pool(target, POOL, args.tokens)
        pair_arg = str(Path(pair.origin).resolve()) if pair.origin else args.pair  # it runs in the repo root
        cloud = start_cloud(pair_arg, spec.name, args.config, work, args.out / "cloud.log")
        t0 = time.monotonic()
        print(f"soak: {spec.name} on {pair.name}, cloud pid {cloud.pid}, {args.seconds / 60:.1f} min of traffic; "
              f"samples to {args.out / 'samples.csv'}", flush=True)
        traffic = Traffic(cloud, spec, cfg, draft, draft.info.vocab_fingerprint, pool, deadline=0.0,
                          request_timeout_s=args.request_timeout)
        try:
            asyncio.run(drive(traffic, samples, t0, args))
        finally:
            traffic.compute.close()
        exit_status = shutdown_cloud(cloud)
        summary = summarize(samples.rows, traffic.tally, args, exit_status)
    finally:
        samples.close()
        if cloud is not None and cloud.proc.poll() is None:
            stop_process(cloud.proc)
        shutil.rmtree(work, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for engine in (draft, target):
            if hasattr(engine, "close"):
                engine.close()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    report(summary)
    return summary


if __name__ == "__main__":
    try:
        sys.exit(0 if main()["ok"] else 1)
    except KeyboardInterrupt:
        print("soak: interrupted; the cloud is stopped, samples so far are in the results folder", file=sys.stderr)
        sys.exit(130)
