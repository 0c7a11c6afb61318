"""Run a system in one process: a cloud policy, edge policies, an in-process link.

This is the runner the conformance suite uses, and the core of virtual-time runs: the real
engines compute real tokens, the link carries real encoded messages, and time is either
virtual (devices and the link are priced by profiles) or the wall clock.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np

from harness.clock import LoopClock, run
from harness.compute import InstantCompute, ModelledCompute
from harness.energy.virtual import VirtualEnergy, attribute_run
from harness.link import CloudEnd, LinkProfile
from systems.api import (
    CloudContext,
    Compute,
    Drafter,
    EdgeContext,
    EdgeLink,
    EdgePolicy,
    GenerationRequest,
    Op,
    SystemSpec,
    get_system,
)
from systems.engines.base import Engine
from systems.messages import declared_vocab_padding
from systems.records import BatchRecord, RequestRecord, RoundRecord


class RequestRecorder:
    """Collects one request's rounds and the time each output token was emitted."""

    def __init__(self, clock: LoopClock):
        self.clock = clock
        self.rounds: list[RoundRecord] = []
        self.token_times: list[float] = []
        self.tokens: list[int] = []
        self.on_round: Callable[[RoundRecord], None] | None = None

    def round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)

    def emit(self, tokens: Sequence[int]) -> None:
        now = self.clock.now()
        self.tokens.extend(int(t) for t in tokens)
        self.token_times.extend([now] * len(tokens))


@dataclass(frozen=True)
class EdgeSpec:
    """One edge device of a multi-edge run: its name (sessions are ``<name>-<request id>``),
    its own link, its device's cost (None: instant), the device profile's name, and (where
    edges differ) the energy model whose edge power prices it (None: the run's)."""

    name: str
    link: LinkProfile
    cost: Callable[[Op], float] | None = None
    device: str = ""
    energy: VirtualEnergy | None = None


class BatchCollector:
    """The cloud's batch recorder in one process: keeps each :class:`BatchRecord` and passes
    it on (``on_batch``) as it happens."""

    def __init__(self, on_batch: Callable[[BatchRecord], None] | None = None):
        self.records: list[BatchRecord] = []
        self.on_batch = on_batch

    def batch(self, record: BatchRecord) -> None:
        self.records.append(record)
        if self.on_batch is not None:
            self.on_batch(record)


@dataclass
class RunOptions:
    """How to run: virtual time or wall, the link, device costs, clients, seeds, energy.

    ``energy`` (e.g. ``VirtualEnergy.from_profiles(edge_profile, cloud_profile)``) puts
    modelled joules on every record: ``record.energy`` per request (edge and cloud) and the
    ``energy_*`` fields of each round (see :mod:`harness.energy.virtual`). It needs the
    role's device cost (a role without one does no modelled work: its energy stays null
    with the reason). None: no energy, null with the reason.
    """

    virtual: bool = True
    link: LinkProfile = field(default_factory=LinkProfile)
    edge_cost: Callable[[Op], float] | None = None  # None: model work costs no time
    cloud_cost: Callable[[Op], float] | None = None
    clients: int = 1  # edge devices running concurrently, each with its own link
    # Multi-edge runs: the edge devices (None: ``clients`` alike ones with ``link`` and
    # ``edge_cost``) and the edge serving each request (None: round-robin). An edge serves
    # its requests one after another, each from its ``arrival`` (if set) or at once.
    edges: Sequence[EdgeSpec] | None = None
    assign: Sequence[int] | None = None
    on_batch: Callable[[BatchRecord], None] | None = None  # each forward pass the cloud reports
    q_dtype: str = "float32"
    on_round: Callable[[RoundRecord], None] | None = None
    on_request: Callable[[RequestRecord], None] | None = None  # each request as it finishes (progress)
    energy: VirtualEnergy | None = None


def run_system(
    system: str | SystemSpec,
    draft: Engine | None,
    target: Engine | None,
    requests: Sequence[GenerationRequest],
    config: dict | None = None,
    options: RunOptions | None = None,
) -> list[RequestRecord]:
    """Serve ``requests`` with a system in this process; returns one record per request."""
    spec = get_system(system) if isinstance(system, str) else system
    options = options or RunOptions()
    cfg = spec.make_config(config)
    check_engines(spec, cfg, draft, target)
    return run(_serve(spec, cfg, edge_engine(spec, draft, target), target, list(requests), options), options.virtual)


