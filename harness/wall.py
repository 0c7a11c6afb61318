"""Wall mode: the cloud verifier and each edge drafter as separate OS processes.

:func:`run_wall` starts ``python -m harness.cloud_server`` (the target, the system's cloud
policy, the gRPC data plane and the FastAPI control plane), waits for its ready file and
``/healthz``, refuses a cloud whose vocabulary differs from the draft's (``/info``), starts
``clients`` edge processes (``python -m harness.edge_client``, requests split round-robin),
waits, reads their records, and always stops every process it started: on success, error,
timeout and Ctrl-C; SIGTERM first, SIGKILL after a grace period, each by its own pid (and
process group). The children also ask the kernel to SIGTERM them should this process die
without cleaning up (Linux ``PR_SET_PDEATHSIG``).

Where the machine allows, each process is pinned to its own cores: the cloud to the upper
half of the CPUs this process may use, the edges to the lower half (on 2 cores: cloud on
core 1, edges on core 0). llama.cpp engines then get as many threads as cores.

With ``link`` (a live :class:`netem.backends.Link`), the cloud process runs on the link's
cloud side and the edges on its edge side (``ip netns exec`` into each namespace for the
packet-level backends), and the edges reach the cloud's data plane through the link; the
harness keeps talking to the cloud's control plane from inside the cloud side. Without
one, both sides share loopback, unshaped.

Every run has its own shared token (``harness/transport/auth.py``), handed to the cloud and
the edges in their environment: the cloud refuses streams without it, and only the harness
(and the edges) can stop it.

Time is the wall clock (``time.monotonic()``: one clock for every process on this host,
whichever namespace it is in). The cloud records each forward pass its policy runs over
sessions in ``<workdir>/batches.jsonl`` (a :class:`BatchRecord` per line, on that one clock);
``run_wall`` reads them back once the cloud has stopped and hands them to ``on_batch``.
The helpers below are shared with the two process entry points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from harness.faults import LINK_FAULTS, PROCESS_FAULTS, Fault, process_faults, with_link_faults
from harness.pairs import FILELESS_ENGINES, PairSpec, ensure_pair, load_pair, vocab_fingerprint
from harness.transport.auth import TOKEN_ENV, new_token
from netem.tempdirs import owned_tempdir
from systems.api import GenerationRequest, get_system
from systems.records import BatchRecord, RequestRecord, RoundRecord
from systems.sampling import SamplingParams

PARENT_ENV = "SPECWAN_PARENT_PID"
REPO_ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 5.0
STARTUP_S = 600.0  # the most the cloud may take to load its model and serve, when the run has no timeout
BATCHES_FILE = "batches.jsonl"  # in the run's work folder, written by the cloud process


class WallRunError(RuntimeError):
    """A wall-mode run failed; ``records`` holds what finished (and the failed requests),
    ``batches`` the cloud's forward passes recorded before it stopped."""

    def __init__(self, message: str, records: Sequence[RequestRecord] = (), workdir: Path | None = None):
        super().__init__(message)
        self.records = list(records)
        self.workdir = workdir
        self.batches: list[BatchRecord] = []

    @property
    def failed(self) -> list[RequestRecord]:
        return [r for r in self.records if r.error]


# ---- helpers shared with the processes -------------------------------------------------------
def pin_to(cpus: Sequence[int] | None) -> bool:
    """Pin this process to ``cpus``; False (silently) where that is impossible."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, set(cpus))
        return True
    except (OSError, ValueError):
        return False


def die_with_parent() -> None:
    """When started by :func:`run_wall`: get SIGTERM if it dies; exit if it is gone already."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(parent):
        sys.exit("specwan: the harness that started this process is gone")


def parse_cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    return [int(c) for c in text.split(",") if c.strip()]


