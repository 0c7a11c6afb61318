"""Arrival processes for multi-client runs: when each request is issued.

- :class:`ClosedLoop`: ``clients`` clients, each issuing its next request when its previous
  one finishes (plus an optional think time). Load follows service time.
- :class:`Poisson`: open loop, exponential inter-arrival times at ``rate`` requests/s.
- :class:`Gamma`: open loop, gamma inter-arrival times with mean ``1/rate`` and shape
  ``1/burstiness``, as in vLLM's serving benchmark: burstiness 1 is Poisson, below 1 is
  more regular, above 1 is burstier (the coefficient of variation is ``sqrt(burstiness)``).
- :class:`Replay`: open loop, the timestamps of a trace file.

Open-loop processes give their arrival times with ``times(n)`` (seconds from the start,
seeded: the same seed gives the same times). :func:`dispatch` drives either kind on an
asyncio loop (wall-clock or virtual time). :func:`arrival_process` builds one from a config
mapping such as ``{kind: gamma, rate: 4.0, burstiness: 2.0, seed: 0}``.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


class ArrivalError(ValueError):
    """An arrival process is misconfigured, or its trace file is malformed (the line is named)."""


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ArrivalError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ClosedLoop:
    """``clients`` concurrent clients; each sends its next request ``think_time_s`` after the last one ends."""

    clients: int
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 1:
            raise ArrivalError(f"closed loop: clients must be a positive integer, got {self.clients!r}")
        if not isinstance(self.think_time_s, (int, float)) or self.think_time_s < 0:
            raise ArrivalError(f"closed loop: think_time_s must be >= 0, got {self.think_time_s!r}")

    def schedule(self, service_times: Sequence[float]) -> list[tuple[float, int]]:
        """(start time, client) of each request, in order, given each request's service time."""
        free = [(0.0, c) for c in range(self.clients)]  # (time the client is ready, client)
        out = []
        for s in service_times:
            free.sort()
            ready, client = free.pop(0)
            out.append((ready, client))
            free.append((ready + float(s) + self.think_time_s, client))
        return out


@dataclass(frozen=True)
class Poisson:
    """Open loop: a Poisson process of ``rate`` requests per second."""

    rate: float
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self.rate, "poisson: rate")

    def intervals(self, n: int) -> np.ndarray:
        return np.random.default_rng(self.seed).exponential(1.0 / self.rate, size=n)

    def times(self, n: int) -> np.ndarray:
        """The first arrival at 0, then cumulative inter-arrival times."""
        return _times(self.intervals(n))


@dataclass(frozen=True)
class Gamma:
    """Open loop: gamma inter-arrival times, mean ``1/rate``, shape ``1/burstiness`` (vLLM's knob)."""

    rate: float
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self.rate, "gamma: rate")
        _positive(self.burstiness, "gamma: burstiness")

    @property
    def shape(self) -> float:
        return 1.0 / self.burstiness

    @property
    def scale(self) -> float:
        return 1.0 / (self.rate * self.shape)  # mean = shape * scale = 1 / rate

    def intervals(self, n: int) -> np.ndarray:
        return np.random.default_rng(self.seed).gamma(self.shape, self.scale, size=n)

    def times(self, n: int) -> np.ndarray:
        return _times(self.intervals(n))


@dataclass(frozen=True)
class Replay:
    """Open loop: arrival times from a trace (seconds, made relative to the first one)."""

    timestamps: tuple[float, ...]
    speed: float = 1.0  # 2.0 replays twice as fast

    def __post_init__(self) -> None:
        if not self.timestamps:
            raise ArrivalError("replay: the trace holds no timestamps")
        _positive(self.speed, "replay: speed")

    @classmethod
    def from_file(cls, path: str | Path, speed: float = 1.0) -> "Replay":
        return cls(tuple(read_timestamps(path)), speed)

    def times(self, n: int | None = None) -> np.ndarray:
        t = np.asarray(self.timestamps, dtype=float)
        if n is not None:
            if n > len(t):
                raise ArrivalError(f"replay: the trace has {len(t)} timestamps, {n} requests asked for")
            t = t[:n]
        return (t - t[0]) / self.speed