def check_engines(spec: SystemSpec, cfg, draft: Engine | None, target: Engine | None) -> None:
    """Raise ValueError (one line, naming the fix) if a side of the system cannot run with
    ``cfg`` on the engine it would get (:attr:`SystemSpec.check`)."""
    spec.check_engine(cfg, edge_engine(spec, draft, target))
    if spec.cloud_cls is not None:
        spec.check_engine(cfg, target)


def edge_engine(spec: SystemSpec, draft: Engine | None, target: Engine | None) -> Engine | None:
    """The engine an edge device of ``spec`` runs: the draft's, or the target's when its
    edge runs target layers (:attr:`SystemSpec.edge_model`)."""
    return target if spec.edge_model == "target" else draft


async def serve_request(
    spec: SystemSpec,
    policy: EdgePolicy,
    req: GenerationRequest,
    *,
    session: str,
    clock: LoopClock,
    compute: Compute,
    link: EdgeLink | None,
    draft: Engine | None,
    recorder: RequestRecorder | None = None,
    q_dtype: str = "float32",
    traffic: Callable[[], tuple[int, int]] | None = None,
    device: str = "",
) -> RequestRecord:
    """Serve one request with an edge device's policy; its record.

    The per-request part of every edge device, shared by the in-process runner and the
    wall-mode edge client (:mod:`harness.edge_client`): a drafter seeded by the request, the
    policy's context, and the record. ``draft`` is the edge device's engine: the draft
    model's, or the target's for a system whose edge runs the target (no drafter then).
    ``traffic()`` gives the device link's (bytes up, bytes down) so far; the record holds what
    this request added. Pass ``recorder`` to keep hold of what was emitted if the request fails.
    A request with an ``arrival`` time is timed from it (its wait for the device included).
    """
    recorder = recorder if recorder is not None else RequestRecorder(clock)
    rng = np.random.default_rng(req.seed)
    drafter = Drafter(draft, req.sampling, rng, q_dtype) if draft is not None and spec.edge_model == "draft" else None
    ctx = EdgeContext(session, clock, compute, link, recorder, drafter, rng, engine=draft, device=device)
    traffic = traffic or (lambda: (0, 0))
    await policy.warm_up(ctx)
    start, (up0, down0) = clock.now(), traffic()
    if req.arrival is not None:
        start = min(start, req.arrival)
    output = await policy.generate(req, ctx)
    if output != recorder.tokens:
        raise RuntimeError(f"{spec.name}: returned tokens differ from the emitted ones")
    up1, down1 = traffic()
    return RequestRecord(
        request_id=req.request_id, system=spec.name, prompt_tokens=len(req.prompt),
        output_tokens=output, start=start, end=clock.now(), token_times=recorder.token_times,
        rounds=recorder.rounds, bytes_up=up1 - up0, bytes_down=down1 - down0,
    )


async def serve_clients(spec: SystemSpec, clients: asyncio.Future, clouds: Sequence[asyncio.Task]) -> None:
    """Wait for the edge clients (one gathered future) while the cloud policies serve; a cloud
    that stops first is an error (its own, or that it stopped with requests in flight). The
    clouds are cancelled at the end."""
    try:
        if not clouds:
            await clients
        else:
            done, _ = await asyncio.wait({clients, *clouds}, return_when=asyncio.FIRST_COMPLETED)
            for task in clouds:
                if task in done:
                    clients.cancel()
                    task.result()
                    raise RuntimeError(f"{spec.name}: the cloud policy stopped while requests were in flight")
            clients.result()
    finally:
        for task in clouds:
            task.cancel()
        await asyncio.gather(*clouds, return_exceptions=True)


def wire_padding(*engines: Engine | None):
    """The link's padding for a pair that declares a wider vocabulary than it computes (a
    fitted pair: ``info.extra["wire_vocab_size"]``), so uploads cost their declared bytes."""
    for engine in engines:
        if engine is not None and (declared := engine.info.extra.get("wire_vocab_size")) is not None:
            return declared_vocab_padding(engine.info.vocab_size, int(declared))
    return None


def _compute(cost):
    return InstantCompute() if cost is None else ModelledCompute(cost)


