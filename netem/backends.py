"""Bringing a link up and down: the ``netem``, ``tun``, ``relay`` and ``none`` backends.

:func:`open_link` is the one entry point: it cleans up sets left by killed runs, chooses the
backend (:mod:`netem.kernel`), brings the link up and yields a :class:`Link`, and tears
down everything it made (processes by pid, namespaces by name, with their devices and
qdiscs) on exit, on error, on Ctrl-C and on SIGTERM.

Topologies (the same addresses in every link: each link has its own namespaces):

- ``netem``: namespaces ``<base>-edge`` and ``<base>-cloud`` joined by a veth pair
  (edge 10.251.0.1, cloud 10.251.0.2); on each end's egress a netem qdisc (half the RTT,
  jitter, loss) with a tbf child (that direction's rate). A trace changes the tbf rates.
- ``tun``: a TUN device in each namespace (edge 10.251.1.1, cloud 10.251.2.1) and the
  :mod:`netem.tunwire` process carrying packets between them.
- ``relay``: no namespaces; a :mod:`netem.relay` process per forwarded port on loopback.
- ``none``: plain loopback, unshaped.

In both namespaced backends TCP keeps its congestion window across idle periods
(``net.ipv4.tcp_slow_start_after_idle=0``, set in the run's own namespaces only), as a
long-lived stream such as gRPC's is usually tuned, and as the virtual link model assumes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from netem import kernel, ns
from netem.profile import NetworkProfile
from netem.tempdirs import owned_tempdir

LEVELS = {"netem": "packet-level (kernel qdiscs)", "tun": "packet-level (user-space TUN wire)",
          "relay": "stream-level: no handshake delay, no slow start, no packet loss",
          "none": "unshaped loopback"}
SYSCTLS = {"net.ipv4.tcp_slow_start_after_idle": "0"}
READY_S = 10.0


class LinkError(RuntimeError):
    """A link could not be brought up; the message says what failed."""


def _pdeathsig():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawn(module: str, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_pdeathsig)


def _wait_file(path: Path, proc: subprocess.Popen, log: Path, what: str) -> dict:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        if proc.poll() is not None:
            raise LinkError(f"{what} exited with code {proc.returncode}: {log.read_text(errors='replace').strip()}")
        time.sleep(0.01)
    raise LinkError(f"{what} did not become ready in {READY_S:g} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Link:
    """A live emulated link between an edge side and a cloud side.

    The cloud binds :attr:`cloud_bind`; an edge reaches a cloud port at :meth:`endpoint`.
    Processes start in a side with :meth:`prefix` (``ip netns exec NS``); this process opens
    sockets in a side inside :meth:`entered`.
    """

    backend = "none"
    cloud_bind = "127.0.0.1"

    def __init__(self, profile: NetworkProfile, why: str, workdir: Path):
        self.profile, self.why, self.workdir = profile, why, workdir
        # The trace's time zero (time.monotonic()); a backend that starts an emulator moves it
        # to the moment the link starts carrying packets, so its set-up does not eat the first step.
        self.origin = time.monotonic()
        self.namespaces: dict[str, str] = {}
        self._procs: list[tuple[subprocess.Popen, Path | None]] = []

    @property
    def level(self) -> str:
        return LEVELS[self.backend]

    def up(self) -> None:
        pass

    def endpoint(self, port: int) -> tuple[str, int]:
        return "127.0.0.1", port

    def prefix(self, side: str) -> list[str]:
        name = self.namespaces.get(side)
        return ["ip", "netns", "exec", name] if name else []

    def entered(self, side: str):
        return ns.entered(self.namespaces.get(side))

    def counters(self) -> dict | None:
        """The emulator's counters (packets, bytes, lost, queue drops per direction; its CPU time), summed."""
        stats = [self._read_stats(proc, path) for proc, path in self._procs if path is not None]
        stats = [s for s in stats if s]
        if not stats:
            return None
        out = {d: {k: sum(s[d][k] for s in stats) for k in stats[0][d]} for d in ("up", "down")}
        out["cpu_s"] = sum(s.get("cpu_s", 0.0) for s in stats)
        out["kind"] = "measured (the emulator's own counters)"
        return out

    def _read_stats(self, proc: subprocess.Popen, path: Path) -> dict | None:
        before = json.loads(path.read_text())["seq"] if path.is_file() else 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    data = json.loads(path.read_text())
                    if data["seq"] > before:
                        return data
                except (OSError, ValueError):
                    pass
                time.sleep(0.005)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def health(self) -> str:
        """The emulator processes' state, with the end of a dead one's log (for error messages)."""
        parts = []
        for proc, stats in self._procs:
            code = proc.poll()
            if code is None:
                parts.append(f"pid {proc.pid} running")
            else:
                log = stats.with_name(stats.name.replace(".stats.json", ".log")) if stats else None
                tail = log.read_text(errors="replace").strip()[-800:] if log and log.is_file() else ""
                parts.append(f"pid {proc.pid} exited with code {code}: {tail}")
        return "; ".join(parts) or "no emulator process"

    def describe(self) -> dict:
        return {"backend": self.backend, "level": self.level, "chosen": self.why, "namespaces": self.namespaces,
                "sysctls": SYSCTLS if self.namespaces else {},
                "emulator_pids": [p.pid for p, _ in self._procs],
                "emulator_priority": getattr(self, "emulator_priority", None)}

    def close(self) -> None:
        for proc, _ in self._procs:
            _stop(proc)
        for name in self.namespaces.values():
            ns.delete(name)

    @property
    def _profile_file(self) -> Path:
        return self.workdir / "profile.json"

    def apply_profile(self, profile: NetworkProfile) -> None:
        """Switch the live link to ``profile`` (its trace on this link's time origin): how
        faults reach a link that is already carrying traffic. The user-space emulators take
        it at once; the ``netem`` backend (kernel qdiscs following a trace from a thread) and
        an unshaped link cannot, and say so."""
        emulators = [proc for proc, _ in self._procs if proc.poll() is None]
        if self.backend not in ("tun", "relay"):
            raise LinkError(f"the {self.backend} link backend cannot change its profile while it runs: use "
                            "network.backend=tun or relay for faults on a live link")
        tmp = self._profile_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile.as_json()))
        os.replace(tmp, self._profile_file)
        self.profile = profile
        for proc in emulators:
            proc.send_signal(signal.SIGUSR2)

    def _start(self, module: str, args: list[str], what: str, ready_key: str) -> tuple[subprocess.Popen, dict]:
        n = len(self._procs)
        ready, stats, log = (self.workdir / f"{ready_key}{n}.{x}" for x in ("ready.json", "stats.json", "log"))
        args = [*args, "--reload", str(self._profile_file)]
        proc = _spawn(module, [*args, "--ready", str(ready), "--stats", str(stats)], log)
        self._procs.append((proc, stats))
        info = _wait_file(ready, proc, log, what)
        self.emulator_priority = info.get("priority")
        return proc, info


