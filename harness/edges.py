"""The edge devices of a run (the ``edges`` config group): how many, which device profile and
network profile each takes, and when its requests arrive.

A single-edge run (``edges.n: 1``, closed loop) is the one every system is compared on, and
takes the harness's one-request-at-a-time path. With several edges, or an open-loop arrival
process, every request of the run is served in one shared virtual time: one cloud (the run's
``device`` cloud profile) serving N edge devices, each with its own device profile, link and
arrivals, each serving its own requests one after another (a request that arrives while its
device is busy waits, and its latency counts from its arrival).

Requests are dealt to the edges in turn (request i to edge i mod N), so the workload's
requests are shared among the edges; with ``requests_per_edge: k`` every edge serves k
requests instead (N * k in all, the workload's requests taken in turn and repeated as
needed, each with its own id), so the cloud's load grows with N. Device and network
profiles are taken in turn from ``devices`` and ``networks`` (edge i gets
``devices[i mod len]``); an empty list gives every edge the run's own. ``arrivals`` is one
arrival process per edge (:mod:`workloads.arrivals`; edge i's seed is ``seed + i``), so the
cloud's load grows with N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from harness.link import LinkProfile
from harness.profiles import RoleProfile, role_profile
from netem.profile import ProfileError, parse_profile

EDGES_KEYS = ("n", "devices", "networks", "arrivals", "requests_per_edge")
ARRIVAL_KINDS = ("closed", "poisson", "gamma")


class EdgesError(ValueError):
    """The ``edges`` config is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class EdgePlan:
    """One edge device: its name, device profile, network (name and link model)."""

    name: str
    device: RoleProfile
    device_option: str  # the conf/device option it came from ("" : the run's device)
    network: str
    link: LinkProfile


@dataclass(frozen=True)
class EdgesPlan:
    """The run's edge devices and their arrival process (``arrivals``: the config mapping)."""

    edges: tuple[EdgePlan, ...]
    arrivals: Mapping[str, Any] = field(default_factory=lambda: {"kind": "closed"})
    requests_per_edge: int | None = None  # None: the workload's requests dealt among the edges

    @property
    def n(self) -> int:
        return len(self.edges)

    @property
    def shared_time(self) -> bool:
        """Whether the run serves all its requests in one shared time (several edges, open
        loop, or a number of requests per edge)."""
        return self.n > 1 or self.arrivals.get("kind", "closed") != "closed" or self.requests_per_edge is not None

    def expand(self, turns: Sequence[Any]) -> list[Any]:
        """The turns the run serves: as given, or with ``requests_per_edge`` k, N * k of them
        (request i = j * N + e is edge e's j-th: the workload's turn i mod its count, its id
        suffixed ``@<edge>.<j>`` so every request of the run has its own)."""
        import dataclasses

        if not self.requests_per_edge or not turns:
            return list(turns)
        out = []
        for i in range(self.n * self.requests_per_edge):
            t = turns[i % len(turns)]
            rid = f"{t.request.request_id}@{self.edges[i % self.n].name}.{i // self.n}"
            out.append(dataclasses.replace(t, request=dataclasses.replace(t.request, request_id=rid)))
        return out

    def assign(self, n_requests: int) -> list[int]:
        """The edge serving each request: dealt in turn."""
        return [i % self.n for i in range(n_requests)]

    def arrival_times(self, n_requests: int, seed: int) -> list[float | None]:
        """Each request's arrival time (None under a closed loop: when its edge is free)."""
        from workloads.arrivals import arrival_process

        kind = self.arrivals.get("kind", "closed")
        if kind == "closed":
            return [None] * n_requests
        assign = self.assign(n_requests)
        out: list[float | None] = [None] * n_requests
        for e in range(self.n):
            mine = [i for i, a in enumerate(assign) if a == e]
            process = arrival_process({**self.arrivals, "seed": int(self.arrivals.get("seed", 0)) + seed + e})
            for i, t in zip(mine, process.times(len(mine))):
                out[i] = float(t)
        return out

    def describe(self) -> dict:
        """The manifest's entry: each edge's device, its kind and source, and its network."""
        return {"n": self.n, "arrivals": dict(self.arrivals), "requests_per_edge": self.requests_per_edge,
                "edges": [{"name": e.name, "device": e.device.name, "device_option": e.device_option,
                           "device_kind": e.device.kind, "network": e.network} for e in self.edges]}