def open_role_engine(pair: PairSpec, role: str, path: Path | None):
    """Build the engine of one side of a pair (the other side is never loaded)."""
    from systems.engines import create_engine

    spec = pair.roles()[role]
    options = dict(spec.options)
    if spec.engine in FILELESS_ENGINES:
        options["role"] = role
    else:
        if path is None:
            raise RuntimeError(f"pair {pair.name!r}: no model file for the {role} ({spec.engine} engine)")
        options["model_path"] = str(path)
    if spec.engine == "llamacpp" and "n_threads" not in options and hasattr(os, "sched_getaffinity"):
        options["n_threads"] = len(os.sched_getaffinity(0))  # one thread per core we may use
    return create_engine(spec.engine, **options)


def ensure_role_model(pair: PairSpec, role: str) -> Path | None:
    """The verified model file of one side (fetched if needed), None for a file-less engine."""
    from harness.models import ensure_model

    spec = pair.roles()[role]
    return ensure_model(spec, progress=False) if spec.needs_file else None


def request_to_json(req: GenerationRequest) -> dict:
    d = dataclasses.asdict(req)
    d["stop_ids"] = list(req.stop_ids)
    return d


def request_from_json(d: dict) -> GenerationRequest:
    d = dict(d)
    d["sampling"] = SamplingParams(**(d.get("sampling") or {}))
    d["stop_ids"] = tuple(d.get("stop_ids") or ())
    return GenerationRequest(**d)


def _plain(o):
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def record_to_json(rec: RequestRecord) -> str:
    return json.dumps(dataclasses.asdict(rec), default=_plain)


_RECORD_FIELDS = {f.name for f in dataclasses.fields(RequestRecord)}
_ROUND_FIELDS = {f.name for f in dataclasses.fields(RoundRecord)}


def record_from_json(text: str) -> RequestRecord:
    d = json.loads(text)
    rounds = [RoundRecord(**{k: v for k, v in r.items() if k in _ROUND_FIELDS}) for r in d.get("rounds", [])]
    d = {k: v for k, v in d.items() if k in _RECORD_FIELDS}
    d["rounds"] = rounds
    return RequestRecord(**d)


def batch_to_json(rec: BatchRecord) -> str:
    """One batch record as a JSON line's text (:meth:`BatchRecord.as_row`)."""
    return json.dumps(rec.as_row(), default=_plain)


_BATCH_FIELDS = {f.name for f in dataclasses.fields(BatchRecord)}


def read_batches(path: Path) -> list[BatchRecord]:
    """The batch records in a cloud's batches file, in the order it ran them; a torn last
    line (the cloud killed mid-write) is skipped, and so, with a warning, is any other
    line that is not a record."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for n, line in enumerate(lines[:-1], 1):  # lines[-1]: after the last newline, "" unless torn
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(BatchRecord(**{k: v for k, v in row.items() if k in _BATCH_FIELDS}))
        except (ValueError, TypeError) as exc:
            warnings.warn(f"{path}:{n}: not a batch record ({exc}); skipped", RuntimeWarning, stacklevel=2)
    return out


def read_records(path: Path) -> list[RequestRecord]:
    """The records in an edge's output; a torn last line (a crash mid-write) is skipped."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(record_from_json(line))
        except (ValueError, TypeError):
            continue
    return out


