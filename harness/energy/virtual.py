"""Energy in virtual time: the modelled devices' busy and idle time x their declared power.

A virtual-time run has no hardware to read: its time is the device profiles' and the link
model's, so its energy is modelled too, and always labelled ``estimated``. Each role's
device draws ``active_w`` while it runs model work and ``idle_w`` otherwise
(:class:`DevicePower`, from the profile's ``active_w`` / ``idle_w``; ``tdp_w`` stands in for a
missing ``active_w``; a missing ``idle_w`` counts as 0 W and the constants say so).

Attribution (:func:`attribute_run`), exact given the modelled devices' busy intervals
(:class:`harness.compute.Busy`):

* **edge, per request**: each client's device serves one request at a time, so its busy
  intervals during a request are the request's: ``E = busy_s x active_w + (e2e - busy_s) x idle_w``.
* **cloud, per request**: a busy interval is shared equally by the sessions its op names
  (a batched verification); an interval naming none is shared by the requests in flight.
  Idle cloud time is shared equally by the requests in flight at that moment; idle time
  with no request in flight belongs to none. A system without a cloud policy uses no cloud:
  0 J.
* **per round**: ``energy_draft_j = t_draft x edge active_w`` (drafting this window's tokens,
  discarded ones included); ``energy_wasted_j`` is the part of it spent on draft tokens that
  were not accepted (pro rata by token); ``energy_verify_j = t_verify / batch_size x cloud
  active_w`` (this round's share of the verification pass); ``energy_wait_j`` is the edge's
  idle time x ``idle_w`` between the previous round's verdict (or the request's start) and
  this one's. Round figures do not add up to the request's: prefills, cloud idle time and
  the time after the last verdict are only in the request's totals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from harness.energy.base import UNSUPPORTED, EnergyUnavailable

SOURCE = "modelled device (virtual time: device profile power x busy/idle time)"
MODEL = "E = busy_s * active_w + idle_s * idle_w"
VIRTUAL_NO_COUNTERS = ("virtual time: hardware counters measure this machine, not the modelled devices, "
                       "so energy is modelled from the device profiles")


@dataclass(frozen=True)
class DevicePower:
    """Power of one modelled device: ``active_w`` while busy, ``idle_w`` otherwise."""

    name: str
    active_w: float
    idle_w: float
    source: str
    constants_from: dict

    def joules(self, busy_s: float, idle_s: float) -> float:
        return busy_s * self.active_w + max(0.0, idle_s) * self.idle_w

    def describe(self) -> dict[str, Any]:
        return {"kind": "estimated", "source": f"{SOURCE}; {self.source}", "model": MODEL,
                "constants": {"device": self.name, "active_w": self.active_w, "idle_w": self.idle_w,
                              "from": dict(self.constants_from)},
                "reason": VIRTUAL_NO_COUNTERS}


def device_power(profile: Any, role: str = "device") -> DevicePower:
    """The power of a :class:`harness.profiles.RoleProfile`; :class:`EnergyUnavailable` if it declares none."""
    name = getattr(profile, "name", role)
    active, idle = getattr(profile, "active_w", None), getattr(profile, "idle_w", None)
    tdp = getattr(profile, "tdp_w", None)
    origin = {}
    if active is not None:
        origin["active_w"] = "profile active_w"
    elif tdp is not None:
        active, origin["active_w"] = tdp, "profile tdp_w (no active_w declared)"
    else:
        raise EnergyUnavailable(f"{role} device profile {name!r} declares no power (active_w or tdp_w)", UNSUPPORTED)
    if idle is not None:
        origin["idle_w"] = "profile idle_w"
    else:
        idle, origin["idle_w"] = 0.0, "not declared: taken as 0 W"
    source = getattr(profile, "power_source", None) or "profile power (no source given)"
    return DevicePower(name, float(active), float(idle), source, origin)


@dataclass
class VirtualEnergy:
    """What a virtual-time run needs to put joules on its records: each role's power, or why not."""

    edge: DevicePower | None
    cloud: DevicePower | None
    edge_reason: str | None = None
    cloud_reason: str | None = None

    @classmethod
    def from_profiles(cls, edge_profile: Any, cloud_profile: Any, mode: str = "auto") -> "VirtualEnergy":
        """From the two device profiles; ``mode`` "none" turns energy off (nulls with that reason)."""
        if mode == "none":
            why = "energy=none: not requested"
            return cls(None, None, why, why)
        if mode not in ("auto", "estimate"):
            raise ValueError(f"energy mode must be auto, estimate or none, got {mode!r}")
        powers, reasons = {}, {}
        for role, profile in (("edge", edge_profile), ("cloud", cloud_profile)):
            try:
                powers[role], reasons[role] = device_power(profile, role), None
            except EnergyUnavailable as exc:
                powers[role], reasons[role] = None, exc.reason
        return cls(powers["edge"], powers["cloud"], reasons["edge"], reasons["cloud"])

    def describe(self) -> dict[str, dict]:
        """Energy source per role, for the run manifest."""
        out = {}
        for role in ("edge", "cloud"):
            power = getattr(self, role)
            out[role] = power.describe() if power is not None else {
                "kind": None, "source": None, "model": None, "constants": {},
                "reason": getattr(self, f"{role}_reason") or "no power model"}
        return out


