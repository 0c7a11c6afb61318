"""One direction of an emulated link, shared by the user-space backends (``tun``, ``relay``).

A packet (or, on the relay, a segment-sized chunk) that arrives at ``now`` is lost with the
profile's probability, dropped if the bottleneck queue already holds more than ``queue_s``
of work, otherwise serialized after the packets before it at the rate in force (the trace's,
changing on schedule; a packet that straddles a step is serialized piecewise), then delayed
by half the RTT plus a jitter draw. Deliveries never overtake (FIFO), as on one path.
"""

from __future__ import annotations

import json
import os
import random
import sys

from netem.profile import NetworkProfile, jitter_sample


class Shaper:
    """Delivery times for one direction's packets; counts what it carried and dropped."""

    def __init__(self, profile: NetworkProfile, direction: str, origin: float, *, lossy: bool = True):
        self.profile, self.direction, self.origin = profile, direction, origin
        self.lossy = lossy
        self.rng = random.Random(f"specwan-link-{profile.seed}-{direction}")
        self.tx_end = origin
        self.last = origin
        self.packets = self.bytes = self.lost = self.queue_drops = 0

    def backlog(self, now: float) -> float:
        """Seconds of serialization already queued ahead of a packet arriving now."""
        return max(0.0, self.tx_end - now)

    def admit(self, now: float, nbytes: int) -> float | None:
        """When a packet of ``nbytes`` (headers included) arriving at ``now`` is delivered; None if dropped."""
        p = self.profile
        loss = p.loss_at(now - self.origin) if p.trace is not None else p.loss
        if self.lossy and loss and self.rng.random() < loss:
            self.lost += 1
            return None
        start = max(now, self.tx_end)
        if self.lossy and start - now > p.queue_s:
            self.queue_drops += 1
            return None
        if p.trace is not None:
            self.tx_end = self.origin + p.trace.finish(self.direction, start - self.origin, nbytes * 8.0)
        else:
            rate = p.up_bps if self.direction == "up" else p.down_bps
            self.tx_end = start + (0.0 if rate is None else nbytes * 8.0 / rate)
        delay = max(0.0, p.rtt_s / 2.0 + jitter_sample(self.rng, p.jitter_s, p.jitter_distribution))
        t = max(self.tx_end + delay, self.last)
        self.last = t
        self.packets += 1
        self.bytes += nbytes
        return t

    def counters(self) -> dict:
        return {"packets": self.packets, "bytes": self.bytes, "lost": self.lost, "queue_drops": self.queue_drops}


WAKE_MARGIN_S = 0.001  # the least an emulator wakes ahead of a long wait's deadline
WAKE_MARGIN_FRACTION = 0.02  # ... and the share of the wait it wakes ahead


def wait_until(deadline: float | None, now: float) -> float | None:
    """The ``select`` timeout for an emulator waiting to deliver at ``deadline``.

    A kernel lets a long timed wait overrun by a share of its length (its timer slack;
    measured at 0.3-0.6 ms on a 100 ms ``select`` in a virtual machine), so a packet held for
    half a 200 ms RTT would arrive late by that much each way. A long wait is therefore cut
    short by ``max(WAKE_MARGIN_S, WAKE_MARGIN_FRACTION x wait)``, and the short wait that
    follows lands on time.
    """
    if deadline is None:
        return None
    wait = max(0.0, deadline - now)
    margin = max(WAKE_MARGIN_S, WAKE_MARGIN_FRACTION * wait)
    return wait - margin if wait > 2 * margin else wait


def raise_priority() -> str:
    """Run this emulator process ahead of the model processes that share the CPU: a link
    that waits behind a forward pass delivers late. Real-time FIFO scheduling where allowed
    (root), else a lower nice value; returns what it got (recorded with the link)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "SCHED_FIFO 10"
    except (AttributeError, PermissionError, OSError):
        pass
    try:
        return f"nice {os.nice(-10)}"
    except (PermissionError, OSError):
        return "default (no permission to raise it)"


def reload_profile(path: str | None, shapers) -> None:
    """Switch the shapers to the profile in ``path`` (NetworkProfile JSON; its trace on the
    same time origin): how faults reach a live link. A file that does not read leaves them."""
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as f:
            profile = NetworkProfile.from_json(json.load(f))
    except (OSError, ValueError, TypeError) as exc:
        print(f"netem: cannot reload the profile from {path}: {exc}", file=sys.stderr, flush=True)
        return
    for shaper in shapers:
        shaper.profile = profile