def cpu_plan(clients: int) -> tuple[list[int] | None, list[list[int] | None]]:
    """Cores for the cloud and for each edge: the cloud gets the upper half, the edges the lower."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, [None] * clients
    if len(cpus) < 2:
        return None, [None] * clients
    half = len(cpus) // 2
    cloud, edge = cpus[half:], cpus[:half]
    if clients <= len(edge):
        per = len(edge) // clients
        return cloud, [edge[i * per : (i + 1) * per] for i in range(clients)]
    return cloud, [edge] * clients


class WallCompute:
    """Model work for a wall-mode process: on one worker thread, so the event loop keeps
    serving the link (and stamps arrivals on time) while a model runs.

    A hand-off to the thread and back costs two context switches (about 0.1-0.2 ms on a busy
    2-core machine, paid per op). Work that took less than ``inline_below_s`` the last time
    an op of the same shape ran is cheaper than that and runs on the loop itself, delaying
    the loop by no more than that; prefills always go to the thread. With real models every
    op takes milliseconds and goes to the thread; with the toy engine most run inline.
    """

    def __init__(self, inline_below_s: float = 0.5e-3):
        from concurrent.futures import ThreadPoolExecutor

        self.inline_below_s = inline_below_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._last: dict[tuple, float] = {}
        self.inline = self.threaded = 0

    @staticmethod
    def _timed(fn):
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0

    async def run(self, op, fn):
        import asyncio

        key = (op.kind, op.tokens, op.batch)
        last = self._last.get(key)
        if op.kind != "prefill" and last is not None and last < self.inline_below_s:
            self.inline += 1
            result, seconds = self._timed(fn)
            self._last[key] = seconds
            await asyncio.sleep(0)  # let the loop see what arrived meanwhile
            return result
        self.threaded += 1
        result, seconds = await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn)
        self._last[key] = seconds
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- processes -------------------------------------------------------------------------------
@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + t for t in text[-lines:])


@dataclass
class WallRun:
    """What :func:`run_wall` started, handed to ``on_start`` (tests use it to inject faults)."""

    workdir: Path
    cloud: Child | None
    edges: list[Child]
    grpc_port: int | None = None
    link: Any = None  # the netem Link both sides are joined by (None: plain loopback)
    http_port: int | None = None
    outputs: list[Path] = field(default_factory=list)
    energy: dict | None = None  # the cloud process's whole-run energy reading, once stopped
    batches: list[BatchRecord] = field(default_factory=list)  # the cloud's passes, once it stopped
    read_upto: dict[Path, int] = field(default_factory=dict)  # bytes of each edge's output already passed on
    on_record: Callable[[RequestRecord], None] | None = None
    token: str = field(default_factory=new_token, repr=False)  # this run's shared token (auth.py)
    cloud_args: list[str] = field(default_factory=list)  # how the cloud was started (a restart reuses them)
    faults_fired: list[dict] = field(default_factory=list)  # each injected fault, with when it acted
    fault_origin: float | None = None  # time.monotonic() of fault time zero (every edge connected)

    def pass_on_new_records(self) -> None:
        """Hand each request record an edge has finished writing since the last call to
        ``on_record`` (complete lines only; a line being written waits for the next call)."""
        if self.on_record is None:
            return
        for path in self.outputs:
            try:
                with open(path, "rb") as f:
                    f.seek(self.read_upto.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            self.read_upto[path] = self.read_upto.get(path, 0) + end
            for line in data[:end].decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    try:
                        record = record_from_json(line)
                    except (ValueError, TypeError):
                        continue
                    self.on_record(record)

    def http(self, path: str, method: str = "GET", timeout: float = 2.0) -> Any:
        """Ask the cloud's control plane (from inside the cloud's side of the link)."""
        import contextlib

        host = self.link.cloud_bind if self.link is not None else "127.0.0.1"
        with self.link.entered("cloud") if self.link is not None else contextlib.nullcontext():
            return _http(self.http_port, path, method, timeout, host=host, token=self.token)

    @property
    def children(self) -> list[Child]:
        return ([self.cloud] if self.cloud else []) + self.edges


def _spawn(name: str, module: str, args: list[str], workdir: Path, prefix: Sequence[str] = (),
           token: str | None = None) -> Child:
    log = workdir / f"{name}.log"
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    if token is not None:  # in the environment: a command line is readable by every local user
        env[TOKEN_ENV] = token
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "wb") as f:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT), start_new_session=True)
    return Child(name, proc, log)


def _signal(child: Child, sig: int) -> None:
    """Signal a child and its process group (it leads its own); never anything else."""
    for send in (lambda: os.killpg(child.pid, sig), lambda: os.kill(child.pid, sig)):
        try:
            send()
        except (ProcessLookupError, PermissionError):
            pass


def stop_children(children: Sequence[Child], grace_s: float = GRACE_S) -> None:
    """SIGTERM each live child, SIGKILL what is left after ``grace_s``; reap them all."""
    live = [c for c in children if c.alive()]
    for c in live:
        _signal(c, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for c in live:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for c in children:
        if c.alive():
            _signal(c, signal.SIGKILL)
        try:
            c.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal(c, signal.SIGKILL)  # stragglers in its group, if it ever had any
    left = [f"{c.name} (pid {c.pid})" for c in children if c.proc.returncode is None]
    if left:
        raise WallRunError(f"could not stop: {', '.join(left)}")


def _http(port: int, path: str, method: str = "GET", timeout: float = 2.0, host: str = "127.0.0.1",
          token: str | None = None) -> Any:
    body = json.dumps({"token": token or ""}).encode() if method == "POST" else None
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method, data=body,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _draft_fingerprint(pair: PairSpec, paths: dict) -> str:
    fp = vocab_fingerprint(paths.get("draft"))
    if fp is not None:
        return fp
    engine = open_role_engine(pair, "draft", paths.get("draft"))
    try:
        return engine.info.vocab_fingerprint
    finally:
        if hasattr(engine, "close"):
            engine.close()


# ---- the run ---------------------------------------------------------------------------------
def run_wall(
    system: str,
    pair: str | os.PathLike | PairSpec,
    requests: Sequence[GenerationRequest],
    config: dict | None = None,
    clients: int = 1,
    timeout_s: float | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    pin: bool = True,
    q_dtype: str = "float32",
    on_start: Callable[[WallRun], None] | None = None,
    on_record: Callable[[RequestRecord], None] | None = None,
    link=None,
    on_batch: Callable[[BatchRecord], None] | None = None,
    liveness_timeout_s: float | None = None,
    on_cloud_lost: str = "fail",
    retry_within_s: float = 30.0,
    faults: Sequence[Fault] = (),
) -> list[RequestRecord]:
    """Serve ``requests`` with a system across real processes on this host; one record per request.

    ``pair`` is a pair name, a pair YAML file, or a :class:`PairSpec` read from one.
    ``timeout_s`` bounds the whole run (start-up included; None: no bound, start-up alone
    bounded by :data:`STARTUP_S`). ``liveness_timeout_s``: the edges ping the cloud and count
    it as stopped when a ping goes that long unanswered (None: no pings); ``on_cloud_lost`` and
    ``retry_within_s``: what an edge then does (:func:`harness.edge_client.run_edge`).
    ``faults`` (:mod:`harness.faults`) act at their ``at_s`` after every edge has connected:
    the link faults go into ``link``'s trace then, the cloud-process faults are fired on
    schedule (:class:`FaultInjector`). What fired, and when, is in
    :attr:`WallRun.faults_fired`. ``workdir`` keeps the request
    files, the edges' JSON-lines outputs and every process's log (a temporary folder by
    default, removed after the run unless edges ran and it failed). ``on_start`` is
    called once every process is up. ``on_record`` gets each request's record as soon as its
    edge has written it (failed requests included), while the run goes on. ``link`` (a live
    :class:`netem.backends.Link`) places the cloud and the edges on its two sides (default:
    both on loopback). Raises :class:`WallRunError` (with the records of the requests that
    finished, and of the failed ones) when anything fails.

    The cloud's forward passes over sessions (:class:`BatchRecord`, times on this host's
    monotonic clock, like the rounds') are read back once every process has stopped, kept
    in :attr:`WallRun.batches` (and :attr:`WallRunError.batches`) and passed to ``on_batch``
    one by one, in the order the cloud ran them, before ``run_wall`` returns or raises
    :class:`WallRunError`: a failed run delivers the passes recorded before it failed.
    """
    spec = get_system(system)
    spec.make_config(config)  # a bad config fails here, before any process starts
    if any(f.kind in LINK_FAULTS for f in faults) and link is None:
        raise ValueError("link faults (outage, bandwidth_collapse) need an emulated link: run with a shaped "
                         "network (network.backend tun or relay)")
    if any(f.kind in PROCESS_FAULTS for f in faults) and spec.cloud_cls is None:
        raise ValueError(f"cloud faults need a cloud process; {spec.name} has none")
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    pair_spec = pair if isinstance(pair, PairSpec) else load_pair(pair)
    if pair_spec.origin is None:
        raise ValueError("run_wall needs a pair read from a file (its processes load it by path)")
    pair_arg = str(Path(pair_spec.origin).resolve())  # the children run in the repository root
    requests = list(requests)
    clients = max(1, min(clients, len(requests) or 1))
    paths = ensure_pair(pair_spec, progress=False)  # fetch once, here, not in every child
    draft_fp = _draft_fingerprint(pair_spec, paths)

    own_dir = workdir is None
    work = owned_tempdir("specwan-wall-") if own_dir else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    cloud_cpus, edge_cpus = cpu_plan(clients) if pin else (None, [None] * clients)
    common = ["--pair", pair_arg, "--system", spec.name, "--config", json.dumps(config or {})]
    run = WallRun(work, None, [], link=link, on_record=on_record)
    deadline = time.monotonic() + (timeout_s if timeout_s is not None else STARTUP_S)
    ok = delivered = False
    try:
        try:
            cloud_meter = None
            if spec.cloud_cls is not None:
                _start_cloud(run, common, cloud_cpus, deadline, spec.name, draft_fp)
                cloud_meter = _begin_cloud_energy(run)
            for i in range(clients):
                mine = requests[i::clients]
                req_file, out = work / f"edge{i}.requests.jsonl", work / f"edge{i}.jsonl"
                req_file.write_text("".join(json.dumps(request_to_json(r)) + "\n" for r in mine))
                out.unlink(missing_ok=True)
                args = [*common, "--requests", str(req_file), "--out", str(out), "--device", f"c{i}",
                        "--q-dtype", q_dtype, "--on-cloud-lost", on_cloud_lost, "--retry-within", repr(retry_within_s)]
                if liveness_timeout_s is not None:
                    args += ["--liveness-timeout", repr(liveness_timeout_s)]
                if run.grpc_port is not None:
                    host, port = link.endpoint(run.grpc_port) if link is not None else ("127.0.0.1", run.grpc_port)
                    args += ["--grpc", f"{host}:{port}"]
                if edge_cpus[i]:
                    args += ["--cpus", ",".join(map(str, edge_cpus[i]))]
                run.edges.append(_spawn(f"edge{i}", "harness.edge_client", args, work,
                                        link.prefix("edge") if link is not None else (), token=run.token))
                run.outputs.append(out)
            if on_start is not None:
                on_start(run)
            if timeout_s is None:
                deadline = float("inf")
            injector = FaultInjector(run, faults, clients, deadline_s=STARTUP_S)
            try:
                problems = _wait_edges(run, deadline, timeout_s, injector)
            finally:
                injector.stop()
            records = [r for out in run.outputs for r in read_records(out)]
            if cloud_meter is not None:
                try:
                    reading = cloud_meter.end("run")
                    run.energy = {"cloud_run": reading.as_dict(), "cloud_meter": cloud_meter.describe()}
                except (OSError, RuntimeError) as exc:  # the cloud died: nothing left to read
                    why = f"the cloud process could not be read ({exc!r})"
                    if any(f.get("kind") == "cloud_kill" for f in run.faults_fired):
                        why += "; a cloud_kill fault ended the process it metered"
                    run.energy = {"cloud_run": None, "reason": why}
            if not problems and not injector.killed_for_good:
                problems = _stop_cloud(run)
            finished = sum(1 for r in records if not r.error)
            failed = [r for r in records if r.error]
            if failed and not problems:
                problems = ["an edge recorded a failed request"]
            if problems or finished < len(requests):
                lines = [f"wall run of {spec.name} failed: " + "; ".join(problems or ["requests are missing"])]
                for r in failed:
                    lines.append(f"  request {r.request_id!r} failed after {r.n_tokens} tokens: {r.error}")
                lines.append(f"  {finished} of {len(requests)} requests finished, {len(failed)} failed, "
                             f"{len(requests) - finished - len(failed)} not run")
                lines.append(f"  logs and records: {work}")
                raise WallRunError("\n".join(lines), _ordered(records, requests), work)
            ok = True
            result = _ordered(records, requests)
        finally:
            stop_children(run.children)
        delivered = True
        _deliver_batches(run, on_batch)
        return result
    except WallRunError as exc:
        if not delivered:
            delivered = True
            try:
                _deliver_batches(run, on_batch)
            except Exception as cb_exc:  # the run's failure stays the error raised
                exc.add_note(f"while delivering the cloud's batch records: {type(cb_exc).__name__}: {cb_exc}")
            exc.batches = run.batches
        raise
    finally:
        if own_dir and (ok or not run.edges):  # keep a failed run's records and logs
            shutil.rmtree(work, ignore_errors=True)


def _deliver_batches(run: WallRun, on_batch: Callable[[BatchRecord], None] | None) -> None:
    """Read the stopped cloud's batch records into ``run.batches``; pass each to ``on_batch``."""
    run.batches = read_batches(run.workdir / BATCHES_FILE) if run.cloud is not None else []
    if on_batch is not None:
        for rec in run.batches:
            on_batch(rec)


