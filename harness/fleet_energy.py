"""Modelled energy for the fleet, streamed: each request's joules as it ends, from what its
devices did while it ran, with nothing kept once it is written.

The rules are :mod:`harness.energy.virtual`'s (:func:`attribute_run` prices the edge side and
the rounds); only the cloud's share is computed here, without keeping the cloud's busy
intervals: a pass is shared equally by the sessions it names, and idle cloud time by the
requests in flight on that verifier at that moment (a request is in flight from its arrival,
a wait for its busy device included, to its end), as :func:`attribute_run` shares them given
the whole run. :class:`CloudShares` integrates idle seconds per request in flight as time
passes (``phi``: idle seconds each request in flight has been given so far), so a request's
share is ``phi`` at its end minus ``phi`` at its arrival. It knows open-loop arrivals ahead
(each edge's arrival times, drawn as its edge draws them), so a request waiting for its device
counts from its arrival; a pass naming no session is shared by those in flight when it starts.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Callable, Hashable, Iterator

from harness.compute import Busy
from harness.energy.virtual import VirtualEnergy, attribute_run


class CloudShares:
    """One verifier's busy and idle seconds, attributed to the requests it serves as it goes.
    A request is known by a key (its edge and its number there) and, once taken up, by its
    session's name (:meth:`name`)."""

    def __init__(self):
        self._t = 0.0  # idle time is integrated up to here
        self._phi = 0.0
        self._active: dict[Hashable, list[float]] = {}  # key -> [phi when it arrived, busy seconds so far]
        self._names: dict[str, Hashable] = {}
        self._recent: deque[Busy] = deque()  # busy stretches that may still overlap time not yet integrated
        self._arrivals: list[tuple[float, int, int]] = []  # (time, edge, number): the next of each open-loop edge
        self._streams: dict[int, Iterator[float]] = {}

    def expect(self, edge: int, times: Iterator[float]) -> None:
        """An open-loop edge's arrival times (its requests numbered 0, 1, ... in order)."""
        self._streams[edge] = times
        self._push(edge, 0)

    def _push(self, edge: int, number: int) -> None:
        t = next(self._streams[edge], None)
        if t is not None:
            heapq.heappush(self._arrivals, (t, edge, number))

    def _integrate(self, t: float) -> None:
        if t <= self._t:
            return
        a = self._t
        busy = 0.0
        for iv in self._recent:
            busy += max(0.0, min(iv.end, t) - max(iv.start, a))
        while self._recent and self._recent[0].end <= t:
            self._recent.popleft()
        if self._active:
            self._phi += max(0.0, (t - a) - busy) / len(self._active)
        self._t = t

    def _advance(self, t: float) -> None:
        while self._arrivals and self._arrivals[0][0] <= t:
            ta, edge, number = heapq.heappop(self._arrivals)
            self._integrate(ta)
            self._active[(edge, number)] = [self._phi, 0.0]
            self._push(edge, number + 1)
        self._integrate(t)

    def join(self, key: Hashable, t: float) -> None:
        """A closed-loop request comes into flight at ``t`` (an expected one already has)."""
        self._advance(t)
        self._active.setdefault(key, [self._phi, 0.0])

    def name(self, session: str, key: Hashable) -> None:
        """The session serving request ``key`` (the name the cloud's passes give)."""
        self._names[session] = key

    def busy(self, iv: Busy) -> None:
        """A pass the cloud starts (its :class:`Busy` stretch, known at its start)."""
        self._advance(iv.start)
        if iv.sessions:
            owners = [k for s in iv.sessions if (k := self._names.get(s)) is not None and k in self._active]
        else:
            owners = list(self._active)
        for k in owners:
            self._active[k][1] += iv.seconds / len(owners)
        if iv.end > iv.start:
            self._recent.append(iv)

    def leave(self, key: Hashable, session: str, t: float) -> tuple[float, float]:
        """Request ``key`` ends at ``t``: its (busy, idle) cloud seconds."""
        self._advance(t)
        self._names.pop(session, None)
        phi0, busy = self._active.pop(key)
        return busy, self._phi - phi0


class EdgeBusy:
    """An edge device's busy stretches during its current request (cleared as each begins)."""

    def __init__(self):
        self.intervals: list[Busy] = []

    def append(self, iv: Busy) -> None:
        self.intervals.append(iv)

    def take(self) -> list[Busy]:
        out, self.intervals = self.intervals, []
        return out


class BusyFeed:
    """Stands in for :attr:`harness.compute.ModelledCompute.intervals`: hands each busy
    stretch to ``on_busy`` instead of keeping it (the device's timing is unchanged)."""

    def __init__(self, on_busy: Callable[[Busy], None]):
        self.append = on_busy

    def __len__(self) -> int:
        return 0

    def __iter__(self):
        return iter(())


def request_energy(rec: Any, energy: VirtualEnergy | None, *, edge_busy: list[Busy], cloud: tuple[float, float] | None,
                   session: str, edge_energy: VirtualEnergy | None) -> None:
    """Put modelled joules on a finished request and its rounds: the edge's and the rounds'
    as :func:`attribute_run` prices them, the cloud's from this request's (busy, idle) cloud
    seconds (``cloud``; None: the system has no cloud)."""
    attribute_run([rec], energy, edge_busy=[edge_busy], cloud_busy=None if cloud is None else [],
                  sessions=[session], edge_energy=[edge_energy])
    if energy is not None and energy.cloud is not None and cloud is not None and rec.energy is not None:
        busy, idle = cloud
        rec.energy.update(cloud_j=energy.cloud.joules(busy, idle), cloud_idle_j=idle * energy.cloud.idle_w)


__all__ = ("BusyFeed", "CloudShares", "EdgeBusy", "request_energy")
