"""Devices that run model work for a role in one process: instantly, or priced by a profile."""

from __future__ import annotations

import asyncio
from typing import Callable, NamedTuple, TypeVar

from systems.api import Op

T = TypeVar("T")


class InstantCompute:
    """Runs work at once and charges no time (conformance runs, no clock of interest)."""

    async def run(self, op: Op, fn: Callable[[], T]) -> T:
        result = fn()
        await asyncio.sleep(0)
        return result


class Busy(NamedTuple):
    """One stretch of model work on a modelled device: when, and for which sessions."""

    start: float
    end: float
    sessions: tuple[str, ...] = ()  # empty when the policy did not say

    @property
    def seconds(self) -> float:
        return self.end - self.start


class ModelledCompute:
    """Runs work at once, then advances the clock by its modelled cost (virtual time).

    One device does one thing at a time: concurrent work queues on it. ``intervals`` keeps
    each stretch (:class:`Busy`, on the loop's clock) so energy can be attributed to requests
    and rounds (:mod:`harness.energy.virtual`).
    """

    def __init__(self, cost: Callable[[Op], float]):
        self.cost = cost
        self._lock: asyncio.Lock | None = None
        self.intervals: list[Busy] = []

    async def run(self, op: Op, fn: Callable[[], T]) -> T:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            result = fn()
            seconds = float(self.cost(op))
            start = asyncio.get_running_loop().time()
            self.intervals.append(Busy(start, start + seconds, tuple(op.sessions)))
            await asyncio.sleep(seconds)
            return result