def _begin_cloud_energy(run: WallRun):
    """Meter the cloud process over the whole run (energy=auto: NVML, RAPL, else CPU time)."""
    from harness.energy.select import select_meter

    meter = select_meter("cloud", "auto", pid=run.cloud.proc.pid)
    meter.begin("run")
    return meter


def _start_cloud(run: WallRun, common: list[str], cpus, deadline: float, system: str, draft_fp: str) -> None:
    batches = run.workdir / BATCHES_FILE
    batches.unlink(missing_ok=True)  # the cloud appends: a reused folder must not mix runs
    args = [*common, "--ready-file", str(run.workdir / "cloud.ready.json"), "--batches", str(batches)]
    if run.link is not None:
        args += ["--host", run.link.cloud_bind]
    if cpus:
        args += ["--cpus", ",".join(map(str, cpus))]
    run.cloud_args = args
    _launch_cloud(run, ["--grpc-port", "0", "--http-port", "0"], deadline)
    about = run.http("/info")
    if about.get("system") != system:
        raise WallRunError(f"the cloud serves system {about.get('system')!r}, not {system!r}", workdir=run.workdir)
    if about.get("vocab_fingerprint") != draft_fp:
        raise WallRunError(
            f"refusing to run: the cloud's target vocabulary ({about.get('model')}: "
            f"{about.get('vocab_fingerprint')}) differs from the draft's ({draft_fp}); "
            "speculative decoding needs one shared vocabulary", workdir=run.workdir)