class _Namespaced(Link):
    def _make_namespaces(self) -> tuple[str, str]:
        edge, cloud = ns.names(ns.new_tag())
        for side, name in (("edge", edge), ("cloud", cloud)):
            ns.create(name)
            self.namespaces[side] = name
            for key, value in SYSCTLS.items():
                ns.sysctl(name, key, value)
        return edge, cloud


class TunLink(_Namespaced):
    """Packet-level link in user space: TUN devices in two namespaces, :mod:`netem.tunwire` between."""

    backend = "tun"
    cloud_bind = "10.251.2.1"
    edge_addr = "10.251.1.1"

    def up(self) -> None:
        edge, cloud = self._make_namespaces()
        for name, dev, addr, peer in ((edge, "swtun-e", self.edge_addr, "10.251.2.0/24"),
                                      (cloud, "swtun-c", self.cloud_bind, "10.251.1.0/24")):
            ns.ip("-n", name, "tuntap", "add", "mode", "tun", "name", dev)
            ns.ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            ns.ip("-n", name, "link", "set", dev, "up")
            ns.ip("-n", name, "route", "add", peer, "dev", dev)
        _, ready = self._start("netem.tunwire", ["--edge", f"{edge}:swtun-e", "--cloud", f"{cloud}:swtun-c",
                                                 "--profile", json.dumps(self.profile.as_json())],
                               "the TUN wire (python -m netem.tunwire)", "tunwire")
        self.origin = float(ready["origin"])

    def endpoint(self, port: int) -> tuple[str, int]:
        return self.cloud_bind, port


