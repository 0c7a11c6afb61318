"""The fleet's devices (the ``fleet`` config group): N edge devices, each with a device
profile, a network, an arrival process and an SLO drawn from declared weighted mixes, and the
verifier (of ``verifiers``) that serves it.

A mix lists option names with weights (``devices: [{laptop_gpu_cloud: 3}, phone_gpu_cloud]``:
three laptops to one phone, on average; a bare name weighs 1), or for arrivals and SLOs
entries each with a ``weight`` (``arrivals: [{weight: 1, kind: poisson, rate: 0.1},
{weight: 1, kind: closed}]``). A weight of 0 leaves an entry out. (On the command line a
list replaces the preset's; a mapping would be merged into it.) Each edge draws its device, network, arrival process and SLO
independently, seeded (``fleet.seed``, else the run's seed), so a run is reproducible and a
share drifts from its weight only by chance. An empty mix gives every edge the run's own
(``device``, ``network``, a closed loop, ``workload.slo``).

Edges are assigned to verifiers ``round_robin`` (edge i to i mod k), in ``blocks`` (the
first N/k to verifier 0, ...) or at ``random`` (seeded). Each edge issues requests by its
arrival process from virtual time 0 until ``duration_s`` (a closed loop: its next request as
soon as the last one ends), at most ``requests_per_edge`` of them; requests in flight at the
horizon are served to the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from harness.link import LinkProfile
from harness.profiles import RoleProfile, role_profile
from netem.profile import ProfileError, parse_profile

FLEET_KEYS = ("n", "verifiers", "assign", "duration_s", "requests_per_edge", "devices", "networks", "arrivals",
              "slos", "seed", "rounds", "workers")
ASSIGN_RULES = ("round_robin", "blocks", "random")
ARRIVAL_KEYS = {"closed": {"think_time_s"}, "poisson": {"rate"}, "gamma": {"rate", "burstiness"}}
SLO_KEYS = ("ttft_s", "tpot_s")


class FleetError(ValueError):
    """The ``fleet`` config is wrong; the message (one line) names the key and the fix."""


@dataclass(frozen=True)
class FleetEdge:
    """One simulated edge device: its device profile, network, arrival process (a mapping:
    ``kind`` and its fields), SLO (TTFT, TPOT targets; None: none) and verifier."""

    name: str
    device: RoleProfile
    device_option: str  # the conf/device option ("": the run's device)
    network: str
    link: LinkProfile
    arrival: Mapping[str, Any]
    slo: tuple[float | None, float | None]
    verifier: int

    def arrival_times(self, seed: int, duration_s: float) -> Iterator[float] | None:
        """This edge's open-loop arrival times before ``duration_s``, lazily: the times
        :mod:`workloads.arrivals` gives for ``seed`` (the first at 0); None for a closed loop."""
        kind = self.arrival["kind"]
        if kind == "closed":
            return None
        rng = np.random.default_rng(seed)
        rate = float(self.arrival["rate"])
        if kind == "poisson":
            def draw(n):
                return rng.exponential(1.0 / rate, size=n)
        else:
            shape = 1.0 / float(self.arrival.get("burstiness", 1.0))
            scale = 1.0 / (rate * shape)

            def draw(n):
                return rng.gamma(shape, scale, size=n)

        def times() -> Iterator[float]:
            t = 0.0
            while t < duration_s:
                for interval in draw(64):
                    if t >= duration_s:
                        return
                    yield t
                    t += float(interval)
        return times()


@dataclass(frozen=True)
class FleetPlan:
    """The fleet: its edges, verifiers, horizon, what its records keep, and the worker
    processes its verifiers' islands are spread over (None: as many as there are CPUs to use)."""

    edges: tuple[FleetEdge, ...]
    verifiers: int
    assign: str
    duration_s: float
    requests_per_edge: int | None
    seed: int
    rounds: bool
    declared: Mapping[str, Any]
    workers: int | None = None

    @property
    def n(self) -> int:
        return len(self.edges)

    def describe(self) -> dict:
        """The manifest's ``fleet`` entry: the mixes as declared and as drawn, the verifiers'
        shares, and every edge; all its figures are modelled."""
        def counts(values) -> dict:
            out: dict[str, int] = {}
            for v in values:
                out[v] = out.get(v, 0) + 1
            return dict(sorted(out.items()))

        return {"n": self.n, "verifiers": self.verifiers, "assign": self.assign, "duration_s": self.duration_s,
                "requests_per_edge": self.requests_per_edge, "seed": self.seed, "rounds": self.rounds,
                "workers": self.workers,
                "figures": "modelled: virtual time; model work priced by the device profiles, the cloud's batches "
                           "by the run's cloud profile; the link by its model; the plug-ins' own policy code",
                "declared": dict(self.declared),
                "drawn": {"devices": counts(e.device_option or e.device.name for e in self.edges),
                          "networks": counts(e.network for e in self.edges),
                          "arrivals": counts(arrival_label(e.arrival) for e in self.edges),
                          "slos": counts(slo_label(e.slo) for e in self.edges),
                          "verifiers": counts(f"v{e.verifier}" for e in self.edges)},
                "edges": [{"name": e.name, "device": e.device.name, "device_option": e.device_option,
                           "network": e.network, "arrival": dict(e.arrival), "slo_ttft_s": e.slo[0],
                           "slo_tpot_s": e.slo[1], "verifier": e.verifier} for e in self.edges]}