def disabled(reason: str) -> VirtualEnergy:
    return VirtualEnergy(None, None, reason, reason)


# ---- attribution -------------------------------------------------------------------------------


def _overlap_busy(intervals: Sequence[Any], a: float, b: float) -> float:
    return sum(max(0.0, min(i.end, b) - max(i.start, a)) for i in intervals)


class _BusySweep:
    """:func:`_overlap_busy` for windows that move forward in time (each starts where the last
    ended, or later), in time linear in the intervals over all windows rather than in their
    product: the busy intervals a window can overlap are a contiguous run of the list when it
    is in time order (each starting and ending no earlier than the one before, as one device's
    ops are), and the sum of their overlaps is the full sum less terms that are exactly 0 (the
    same float). Intervals out of that order are summed as :func:`_overlap_busy` does."""

    def __init__(self, intervals: Sequence[Any]):
        self.intervals = intervals
        self.ordered = all(x.start <= y.start and x.end <= y.end for x, y in zip(intervals, intervals[1:]))
        self.k = 0
        self.a = -math.inf

    def overlap(self, a: float, b: float) -> float:
        if not self.ordered or a < self.a:
            return _overlap_busy(self.intervals, a, b)
        self.a = a
        ivs, k = self.intervals, self.k
        while k < len(ivs) and ivs[k].end <= a:  # over before this window: 0 now and for every later one
            k += 1
        self.k = k
        terms = []
        while k < len(ivs) and ivs[k].start < b:  # after these, every interval starts at or after b: 0
            iv = ivs[k]
            terms.append(max(0.0, min(iv.end, b) - max(iv.start, a)))
            k += 1
        return sum(terms)


def _cloud_shares(spans: Sequence[tuple[float, float]], busy: Sequence[Any], index_of: Mapping[str, int]):
    """Per request: (cloud busy seconds, cloud idle seconds) attributed to it (see the module doc)."""
    n = len(spans)
    busy_s, idle_s = [0.0] * n, [0.0] * n
    for iv in busy:
        owners = [index_of[s] for s in iv.sessions if s in index_of]
        if not iv.sessions:
            mid = 0.5 * (iv.start + iv.end)
            owners = [i for i, (s, e) in enumerate(spans) if s <= mid < e]
        for i in owners:
            busy_s[i] += iv.seconds / len(owners)
    # Idle time: sweep the elementary segments between all boundaries. The device runs one
    # op at a time, so its busy intervals do not overlap.
    starts: dict[float, list[int]] = {}
    ends: dict[float, list[int]] = {}
    for i, (s, e) in enumerate(spans):
        starts.setdefault(s, []).append(i)
        ends.setdefault(e, []).append(i)
    points = sorted(set(starts) | set(ends) | {p for iv in busy for p in (iv.start, iv.end)})
    ordered = sorted((iv for iv in busy if iv.end > iv.start), key=lambda iv: iv.start)
    active: set[int] = set()
    k = 0
    for a, b in zip(points, points[1:]):
        active.difference_update(ends.get(a, ()))
        active.update(i for i in starts.get(a, ()) if spans[i][1] > a)
        if not active:
            continue
        mid = 0.5 * (a + b)
        while k < len(ordered) and ordered[k].end <= mid:
            k += 1
        if k < len(ordered) and ordered[k].start <= mid:
            continue  # busy
        for i in active:
            idle_s[i] += (b - a) / len(active)
    return busy_s, idle_s


