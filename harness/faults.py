"""Faults injected on purpose (the ``fault`` config group), and what the edge does when it
loses the cloud (the ``wall`` options).

A fault is an event at ``at_s`` seconds after the link starts:

- ``outage``: the link carries nothing, either way, for ``for_s`` seconds;
- ``bandwidth_collapse``: both rates fall to ``factor`` times their value for ``for_s`` seconds;
- ``loss_burst``: packets are lost with probability ``loss`` for ``for_s`` seconds (on the
  packet-level backends and in the link model; the stream-level relay loses nothing);
- ``cloud_kill``: the cloud process is killed (SIGKILL) and, after ``restart_after_s``
  (null: never), started again on the same ports; what it held is gone;
- ``cloud_stall``: the cloud process is stopped (SIGSTOP) for ``for_s`` seconds, then resumed.

The link faults become steps of the network profile's rate trace (a rate of 0 is an outage),
so they act identically in virtual time (the link model) and in wall mode (the link
backends realise the same trace). The process faults need a cloud process: wall mode only.
The run's manifest lists every fault with when it fired.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from netem.profile import NetworkProfile, RateStep, Trace

LINK_FAULTS = ("outage", "bandwidth_collapse", "loss_burst")
PROCESS_FAULTS = ("cloud_kill", "cloud_stall")
ON_CLOUD_LOST = ("fail", "retry", "edge_only")


class FaultError(ValueError):
    """A fault or wall option that cannot be used (one line naming the key and the fix)."""


@dataclass(frozen=True)
class Fault:
    """One injected event; see the module docstring for the kinds."""

    kind: str
    at_s: float
    for_s: float | None = None
    factor: float | None = None
    restart_after_s: float | None = None
    loss: float | None = None

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class WallOptions:
    """How a wall run guards itself: ``timeout_s`` bounds the whole run (None: no bound);
    ``liveness_timeout_s`` is how long an unanswered ping to the cloud may take before the edge
    counts the cloud as stopped (None: derived from the link, :func:`liveness_timeout`);
    ``on_cloud_lost`` is what an edge does then (``fail`` the request, ``retry`` it on a new
    stream for up to ``retry_within_s``, or finish it ``edge_only`` with its draft model)."""

    timeout_s: float | None = None
    liveness_timeout_s: float | None = None
    on_cloud_lost: str = "fail"
    retry_within_s: float = 30.0


def _seconds(node: Mapping, key: str, where: str, *, allow_null: bool = False, positive: bool = True):
    value = node.get(key)
    if value is None and allow_null:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise FaultError(f"{where}.{key} must be seconds {need}{' or null' if allow_null else ''}, got {value!r}")
    return float(value)


def parse_faults(node: Mapping | None) -> list[Fault]:
    """The faults of a ``fault`` config node (``{name, events: [...]}``); [] for none."""
    if node is None:
        return []
    events = node.get("events") or []
    if not isinstance(events, (list, tuple)):
        raise FaultError("fault.events must be a list of {kind, at_s, ...}")
    faults = []
    for i, ev in enumerate(events):
        where = f"fault.events[{i}]"
        if not isinstance(ev, Mapping) or ev.get("kind") not in LINK_FAULTS + PROCESS_FAULTS:
            raise FaultError(f"{where}.kind must be one of {', '.join(LINK_FAULTS + PROCESS_FAULTS)}, "
                             f"got {ev.get('kind') if isinstance(ev, Mapping) else ev!r}")
        kind = ev["kind"]
        allowed = {"kind", "at_s", "for_s"} | ({"factor"} if kind == "bandwidth_collapse" else set()) \
            | ({"restart_after_s"} if kind == "cloud_kill" else set()) | ({"loss"} if kind == "loss_burst" else set())
        if kind == "cloud_kill":
            allowed.discard("for_s")
        extra = set(ev) - allowed
        if extra:
            raise FaultError(f"{where}: {kind} takes {', '.join(sorted(allowed))}, not {', '.join(sorted(extra))}")
        at = _seconds(ev, "at_s", where, positive=False)
        if kind == "cloud_kill":
            faults.append(Fault(kind, at, restart_after_s=_seconds(ev, "restart_after_s", where, allow_null=True,
                                                                   positive=False)))
            continue
        dur = _seconds(ev, "for_s", where)
        factor = None
        if kind == "bandwidth_collapse":
            factor = ev.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
                raise FaultError(f"{where}.factor must be a fraction of the rates in (0, 1), got {factor!r}")
            factor = float(factor)
        loss = None
        if kind == "loss_burst":
            loss = ev.get("loss")
            if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not 0 < loss < 1:
                raise FaultError(f"{where}.loss must be a probability in (0, 1), got {loss!r}")
            loss = float(loss)
        faults.append(Fault(kind, at, for_s=dur, factor=factor, loss=loss))
    return faults


def with_link_faults(profile: NetworkProfile, faults: list[Fault]) -> NetworkProfile:
    """``profile`` with its link faults written into its rate trace (unchanged without any)."""
    link_faults = [f for f in faults if f.kind in LINK_FAULTS]
    if not link_faults:
        return profile
    base = profile.trace or Trace((RateStep(0.0, profile.up_bps, profile.down_bps),), "listed")
    bounds = sorted({0.0, *(s.at_s for s in base.steps), *(f.at_s for f in link_faults),
                     *(f.at_s + f.for_s for f in link_faults)})
    steps = []
    for t in bounds:
        step = base.step_at(t)
        up, down, loss = step.up_bps, step.down_bps, step.loss
        for f in link_faults:
            if f.at_s <= t < f.at_s + f.for_s:
                if f.kind == "outage":
                    up, down = 0.0, 0.0
                elif f.kind == "loss_burst":
                    loss = f.loss
                else:
                    if up is None or down is None:
                        raise FaultError("fault bandwidth_collapse needs a rate-limited link (network.up_mbps and "
                                         "network.down_mbps set): an unlimited rate has no fraction")
                    up, down = up * f.factor, down * f.factor
        if not steps or (steps[-1].up_bps, steps[-1].down_bps, steps[-1].loss) != (up, down, loss):
            steps.append(RateStep(t, up, down, loss))
    source = f"{base.source}, with faults: " + "; ".join(
        f"{f.kind} at {f.at_s:g} s for {f.for_s:g} s" for f in link_faults)
    return dataclasses.replace(profile, trace=Trace(tuple(steps), source))


def process_faults(faults: list[Fault]) -> list[Fault]:
    """The faults that act on the cloud process, in firing order."""
    return sorted((f for f in faults if f.kind in PROCESS_FAULTS), key=lambda f: f.at_s)


def wall_options(node: Mapping | None) -> WallOptions:
    """The :class:`WallOptions` of a ``wall`` config node."""
    node = dict(node or {})
    known = {f.name for f in dataclasses.fields(WallOptions)}
    extra = set(node) - known
    if extra:
        raise FaultError(f"wall: unknown key(s) {', '.join(sorted(extra))}; the keys are {', '.join(sorted(known))}")
    lost = node.get("on_cloud_lost", "fail")
    if lost not in ON_CLOUD_LOST:
        raise FaultError(f"wall.on_cloud_lost must be one of {', '.join(ON_CLOUD_LOST)}, got {lost!r}")
    return WallOptions(
        timeout_s=_seconds(node, "timeout_s", "wall", allow_null=True),
        liveness_timeout_s=_seconds(node, "liveness_timeout_s", "wall", allow_null=True),
        on_cloud_lost=lost,
        retry_within_s=_seconds({**node, "retry_within_s": node.get("retry_within_s", 30.0)}, "retry_within_s", "wall"),
    )


def tcp_send_buffer_max(default: int = 4 << 20) -> int:
    """The most bytes one TCP socket may hold unsent (``net.ipv4.tcp_wmem``'s maximum)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return default


def liveness_timeout(profile: NetworkProfile | None) -> tuple[float, str]:
    """How long an edge waits for the cloud's answer to a ping, derived from the link, with
    the derivation in words. A ping can wait behind what the edge has already handed to its
    socket, at most a full send buffer (``tcp_wmem`` max) and as much again queued in gRPC,
    each at the uplink rate; then a round trip, twice over for jitter and queueing; and two
    seconds for the hosts. gRPC's own threads answer pings, so a verification taking long does
    not count against it; a stopped cloud process does."""
    rtt = profile.rtt_s + 4 * profile.jitter_s if profile is not None else 0.0
    up = profile.up_bps if profile is not None else None
    buffered = 2 * tcp_send_buffer_max()
    drain = 8 * buffered / up if up else 0.0
    seconds = 2.0 + 4 * rtt + drain
    how = f"2 s + 4 x RTT ({rtt * 1e3:.0f} ms)" + (f" + {buffered >> 20} MiB at the uplink rate ({drain:.1f} s)"
                                                   if up else "")
    return round(seconds, 3), how