class NetemLink(_Namespaced):
    """Kernel path: veth between two namespaces, netem (delay, jitter, loss) + tbf (rate) on each egress."""

    backend = "netem"
    cloud_bind = "10.251.0.2"
    edge_addr = "10.251.0.1"

    def up(self) -> None:
        edge, cloud = self._make_namespaces()
        ns.ip("link", "add", "swve-e", "netns", edge, "type", "veth", "peer", "name", "swve-c", "netns", cloud)
        for name, dev, addr in ((edge, "swve-e", self.edge_addr), (cloud, "swve-c", self.cloud_bind)):
            ns.ip("-n", name, "addr", "add", f"{addr}/30", "dev", dev)
            ns.ip("-n", name, "link", "set", dev, "up")
        p = self.profile
        for name, dev, direction in ((edge, "swve-e", "up"), (cloud, "swve-c", "down")):
            cmd = ["qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{p.rtt_s * 5e5:.3f}ms"]
            if p.jitter_s:
                dist = "normal" if p.jitter_distribution == "normal" else "uniform"
                cmd += [f"{p.jitter_s * 1e3:.3f}ms", "distribution", dist] if dist == "normal" else \
                    [f"{p.jitter_s * 1e3 * 3 ** 0.5:.3f}ms"]
            if p.loss:
                cmd += ["loss", f"{p.loss * 100:.4f}%"]
            self._tc(name, *cmd, "limit", "100000")
            rate = p.rate(direction, 0.0)
            if rate is not None:
                self._tc(name, "qdisc", "add", "dev", dev, "parent", "1:", "handle", "2:", *self._tbf(rate))
        self.origin = time.monotonic()
        if p.trace is not None:
            threading.Thread(target=self._follow_trace, daemon=True, name="netem-trace").start()

    def _tbf(self, rate: float) -> list[str]:
        burst = max(32 * 1024, int(rate / 8 / 250))  # at least a 4 ms burst at high rates
        return ["tbf", "rate", f"{int(rate)}bit", "burst", str(burst), "latency", f"{self.profile.queue_s * 1e3:.0f}ms"]

    @staticmethod
    def _tc(name: str, *args: str) -> None:
        res = subprocess.run(["tc", "-n", name, *args], capture_output=True, text=True, timeout=20)
        if res.returncode != 0:
            raise LinkError(f"`tc -n {name} {' '.join(args)}` failed: {res.stderr.strip()}")

    def _follow_trace(self) -> None:
        for step in self.profile.trace.steps[1:]:
            time.sleep(max(0.0, self.origin + step.at_s - time.monotonic()))
            if not self.namespaces:
                return
            for side, dev, rate in (("edge", "swve-e", step.up_bps), ("cloud", "swve-c", step.down_bps)):
                if rate is not None and side in self.namespaces:
                    with contextlib.suppress(LinkError):
                        self._tc(self.namespaces[side], "qdisc", "change", "dev", dev, "parent", "1:",
                                 "handle", "2:", *self._tbf(max(rate, 8.0)))  # tbf has no rate 0

    def endpoint(self, port: int) -> tuple[str, int]:
        return self.cloud_bind, port

    def close(self) -> None:
        names, self.namespaces = dict(self.namespaces), {}
        for name in names.values():
            ns.delete(name)


class RelayLink(Link):
    """Stream-level link on loopback: one :mod:`netem.relay` process per forwarded cloud port."""

    backend = "relay"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._ports: dict[int, int] = {}

    def endpoint(self, port: int) -> tuple[str, int]:
        if port not in self._ports:
            _, ready = self._start("netem.relay", ["--target", f"127.0.0.1:{port}", "--profile",
                                                   json.dumps(self.profile.as_json()), "--origin", repr(self.origin)],
                                   "the relay (python -m netem.relay)", "relay")
            self._ports[port] = int(ready["port"])
        return "127.0.0.1", self._ports[port]


BACKEND_CLASSES = {"netem": NetemLink, "tun": TunLink, "relay": RelayLink, "none": Link}


@contextlib.contextmanager
def _sigterm_raises():
    """Within the body, SIGTERM unwinds like Ctrl-C (so teardown runs); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def open_link(profile: NetworkProfile, backend: str | None = None, workdir: str | os.PathLike | None = None):
    """Bring up ``profile`` on ``backend`` (default: the profile's ``backend``, usually auto); yield the :class:`Link`."""
    stale = ns.clean_stale() if os.geteuid() == 0 else []
    name, why = kernel.choose(backend or profile.backend, profile.shaped)
    own = workdir is None
    work = owned_tempdir("specwan-link-") if own else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    link = BACKEND_CLASSES[name](profile, why, work)
    link.stale_cleaned = stale
    with _sigterm_raises():
        try:
            link.up()
            yield link
        finally:
            try:
                link.close()
            finally:  # the folder goes even when closing the link fails
                if own:
                    import shutil

                    shutil.rmtree(work, ignore_errors=True)