async def _serve(spec: SystemSpec, cfg, edge, target, requests, options: RunOptions) -> list[RequestRecord]:
    clock = LoopClock()
    cloud_end = CloudEnd(wire_padding(edge, target))
    cloud_task = None
    cloud_compute = None
    if spec.cloud_cls is not None:
        cloud = spec.cloud_cls(cfg)
        cloud_compute = _compute(options.cloud_cost)
        cloud_ctx = CloudContext(target, clock, cloud_compute, cloud_end, BatchCollector(options.on_batch))
        cloud_task = asyncio.get_running_loop().create_task(cloud.serve(cloud_ctx))

    records: dict[int, RequestRecord] = {}
    edge_busy: dict[int, list] = {}  # request index -> its edge device's busy intervals
    sessions: dict[int, str] = {}

    edges = list(options.edges) if options.edges else [
        EdgeSpec(f"c{i}", options.link, options.edge_cost) for i in range(min(options.clients, max(1, len(requests))))]
    assign = list(options.assign) if options.assign is not None else [i % len(edges) for i in range(len(requests))]
    if len(assign) != len(requests) or any(not 0 <= a < len(edges) for a in assign):
        raise ValueError(f"RunOptions.assign must give each of the {len(requests)} requests an edge "
                         f"in 0..{len(edges) - 1}")

    energy = options.energy
    if energy is not None and any(e.cost is None for e in edges) and energy.edge is not None:
        energy = replace(energy, edge=None, edge_reason="no edge device cost (instant compute): busy time unknown")
    if energy is not None and cloud_compute is not None and options.cloud_cost is None and energy.cloud is not None:
        energy = replace(energy, cloud=None, cloud_reason="no cloud device cost (instant compute): busy time unknown")
    started: dict[int, float] = {}

    def energy_so_far(i: int) -> None:
        """Request i's modelled joules as soon as it ends, so a record written then carries
        them: what falls inside its span is known by then (the other requests count only as
        active or not), so these equal the end-of-run attribution."""
        if energy is None:
            return
        now = clock.now()
        order = sorted(started)
        spans = [records[j] if j == i else SimpleNamespace(start=started[j], end=records[j].end if j in records else now,
                                                           e2e=0.0, rounds=[]) for j in order]
        attribute_run(spans, energy, edge_busy=[edge_busy.get(j, []) for j in order],
                      cloud_busy=None if cloud_compute is None else list(getattr(cloud_compute, "intervals", [])),
                      sessions=[sessions[j] for j in order], edge_energy=[edges[assign[j]].energy for j in order])

    async def client(index: int) -> None:
        spec_e = edges[index]
        link = cloud_end.new_link(spec_e.link)
        compute = _compute(spec_e.cost)
        policy = spec.edge_cls(cfg)
        for i in [i for i, a in enumerate(assign) if a == index]:
            req = requests[i]
            if req.arrival is not None and req.arrival > clock.now():
                await clock.sleep(req.arrival - clock.now())
            session = f"{spec_e.name}-{req.request_id}"
            sessions[i] = session
            started[i] = clock.now() if req.arrival is None else min(clock.now(), req.arrival)
            cloud_end.route(session, link)
            recorder = RequestRecorder(clock)
            recorder.on_round = options.on_round
            n0 = len(getattr(compute, "intervals", ()))
            records[i] = await serve_request(
                spec, policy, req, session=session, clock=clock, compute=compute,
                link=link.edge_end(session), draft=edge, recorder=recorder, q_dtype=options.q_dtype,
                traffic=lambda link=link: (link.up.bytes, link.down.bytes), device=spec_e.device,
            )
            link.forget(session)
            edge_busy[i] = list(getattr(compute, "intervals", ())[n0:])
            if options.on_request is not None:
                energy_so_far(i)
                options.on_request(records[i])

    await serve_clients(spec, asyncio.gather(*(client(i) for i in sorted(set(assign)))),
                        [] if cloud_task is None else [cloud_task])
    out = [records[i] for i in range(len(requests))]
    attribute_run(out, energy, edge_busy=[edge_busy[i] for i in range(len(requests))],
                  cloud_busy=None if cloud_compute is None else getattr(cloud_compute, "intervals", []),
                  sessions=[sessions[i] for i in range(len(requests))],
                  edge_energy=[edges[assign[i]].energy for i in range(len(requests))])
    return out