def _combine(reasons: Mapping[str, str]) -> str | None:
    """One reason for the roles' reasons: said once when they agree, else prefixed by role."""
    if not reasons:
        return None
    if len(set(reasons.values())) == 1 and len(reasons) > 1:
        return next(iter(reasons.values()))
    return "; ".join(f"{role}: {why}" for role, why in reasons.items())


def _round_figures(rec: Any, edge: DevicePower | None, cloud: DevicePower | None, edge_busy: Sequence[Any],
                   reason: str | None) -> float:
    """Fill each round's energy fields; returns the request's wasted joules (edge drafting)."""
    wasted_total = 0.0
    prev = rec.start
    busy = _BusySweep(edge_busy)
    for r in sorted(rec.rounds, key=lambda r: (r.end, r.round)):
        if edge is not None:
            r.energy_draft_j = r.t_draft * edge.active_w
            r.energy_wasted_j = r.energy_draft_j * r.wasted / r.drafted if r.drafted else 0.0
            a, b = prev, max(prev, r.end)
            r.energy_wait_j = max(0.0, (b - a) - busy.overlap(a, b)) * edge.idle_w
            wasted_total += r.energy_wasted_j
        if cloud is not None:
            r.energy_verify_j = None if r.t_verify is None else r.t_verify * cloud.active_w / max(1, r.batch_size)
        r.energy_kind = "estimated" if (edge is not None or cloud is not None) else None
        r.energy_reason = reason
        prev = max(prev, r.end)
    return wasted_total


def attribute_run(records: Sequence[Any], energy: VirtualEnergy | None, *, edge_busy: Sequence[Sequence[Any]],
                  cloud_busy: Sequence[Any] | None, sessions: Sequence[str],
                  edge_energy: Sequence[VirtualEnergy | None] | None = None) -> None:
    """Put modelled joules on each request record (``record.energy``) and its rounds.

    ``edge_busy[i]``: the busy intervals of request i's edge device during the request;
    ``cloud_busy``: every busy interval of the cloud device (None: the system has no cloud);
    ``sessions[i]``: request i's session name. ``energy`` None leaves every figure null with
    the reason. ``edge_energy[i]`` (optional): the energy model whose edge power prices
    request i's edge device, where edges differ (a mix of device profiles).
    """
    if energy is None:
        why = "energy not modelled (no RunOptions.energy)"
        for rec in records:
            rec.energy = {"edge_j": None, "cloud_j": None, "reason": why}
            for r in rec.rounds:
                r.energy_reason = why
        return
    spans = [(rec.start, rec.end) for rec in records]
    index_of = {s: i for i, s in enumerate(sessions)}
    if cloud_busy is not None and energy.cloud is not None:
        cloud_s, cloud_idle_s = _cloud_shares(spans, cloud_busy, index_of)
    else:
        cloud_s = cloud_idle_s = [0.0] * len(records)
    for i, rec in enumerate(records):
        out: dict[str, Any] = {"edge_j": None, "cloud_j": None, "edge_kind": None, "cloud_kind": None}
        reasons: dict[str, str] = {}
        own = energy if edge_energy is None or edge_energy[i] is None else edge_energy[i]
        edge, cloud = own.edge, energy.cloud
        if edge is not None:
            busy = sum(iv.seconds for iv in edge_busy[i])
            idle = max(0.0, rec.e2e - busy)
            out.update(edge_j=edge.joules(busy, idle), edge_idle_j=idle * edge.idle_w, edge_kind="estimated")
        else:
            reasons["edge"] = own.edge_reason or "no power model"
        if cloud is None:
            reasons["cloud"] = energy.cloud_reason or "no power model"
        elif cloud_busy is None:  # no cloud in this system
            out.update(cloud_j=0.0, cloud_idle_j=0.0, cloud_kind="estimated")
        else:
            out.update(cloud_j=cloud.joules(cloud_s[i], cloud_idle_s[i]), cloud_idle_j=cloud_idle_s[i] * cloud.idle_w,
                       cloud_kind="estimated")
        reason = _combine(reasons)
        wasted = _round_figures(rec, edge, cloud, edge_busy[i], reason)
        out["wasted_j"] = wasted if edge is not None else None
        kinds = {out["edge_kind"], out["cloud_kind"]} - {None}
        out["kind"] = kinds.pop() if len(kinds) == 1 else None
        out["reason"] = reason
        rec.energy = out