def _names(value, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise EdgesError(f"edges.{key} must be a list of {key[:-1]} profile names, got {value!r}")
    return list(value)


def edges_plan(data: Mapping[str, Any] | None, *, run_device: RoleProfile, run_network: str,
               run_link: LinkProfile, option: Callable[[str, str], dict]) -> EdgesPlan:
    """A checked :class:`EdgesPlan` from the ``edges`` config mapping. ``option(group, name)``
    reads a config group's option (an unknown name is an error listing the valid ones)."""
    data = dict(data or {})
    unknown = sorted(set(data) - set(EDGES_KEYS))
    if unknown:
        raise EdgesError(f"edges: unknown key(s) {', '.join(unknown)}; valid: {', '.join(EDGES_KEYS)}")
    n = data.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EdgesError(f"edges.n must be a positive integer (the number of edge devices), got {n!r}")
    # unset keys (null in the YAML, there so `edges.arrivals.rate=...` can be given) are left out
    arrivals = {k: v for k, v in dict(data.get("arrivals") or {"kind": "closed"}).items() if v is not None}
    kind = arrivals.get("kind", "closed")
    if kind not in ARRIVAL_KINDS:
        raise EdgesError(f"edges.arrivals.kind must be one of {', '.join(ARRIVAL_KINDS)}, got {kind!r}")
    allowed = {"closed": {"kind"}, "poisson": {"kind", "rate", "seed"}, "gamma": {"kind", "rate", "burstiness", "seed"}}
    # a profile's rate stays set when a run switches it to another kind: what the kind does not use is dropped
    ignored = {"closed": {"rate", "burstiness"}, "poisson": {"burstiness"}, "gamma": set()}
    arrivals = {k: v for k, v in arrivals.items() if k not in ignored[kind]}
    extra = sorted(set(arrivals) - allowed[kind])
    if extra:
        raise EdgesError(f"edges.arrivals ({kind}): unknown key(s) {', '.join(extra)}; "
                         f"valid: {', '.join(sorted(allowed[kind]))}")
    if kind != "closed":
        from workloads.arrivals import ArrivalError, arrival_process

        try:
            arrival_process(arrivals)
        except ArrivalError as exc:
            raise EdgesError(f"edges.arrivals: {exc}") from exc
    per_edge = data.get("requests_per_edge")
    if per_edge is not None and (isinstance(per_edge, bool) or not isinstance(per_edge, int) or per_edge < 1):
        raise EdgesError(f"edges.requests_per_edge must be a positive integer or null, got {per_edge!r}")
    devices = []
    for name in _names(data.get("devices"), "devices"):
        try:
            devices.append((name, role_profile(option("device", name)["edge"])))
        except KeyError as exc:
            raise EdgesError(f"edges.devices: device profile {name!r} has no {exc.args[0]!r} role") from exc
        except ValueError as exc:
            raise EdgesError(f"edges.devices: {exc}") from exc
    networks = []
    for name in _names(data.get("networks"), "networks"):
        try:
            networks.append((name, LinkProfile.from_network(parse_profile(option("network", name)))))
        except (ProfileError, ValueError) as exc:
            raise EdgesError(f"edges.networks: {exc}") from exc
    edges = []
    for i in range(n):
        dev_option, device = devices[i % len(devices)] if devices else ("", run_device)
        net_name, link = networks[i % len(networks)] if networks else (run_network, run_link)
        edges.append(EdgePlan(f"e{i}", device, dev_option, net_name, link))
    return EdgesPlan(tuple(edges), arrivals, per_edge)


def slo_met(ttft: float | None, tpot: float | None, slo_ttft_s: float | None,
            slo_tpot_s: float | None) -> bool | None:
    """Whether a request met its SLO: TTFT within ``slo_ttft_s`` and (with two tokens or more)
    TPOT within ``slo_tpot_s``; None without an SLO; False with no first token."""
    if slo_ttft_s is None and slo_tpot_s is None:
        return None
    if ttft is None:
        return False
    if slo_ttft_s is not None and ttft > slo_ttft_s:
        return False
    return not (slo_tpot_s is not None and tpot is not None and tpot > slo_tpot_s)


def describe_edges(plan: EdgesPlan) -> str:
    """One line: the edges' devices and networks, and their arrivals."""
    mix: dict[tuple[str, str], int] = {}
    for e in plan.edges:
        mix[(e.device.name, e.network)] = mix.get((e.device.name, e.network), 0) + 1
    parts = ", ".join(f"{k} x {d} on {net}" for (d, net), k in mix.items())
    arr = plan.arrivals
    how = "closed loop" if arr.get("kind", "closed") == "closed" else \
        f"{arr['kind']} arrivals at {arr.get('rate')} requests/s per edge"
    each = f", {plan.requests_per_edge} requests each" if plan.requests_per_edge else ""
    return f"{plan.n} edge device(s): {parts}; {how}{each}"


__all__: Sequence[str] = ("EdgePlan", "EdgesError", "EdgesPlan", "describe_edges", "edges_plan", "slo_met")
