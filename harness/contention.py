"""Other busy processes on the cores the model engines use.

llama.cpp's threads wait on each other at every operation, so one unrelated process that
keeps a core busy slows a 2-thread decode on 2 cores many times over (measured: 11 tok/s
idle, 0.5-0.9 tok/s with one core taken). A run samples the machine before its model work,
says so when it is contended, and records the sample in its manifest, so a slow or noisy
figure can be told from a slow system.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import psutil

from harness.sysinfo import usable_cpus

DEFAULT_SAMPLE_S = 0.5
#: a process using at least this share of one core is listed as busy
BUSY_SHARE = 0.10
#: the other processes' total load, in cores, from which a run counts as contended
CONTENDED_CORES = 0.25


@dataclass
class ContentionSample:
    """CPU use of other processes over a short window, and the verdict for model work on these cores."""

    sampled_s: float
    usable_cores: int
    other_load_cores: float
    busy: list[dict[str, Any]] = field(default_factory=list)
    engine_threads: dict[str, int | None] = field(default_factory=dict)

    @property
    def contended(self) -> bool:
        return self.other_load_cores >= CONTENDED_CORES

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "contended": self.contended, "summary": self.summary(), "kind": "measured",
                "how": f"CPU time of every other process over {self.sampled_s:g} s (psutil)"}

    def summary(self) -> str:
        top = ", ".join(f"{b['name']} (pid {b['pid']}, {b['cpu_percent']:.0f}%)" for b in self.busy[:4])
        return (f"other processes kept {self.other_load_cores:.2f} of {self.usable_cores} usable cores busy"
                + (f": {top}" if top else ""))

    def warning(self) -> str | None:
        """One line for the start of a run, or None when the cores are quiet."""
        if not self.contended:
            return None
        threads = ", ".join(f"{role} {n}" for role, n in self.engine_threads.items() if n) or "the engines'"
        return (f"warning: contended machine: {self.summary()}. llama.cpp threads ({threads}) wait on each other, "
                "so measured model times are inflated; wall-clock figures from this run are not comparable "
                "(recorded in manifest.json under contention)")


def _own_tree() -> set[int]:
    me = psutil.Process()
    pids = {me.pid}
    try:
        pids.update(c.pid for c in me.children(recursive=True))
    except psutil.Error:
        pass
    return pids


def _command(p: psutil.Process, width: int = 80) -> str | None:
    try:
        text = " ".join(p.cmdline())
    except psutil.Error:
        return None
    return text if len(text) <= width else text[: width - 3] + "..."


def sample(seconds: float = DEFAULT_SAMPLE_S, exclude: Iterable[int] = (),
           engine_threads: dict[str, int | None] | None = None) -> ContentionSample:
    """Measure other processes' CPU use over ``seconds`` (this process and its children excluded)."""
    skip = _own_tree() | set(exclude)
    procs = []
    for p in psutil.process_iter(["pid", "name"]):
        if p.pid in skip:
            continue
        try:
            p.cpu_percent(None)  # the first call starts the window
            procs.append(p)
        except psutil.Error:
            continue
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    busy, total = [], 0.0
    for p in procs:
        try:
            pct = p.cpu_percent(None)
            name = p.info.get("name") or "?"
        except psutil.Error:
            continue
        total += pct
        if pct >= BUSY_SHARE * 100:
            busy.append({"pid": p.pid, "name": name, "cpu_percent": round(pct, 1), "command": _command(p)})
    busy.sort(key=lambda b: -b["cpu_percent"])
    return ContentionSample(round(elapsed, 3), usable_cpus(), round(total / 100.0, 3), busy, dict(engine_threads or {}))


def planned_threads(pair) -> dict[str, int | None]:
    """The threads each model of a :class:`harness.pairs.PairSpec` will use (engines' defaults: every core)."""
    from harness.pairs import FILELESS_ENGINES

    cores = os.cpu_count() or 1
    return {role: (None if spec.engine in FILELESS_ENGINES else int(spec.options.get("n_threads") or cores))
            for role, spec in pair.roles().items()}


def check_before_run(engine_threads: dict[str, int | None] | None = None, seconds: float = DEFAULT_SAMPLE_S,
                     say=print) -> dict[str, Any]:
    """Sample, print the warning if the machine is contended, and return the manifest entry."""
    s = sample(seconds, engine_threads=engine_threads)
    line = s.warning()
    if line and say:
        say(line)
    return s.as_dict()