def restart_cloud(run: WallRun, deadline: float) -> None:
    """Start the cloud again after it died, on the same ports (the edges reconnect to them)."""
    _launch_cloud(run, ["--grpc-port", str(run.grpc_port), "--http-port", str(run.http_port)], deadline)


def _launch_cloud(run: WallRun, ports: list[str], deadline: float) -> None:
    """Start the cloud process with ``run.cloud_args`` and ``ports``; wait until it serves."""
    ready = run.workdir / "cloud.ready.json"
    ready.unlink(missing_ok=True)
    run.cloud = cloud = _spawn("cloud", "harness.cloud_server", [*run.cloud_args, *ports], run.workdir,
                               run.link.prefix("cloud") if run.link is not None else (), token=run.token)
    info = None
    while info is None:
        if not cloud.alive():
            raise WallRunError(f"the cloud process exited with code {cloud.proc.returncode} while starting:\n"
                               f"{cloud.tail()}", workdir=run.workdir)
        if time.monotonic() > deadline:
            raise WallRunError(f"the cloud process did not become ready in time:\n{cloud.tail()}",
                               workdir=run.workdir)
        if ready.is_file():
            try:
                info = json.loads(ready.read_text())
            except ValueError:
                info = None  # written atomically, but be safe
        if info is None:
            time.sleep(0.05)
    run.grpc_port, run.http_port = int(info["grpc_port"]), int(info["http_port"])
    while True:
        try:
            if run.http("/healthz").get("status") == "ok":
                break
        except (OSError, ValueError):
            pass
        if not cloud.alive() or time.monotonic() > deadline:
            raise WallRunError(f"the cloud's /healthz did not answer ok:\n{cloud.tail()}", workdir=run.workdir)
        time.sleep(0.05)


