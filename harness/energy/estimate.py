"""A labelled estimate where no counter exists: CPU-seconds of a role's processes x power per thread.

    E = cpu_s x tdp_w / hw_threads + static_w x wall_s

``cpu_s`` is the user + system CPU time the role's process tree spent in the window (the
process, its live descendants, and the children they already reaped). This is CodeCarbon's
"process" tracking mode, ``P = TDP x cpu_load% / n_cores / 100``, integrated exactly from
CPU-time counters instead of sampled load. Constants come from a flag, else the device
profile (``tdp_w``, ``hw_threads``, ``idle_w`` as the static power), else the defaults:
:data:`DEFAULT_W_PER_THREAD` per hardware thread (CodeCarbon's figure for a CPU missing from
its TDP table) and no static power.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from harness.energy.base import ABSENT, EnergyUnavailable, Meter

# CodeCarbon (3.x, codecarbon/core/cpu.py) logs "We will use the default power consumption
# of 4 W per thread" for a CPU it does not know; the same figure is used here.
DEFAULT_W_PER_THREAD = 4.0
DEFAULT_SOURCE = "default: 4 W per hardware thread (CodeCarbon's figure for an unknown CPU)"
MODEL = "E = cpu_s * tdp_w / hw_threads + static_w * wall_s"


def _proc_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``'s tree from /proc: utime+stime+cutime+cstime of it and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (ppid, seconds)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        # fields[0] is the state (stat field 3): ppid is field 4, utime..cstime fields 14-17
        stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    if pid not in stats:
        raise ProcessLookupError(pid)
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats[p][1]
        todo.extend(children.get(p, ()))
    return total


def process_tree_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process, its live descendants and their reaped children.

    Uses psutil when it is installed, else /proc. A descendant that exited and was reaped
    is counted through its parent's children times; one reaped outside the tree is lost.
    """
    pid = os.getpid() if pid is None else pid
    try:
        import psutil
    except ImportError:
        return _proc_cpu_seconds(pid)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess as exc:
        raise ProcessLookupError(pid) from exc
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuTimeMeter(Meter):
    """Estimated energy of a process tree from its CPU time (see the module docstring)."""

    name = "estimate"
    kind = "estimated"
    model = MODEL

    def __init__(self, role: str, pid: int | None = None, *, tdp_w: float | None = None,
                 hw_threads: int | None = None, static_w: float | None = None, constants_from: str | None = None,
                 cpu_seconds: Callable[[], float] | None = None, clock: Callable[[], float] = time.monotonic):
        super().__init__(role, clock)
        self.pid = os.getpid() if pid is None else pid
        threads = int(hw_threads or os.cpu_count() or 1)
        if tdp_w is None:
            tdp_w = DEFAULT_W_PER_THREAD * threads
            constants_from = "; ".join(x for x in (f"tdp_w: {DEFAULT_SOURCE}", constants_from) if x)
        self.cpu_seconds = cpu_seconds or (lambda: process_tree_cpu_seconds(self.pid))
        try:
            self.cpu_seconds()
        except (ProcessLookupError, OSError) as exc:
            raise EnergyUnavailable(f"cannot read the CPU time of process {self.pid} ({exc})", ABSENT) from exc
        self.source = f"estimate (CPU time of process {self.pid} and its children)"
        self.constants = {"tdp_w": float(tdp_w), "hw_threads": threads, "w_per_thread": float(tdp_w) / threads,
                          "static_w": float(static_w or 0.0), "constants_from": constants_from or "given",
                          "pid": self.pid}

    def _snapshot(self) -> float:
        return self.cpu_seconds()

    def _delta(self, s0, s1, seconds):
        cpu_s = max(0.0, s1 - s0)
        c = self.constants
        active = cpu_s * c["w_per_thread"]
        static = c["static_w"] * seconds
        return active + static, {"cpu_s": cpu_s, "wall_s": seconds, "active_j": active, "static_j": static}