def arrival_label(arrival: Mapping[str, Any]) -> str:
    """``closed``, ``poisson@0.1`` or ``gamma@0.1/b2`` (rate per second, burstiness)."""
    kind = arrival["kind"]
    if kind == "closed":
        think = arrival.get("think_time_s")
        return f"closed+{think}s" if think else "closed"
    tail = f"/b{arrival['burstiness']}" if kind == "gamma" else ""
    return f"{kind}@{arrival['rate']}{tail}"


def slo_label(slo: tuple[float | None, float | None]) -> str:
    return "none" if slo == (None, None) else f"ttft {slo[0]} s, tpot {slo[1]} s"


def _positive_int(value, key: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FleetError(f"fleet.{key} must be a positive integer ({fix}), got {value!r}")
    return value


def _positive(value, key: str, fix: str, zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise FleetError(f"fleet.{key} must be a number {'>=' if zero else '>'} 0 ({fix}), got {value!r}")
    return float(value)


def _weight(value, key: str) -> float:
    return _positive(value, key, "a weight: the entry's relative share of the edges; 0 leaves it out", zero=True)


def _named_mix(value, key: str) -> list[tuple[str, float]]:
    """Option names with weights: a list of names (weight 1 each) or ``{name: weight}``
    mappings, or one mapping. A weight of 0 leaves the option out."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping)):
        value = [value]
    fix = f"e.g. fleet.{key}=[name, {{other: 3}}]"
    if not isinstance(value, (list, tuple)):
        raise FleetError(f"fleet.{key} must list {key[:-1]} profile names with weights ({fix}), got {value!r}")
    out: dict[str, float] = {}
    for item in value:
        pairs = item.items() if isinstance(item, Mapping) else [(item, 1)]
        for name, w in pairs:
            if not isinstance(name, str) or not name:
                raise FleetError(f"fleet.{key} must list {key[:-1]} profile names with weights ({fix}), "
                                 f"got {item!r}")
            out[name] = out.get(name, 0.0) + _weight(w, f"{key}.{name}")
    return _kept(list(out.items()), key)


def _kept(mix: list, key: str) -> list:
    """The entries of a mix with a weight above 0 (an empty mix: the run's own)."""
    kept = [(o, w) for o, w in mix if w > 0]
    if mix and not kept:
        raise FleetError(f"fleet.{key}: every weight is 0; give one a weight above 0, or set fleet.{key}=[] "
                         "for the run's own")
    return kept


def _entries(value, key: str) -> list[tuple[dict, float]]:
    """A list of ``{weight: w, ...}`` entries (a single mapping: one entry of weight 1)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
        raise FleetError(f"fleet.{key} must be a list of entries with a weight, e.g. "
                         f"fleet.{key}=[{{weight: 1, ...}}], got {value!r}")
    out = []
    for i, entry in enumerate(value):
        entry = {k: v for k, v in dict(entry).items() if v is not None}
        out.append((entry, _weight(entry.pop("weight", 1), f"{key}[{i}].weight")))
    return out


def _arrival(entry: dict, where: str) -> dict:
    kind = entry.get("kind", "closed")
    if kind not in ARRIVAL_KEYS:
        raise FleetError(f"fleet.{where}.kind must be one of {', '.join(ARRIVAL_KEYS)}, got {kind!r}")
    extra = sorted(set(entry) - {"kind"} - ARRIVAL_KEYS[kind])
    if extra:
        raise FleetError(f"fleet.{where} ({kind}): unknown key(s) {', '.join(extra)}; valid: "
                         f"{', '.join(['kind', 'weight', *sorted(ARRIVAL_KEYS[kind])])}")
    out = {"kind": kind}
    if kind == "closed":
        if entry.get("think_time_s"):
            out["think_time_s"] = _positive(entry["think_time_s"], f"{where}.think_time_s",
                                            "seconds between a request's end and the next", zero=True)
        return out
    if "rate" not in entry:
        raise FleetError(f"fleet.{where} ({kind}): needs a rate (requests per second per edge), e.g. rate: 0.1")
    out["rate"] = _positive(entry["rate"], f"{where}.rate", "requests per second per edge")
    if kind == "gamma":
        out["burstiness"] = _positive(entry.get("burstiness", 1.0), f"{where}.burstiness", "1 = Poisson")
    return out


def _slo(entry: dict, where: str) -> tuple[float | None, float | None]:
    extra = sorted(set(entry) - set(SLO_KEYS))
    if extra:
        raise FleetError(f"fleet.{where}: unknown key(s) {', '.join(extra)}; valid: weight, {', '.join(SLO_KEYS)}")
    return tuple(None if entry.get(k) is None else _positive(entry[k], f"{where}.{k}", "seconds")
                 for k in SLO_KEYS)  # type: ignore[return-value]


def _draw(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float], n: int) -> list[Any]:
    if len(options) == 1:
        return [options[0]] * n
    p = np.asarray(weights, dtype=float)
    return [options[i] for i in rng.choice(len(options), size=n, p=p / p.sum())]


def fleet_plan(data: Mapping[str, Any], *, run_device: RoleProfile, run_network: str, run_link: LinkProfile,
               run_slo: tuple[float | None, float | None], run_seed: int,
               option: Callable[[str, str], dict]) -> FleetPlan:
    """A checked :class:`FleetPlan` from the ``fleet`` config mapping. ``option(group, name)``
    reads a config group's option (an unknown name is an error listing the valid ones)."""
    data = dict(data)
    unknown = sorted(set(data) - set(FLEET_KEYS))
    if unknown:
        raise FleetError(f"fleet: unknown key(s) {', '.join(unknown)}; valid: {', '.join(FLEET_KEYS)}")
    n = _positive_int(data.get("n", 1), "n", "the number of edge devices")
    k = _positive_int(data.get("verifiers", 1), "verifiers", "the number of cloud verifiers")
    if k > n:
        raise FleetError(f"fleet.verifiers ({k}) must not exceed fleet.n ({n}): every verifier serves an edge")
    assign = data.get("assign", "round_robin")
    if assign not in ASSIGN_RULES:
        raise FleetError(f"fleet.assign must be one of {', '.join(ASSIGN_RULES)}, got {assign!r}")
    duration = _positive(data.get("duration_s", 60.0), "duration_s", "virtual seconds during which requests arrive")
    per_edge = data.get("requests_per_edge")
    if per_edge is not None:
        per_edge = _positive_int(per_edge, "requests_per_edge", "at most this many requests per edge, or null")
    seed = data.get("seed")
    if seed is None:
        seed = run_seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FleetError(f"fleet.seed must be an integer or null (the run's seed), got {seed!r}")
    rounds = data.get("rounds", True)
    if not isinstance(rounds, bool):
        raise FleetError(f"fleet.rounds must be true or false (false: no per-round rows), got {rounds!r}")
    workers = data.get("workers")
    if workers is not None:
        workers = _positive_int(workers, "workers", "processes to spread the verifiers over, or null for one per CPU")

    devices = []
    for name, w in _named_mix(data.get("devices"), "devices"):
        try:
            devices.append(((name, role_profile(option("device", name)["edge"])), w))
        except KeyError as exc:
            raise FleetError(f"fleet.devices: device profile {name!r} has no {exc.args[0]!r} role") from exc
        except ValueError as exc:
            raise FleetError(f"fleet.devices: {exc}") from exc
    networks = []
    for name, w in _named_mix(data.get("networks"), "networks"):
        try:
            networks.append(((name, LinkProfile.from_network(parse_profile(option("network", name)))), w))
        except (ProfileError, ValueError) as exc:
            raise FleetError(f"fleet.networks: {exc}") from exc
    arrivals = _kept([(_arrival(e, f"arrivals[{i}]"), w)
                      for i, (e, w) in enumerate(_entries(data.get("arrivals"), "arrivals"))], "arrivals")
    slos = _kept([(_slo(e, f"slos[{i}]"), w) for i, (e, w) in enumerate(_entries(data.get("slos"), "slos"))], "slos")

    rng = np.random.default_rng([int(seed), 20])  # the draws: one stream per run seed, apart from the arrivals'

    def pick(mix, default):
        return _draw(rng, [o for o, _ in mix], [w for _, w in mix], n) if mix else [default] * n

    dev = pick(devices, ("", run_device))
    net = pick(networks, (run_network, run_link))
    arr = pick(arrivals, {"kind": "closed"})
    slo = pick(slos, tuple(run_slo))
    if assign == "round_robin":
        verifier = [i % k for i in range(n)]
    elif assign == "blocks":
        verifier = [i * k // n for i in range(n)]
    else:
        verifier = [int(v) for v in rng.integers(0, k, size=n)]
    edges = tuple(FleetEdge(f"e{i}", dev[i][1], dev[i][0], net[i][0], net[i][1], arr[i], slo[i], verifier[i])
                  for i in range(n))
    declared = {"devices": {name: w for (name, _), w in devices} or "the run's device",
                "networks": {name: w for (name, _), w in networks} or "the run's network",
                "arrivals": [{**a, "weight": w} for a, w in arrivals] or "closed loop",
                "slos": [{"ttft_s": s[0], "tpot_s": s[1], "weight": w} for s, w in slos] or "the workload's slo"}
    return FleetPlan(edges, k, assign, duration, per_edge, int(seed), rounds, declared, workers)


def describe_fleet(plan: FleetPlan) -> str:
    """One line: the fleet's size, verifiers, horizon and its commonest device and network."""
    d = plan.describe()["drawn"]
    top = lambda c: max(c, key=c.get)  # noqa: E731
    return (f"fleet of {plan.n} edge device(s) ({len(d['devices'])} device profile(s), mostly {top(d['devices'])}; "
            f"{len(d['networks'])} network(s), mostly {top(d['networks'])}) on {plan.verifiers} verifier(s), "
            f"{plan.duration_s:g} s of arrivals")


__all__: Sequence[str] = ("FleetEdge", "FleetError", "FleetPlan", "describe_fleet", "fleet_plan")