class FaultInjector:
    """Fires a wall run's faults on schedule (:mod:`harness.faults`), each recorded in
    ``run.faults_fired`` with its times in seconds after every edge had connected to the cloud
    (fault time zero, :attr:`started`: in virtual time, the start of serving).

    Link faults are written into the live link's trace then. The cloud-process faults
    act when :meth:`poll` finds them due (the run's wait loop calls it, on the main thread:
    a process started from another thread would be killed when that thread ends, by the
    parent-death signal): ``cloud_stall`` stops the cloud (SIGSTOP) and resumes it,
    ``cloud_kill`` kills it (SIGKILL) and starts it again on the same ports. While the cloud
    is down on purpose, :attr:`planned_down` is set, so the run does not take it for a crash.
    """

    def __init__(self, run: WallRun, faults: Sequence[Fault], n_edges: int, deadline_s: float):
        self.run, self.n_edges, self.deadline_s = run, n_edges, deadline_s
        self.started: float | None = None  # when every edge had its stream open: fault time zero
        self.planned_down = False
        self.killed_for_good = False
        self.error: str | None = None
        self._link_faults = [f for f in faults if f.kind in LINK_FAULTS]
        # (due, order, action, fault, entry): what to do next, in time order
        self._due = [(f.at_s, i, "fire", f, None) for i, f in enumerate(process_faults(list(faults)))]
        self._stalled: Child | None = None
        self._asked = 0.0
        if not faults:
            self.started = time.monotonic()

    def _serving(self) -> bool:
        """Whether every edge has connected (asked of the cloud's /stats every 0.1 s)."""
        if self.run.cloud is None:
            return True
        now = time.monotonic()
        if now - self._asked < 0.1:
            return False
        self._asked = now
        try:
            return int(self.run.http("/stats").get("streams_total", 0)) >= self.n_edges
        except (OSError, ValueError):
            return False

    def _begin(self) -> None:
        self.started = self.run.fault_origin = time.monotonic()
        if self._link_faults:
            offset = self.started - self.run.link.origin  # the trace counts from the link's start
            shifted = [dataclasses.replace(f, at_s=f.at_s + offset) for f in self._link_faults]
            self.run.link.apply_profile(with_link_faults(self.run.link.profile, shifted))
            for f in self._link_faults:
                self.run.faults_fired.append({**f.describe(), "fired_s": f.at_s, "ended_s": f.at_s + f.for_s,
                                              "how": f"the {self.run.link.backend} link's trace"})

    def _now(self) -> float:
        return time.monotonic() - self.started

    def poll(self) -> None:
        """Do whatever is due by now."""
        if self.started is None:
            if not self._serving():
                return
            self._begin()
        while self._due and self._due[0][0] <= self._now() and self.error is None:
            _, order, action, fault, entry = self._due.pop(0)
            try:
                self._act(order, action, fault, entry)
            except WallRunError as exc:
                self.error = f"fault {fault.kind}: {exc}"
                self.planned_down = False
            self._due.sort(key=lambda d: (d[0], d[1]))

    def _act(self, order: int, action: str, f: Fault, entry: dict | None) -> None:
        cloud = self.run.cloud
        now = round(self._now(), 4)
        if action == "fire":
            entry = {**f.describe(), "fired_s": now, "pid": cloud.pid}
            self.run.faults_fired.append(entry)
            self.planned_down = True
            if f.kind == "cloud_stall":
                _signal(cloud, signal.SIGSTOP)
                self._stalled = cloud
                self._due.append((f.at_s + f.for_s, order, "resume", f, entry))
                return
            _signal(cloud, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                cloud.proc.wait(timeout=GRACE_S)
            entry["killed_s"] = round(self._now(), 4)
            if f.restart_after_s is None:
                self.killed_for_good = True
            else:
                self._due.append((entry["killed_s"] + f.restart_after_s, order, "restart", f, entry))
        elif action == "resume":
            _signal(cloud, signal.SIGCONT)
            self._stalled = None
            entry["ended_s"] = now
            self.planned_down = False
        elif action == "restart":
            restart_cloud(self.run, time.monotonic() + self.deadline_s)
            entry["restarted_s"] = round(self._now(), 4)
            entry["new_pid"] = self.run.cloud.pid
            self.planned_down = False

    def stop(self) -> None:
        """Fire nothing more; a stalled cloud is resumed."""
        self._due.clear()
        if self._stalled is not None:
            _signal(self._stalled, signal.SIGCONT)
            self._stalled = None


def _wait_edges(run: WallRun, deadline: float, timeout_s: float | None,
                injector: FaultInjector | None = None) -> list[str]:
    """Wait for every edge to exit; what went wrong, as sentences."""
    problems: list[str] = []
    cloud_gone_at = None
    while any(e.alive() for e in run.edges):
        now = time.monotonic()
        if now > deadline:
            problems.append(f"timed out after {timeout_s:g} s (wall.timeout_s)")
            break
        if injector is not None:
            injector.poll()
        planned = injector is not None and (injector.planned_down or injector.killed_for_good)
        if run.cloud is not None and not run.cloud.alive() and not planned:
            if cloud_gone_at is None:
                cloud_gone_at = now
            elif now - cloud_gone_at > GRACE_S:  # the edges should have noticed by now
                break
        else:
            cloud_gone_at = None
        run.pass_on_new_records()
        time.sleep(0.02)
    run.pass_on_new_records()
    if injector is not None and injector.error:
        problems.append(injector.error)
    killed_on_purpose = injector is not None and injector.killed_for_good
    if run.cloud is not None and not run.cloud.alive() and not killed_on_purpose:
        code = run.cloud.proc.returncode
        how = exit_reason(code)
        problems.insert(0, f"the cloud process (pid {run.cloud.pid}) {how} while requests were in flight")
        if code > 0:
            problems.append("cloud log:\n" + run.cloud.tail())
    for e in run.edges:
        code = e.proc.poll()
        if code is None:
            problems.append(f"{e.name} (pid {e.pid}) did not finish")
        elif code != 0:
            said = [t for t in e.tail(50).splitlines() if t.strip().startswith("edge_client")]
            log = said[-1].strip() if said else e.tail(8)
            problems.append(f"{e.name} (pid {e.pid}) {exit_reason(code)}" + (f": {log}" if said else
                                                                              f"; its log ends:\n{log}" if log else
                                                                              " (its log is empty)"))
    return problems


def exit_reason(code: int) -> str:
    """How a child process ended, in words: "was killed by SIGKILL (signal 9)" or "exited with code 3"."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by {name} (signal {-code})"
    return f"exited with code {code}"


def _stop_cloud(run: WallRun) -> list[str]:
    """Ask the cloud to shut down (it was healthy to the end); problems if it does not."""
    if run.cloud is None:
        return []
    try:
        run.http("/shutdown", method="POST")
    except (OSError, ValueError):
        pass
    try:
        code = run.cloud.proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        return []  # stop_children will terminate it
    if code != 0:
        return [f"the cloud process exited with code {code}:\n{run.cloud.tail()}"]
    return []


def _ordered(records: Sequence[RequestRecord], requests: Sequence[GenerationRequest]) -> list[RequestRecord]:
    index = {r.request_id: i for i, r in enumerate(requests)}
    return sorted(records, key=lambda r: index.get(r.request_id, len(index)))