def _times(intervals: np.ndarray) -> np.ndarray:
    if len(intervals) == 0:
        return intervals
    return np.concatenate([[0.0], np.cumsum(intervals[:-1])])


def read_timestamps(path: str | Path) -> list[float]:
    """Timestamps from a trace file: one number a line (``#`` comments and blank lines skipped),
    or JSON Lines objects with a ``timestamp`` (or ``time``/``t``) field, or one JSON array.
    Timestamps must not decrease; a bad line is reported by its number."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ArrivalError(f"replay: cannot read trace file {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArrivalError(f"replay: {path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        entries = [(1, v) for v in values]
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ArrivalError(f"replay: {path}: line {number}: not valid JSON ({e.msg})") from None
                value = next((obj[k] for k in ("timestamp", "time", "t") if k in obj), None)
                if value is None:
                    raise ArrivalError(f"replay: {path}: line {number}: no 'timestamp' field")
            else:
                value = line.split(",")[0].strip()
            entries.append((number, value))
    out: list[float] = []
    for number, value in entries:
        try:
            t = float(value)
        except (TypeError, ValueError):
            raise ArrivalError(f"replay: {path}: line {number}: {value!r} is not a number") from None
        if not math.isfinite(t):
            raise ArrivalError(f"replay: {path}: line {number}: {value!r} is not a finite number")
        if out and t < out[-1]:
            raise ArrivalError(f"replay: {path}: line {number}: timestamp {t} is earlier than the one before "
                               f"({out[-1]}); a trace must not go back in time")
        out.append(t)
    if not out:
        raise ArrivalError(f"replay: {path} holds no timestamps")
    return out


ArrivalProcess = ClosedLoop | Poisson | Gamma | Replay


def arrival_process(config: Mapping[str, Any]) -> ArrivalProcess:
    """An arrival process from a mapping: ``kind`` (closed, poisson, gamma, replay) and its fields."""
    data = dict(config)
    kind = data.pop("kind", None)
    if kind == "closed":
        process: ArrivalProcess = ClosedLoop(data.pop("clients", 1), data.pop("think_time_s", 0.0))
    elif kind == "poisson":
        process = Poisson(data.pop("rate", None), int(data.pop("seed", 0)))
    elif kind == "gamma":
        process = Gamma(data.pop("rate", None), data.pop("burstiness", 1.0), int(data.pop("seed", 0)))
    elif kind == "replay":
        if "path" not in data:
            raise ArrivalError("arrival replay needs a 'path' to a trace file")
        process = Replay.from_file(data.pop("path"), data.pop("speed", 1.0))
    else:
        raise ArrivalError(f"arrival kind {kind!r} is not one of closed, poisson, gamma, replay")
    if data:
        raise ArrivalError(f"arrival {kind}: unknown key(s) {', '.join(sorted(data))}")
    return process


async def dispatch(process: ArrivalProcess, items: Sequence[T], submit: Callable[[T], Awaitable[R]]) -> list[R]:
    """Issue ``items`` by the arrival process and await ``submit(item)`` for each; results in item order.

    Open loop: item i starts at ``times()[i]`` seconds after the call (on the running loop's
    clock, so it also works in virtual time), whether or not earlier ones have finished.
    Closed loop: ``clients`` workers take items in order, each starting its next one when its
    previous one finishes (after the think time).
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results: list[Any] = [None] * len(items)

    async def one(i: int, at: float) -> None:
        delay = t0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        results[i] = await submit(items[i])

    if isinstance(process, ClosedLoop):
        queue = iter(range(len(items)))

        async def client() -> None:
            first = True
            for i in queue:
                if not first and process.think_time_s:
                    await asyncio.sleep(process.think_time_s)
                first = False
                results[i] = await submit(items[i])

        await asyncio.gather(*(client() for _ in range(min(process.clients, len(items)))))
    else:
        times = process.times(len(items))
        await asyncio.gather(*(one(i, float(t)) for i, t in enumerate(times)))
    return results
