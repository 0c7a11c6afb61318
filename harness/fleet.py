"""The fleet simulator: N edge devices and k verifiers in virtual time, on the plug-ins' own
policy code, with nothing kept per finished request.

Each edge device (:class:`harness.fleet_plan.FleetEdge`) runs the system's edge policy over
its own modelled link to its verifier, on its own modelled device, issuing requests by its
arrival process until the horizon; each verifier is an instance of the system's cloud policy
on its own modelled cloud device (the run's cloud profile prices its batches) with its own
link end. The parts are the in-process runner's (:mod:`harness.inprocess`): the real link
with real message encoding, the real engines, the same edge client, so a fleet of one
verifier gives the shared-time runner's tokens and times on the same edges and requests.

Verifiers share nothing (no queue, no link, no device), so each verifier and the edges it
serves form an island, simulated in a virtual time of its own from 0: the islands one after
another in this process, or spread over worker processes (:mod:`harness.fleet_workers`),
which gives the same records faster on more cores.

What is not kept: a request's record, rounds and energy are handed to ``on_request`` as it
ends and dropped; each pass of a cloud to ``on_batch``; busy stretches feed the streamed
energy (:mod:`harness.fleet_energy`) and go; a session's link state goes when it closes.
Requests are made as their edge takes them up, never listed ahead. A finished session
leaves reference cycles (its tasks, queues and the policy's state point at each other),
which Python's collector frees only now and then: the fleet collects them every
``max(GC_EVERY, 2 N)`` requests (N: the island's edges), so its memory stays within a bound
set by N, not by time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

from harness.clock import LoopClock
from harness.compute import InstantCompute, ModelledCompute
from harness.energy.virtual import VirtualEnergy
from harness.fleet_energy import BusyFeed, CloudShares, EdgeBusy, request_energy
from harness.fleet_loop import run_virtual
from harness.fleet_plan import FleetEdge, FleetPlan
from harness.fleet_workers import run_islands
from harness.inprocess import RequestRecorder, edge_engine, serve_clients, serve_request, wire_padding
from harness.link import CloudEnd
from systems.api import CloudContext, GenerationRequest, Op, SystemSpec
from systems.engines.base import Engine
from systems.records import BatchRecord, RequestRecord


GC_EVERY = 256


@dataclass(frozen=True)
class FleetRequest:
    """What ``on_request`` gets with each finished record: the edge (its index and plan), the
    verifier, the template request it was made from (its index in ``templates``) and the
    request as served (its id, arrival and SLO)."""

    edge_index: int
    edge: FleetEdge
    template: int
    request: GenerationRequest
    session: str


@dataclass
class FleetOptions:
    """How the fleet runs: the cloud's cost model, energy (run-level; ``edge_energy[i]`` where
    edge i's device prices its own), callbacks, the draft's distribution dtype, and the worker
    processes that simulate the verifiers' islands."""

    cloud_cost: Callable[[Op], float] | None = None
    energy: VirtualEnergy | None = None
    edge_energy: Sequence[VirtualEnergy | None] | None = None
    on_request: Callable[[RequestRecord, FleetRequest], None] | None = None
    on_batch: Callable[[BatchRecord, int], None] | None = None
    q_dtype: str = "float32"
    workers: int = 1  # processes the verifiers' islands are spread over (1: all in this one)


@dataclass
class FleetTotals:
    """What a fleet run did, counted as it went: requests, output tokens, rounds, the cloud's
    passes per verifier, the virtual time its last island ended at, and replies dropped for
    closed sessions."""

    requests: int = 0
    tokens: int = 0
    rounds: int = 0
    batches: list[int] = dataclasses.field(default_factory=list)
    virtual_s: float = 0.0
    dropped_replies: int = 0


class _BatchSink:
    """A verifier's batch recorder: hands each pass on, keeps none."""

    def __init__(self, verifier: int, totals: FleetTotals, on_batch):
        self.verifier, self.totals, self.on_batch = verifier, totals, on_batch

    def batch(self, record: BatchRecord) -> None:
        self.totals.batches[self.verifier] += 1
        if self.on_batch is not None:
            self.on_batch(record, self.verifier)


def edge_requests(plan: FleetPlan, index: int, templates: Sequence[GenerationRequest], clock: LoopClock):
    """Edge ``index``'s requests, made one at a time as its device takes them up: ``(template
    index, request)``. Its j-th takes template ``(j * N + index) mod len(templates)`` (the
    workload's prompts in turn across the fleet), id ``<template id>@<edge>.<j>``, the edge's
    SLO and arrival (open loop: its process's times; closed loop: when the last one ended,
    plus any think time). None once the horizon or ``requests_per_edge`` is reached."""
    edge = plan.edges[index]
    times = arrival_stream(plan, index)
    think = float(edge.arrival.get("think_time_s", 0.0))
    j = 0

    def next_request():
        nonlocal j
        if plan.requests_per_edge is not None and j >= plan.requests_per_edge:
            return None
        if times is None:
            arrival = clock.now() + (think if j else 0.0)
            if arrival >= plan.duration_s:
                return None
        else:
            arrival = next(times, None)
            if arrival is None:
                return None
        p = (j * plan.n + index) % len(templates)
        t = templates[p]
        req = dataclasses.replace(t, request_id=f"{t.request_id}@{edge.name}.{j}", arrival=arrival,
                                  slo_ttft_s=edge.slo[0], slo_tpot_s=edge.slo[1])
        j += 1
        return p, req
    return next_request


def arrival_stream(plan: FleetPlan, index: int):
    """Edge ``index``'s open-loop arrival times (at most ``requests_per_edge``); None: closed loop."""
    times = plan.edges[index].arrival_times(plan.seed + index, plan.duration_s)
    if times is not None and plan.requests_per_edge is not None:
        times = itertools.islice(times, plan.requests_per_edge)
    return times


async def _island(spec: SystemSpec, cfg, edge_model: Engine | None, target: Engine | None, plan: FleetPlan,
                  templates: Sequence[GenerationRequest], options: FleetOptions, totals: FleetTotals,
                  verifier: int) -> None:
    """Verifier ``verifier`` and the edges it serves, in this loop's virtual time."""
    clock = LoopClock()
    padding = wire_padding(edge_model, target)
    loop = asyncio.get_running_loop()
    members = [i for i, e in enumerate(plan.edges) if e.verifier == verifier]
    end, share, tasks = CloudEnd(padding), CloudShares(), []
    for i in members:
        if (times := arrival_stream(plan, i)) is not None:
            share.expect(i, times)
    if spec.cloud_cls is not None:
        if options.cloud_cost is None:
            compute = InstantCompute()
        else:
            compute = ModelledCompute(options.cloud_cost)
            compute.intervals = BusyFeed(share.busy)
        ctx = CloudContext(target, clock, compute, end, _BatchSink(verifier, totals, options.on_batch))
        tasks.append(loop.create_task(spec.cloud_cls(cfg).serve(ctx)))
    has_cloud = spec.cloud_cls is not None and options.cloud_cost is not None
    energy = options.energy
    if energy is not None and spec.cloud_cls is not None and options.cloud_cost is None and energy.cloud is not None:
        energy = dataclasses.replace(energy, cloud=None,
                                     cloud_reason="no cloud device cost (instant compute): busy time unknown")

    async def client(index: int) -> None:
        e = plan.edges[index]
        link = end.new_link(e.link)
        compute, busy = ModelledCompute(e.device.cost), EdgeBusy()  # a fleet edge always has a device profile
        compute.intervals = busy
        own_energy = options.edge_energy[index] if options.edge_energy is not None else None
        policy = spec.edge_cls(cfg)
        next_request = edge_requests(plan, index, templates, clock)
        number = 0
        while (item := next_request()) is not None:
            p, req = item
            key, number = (index, number), number + 1
            if req.arrival is not None and req.arrival > clock.now():
                await clock.sleep(req.arrival - clock.now())
            session = f"{e.name}-{req.request_id}"
            end.route(session, link)
            if has_cloud:
                share.join(key, clock.now())
                share.name(session, key)
            recorder = RequestRecorder(clock)
            busy.take()
            rec = await serve_request(
                spec, policy, req, session=session, clock=clock, compute=compute,
                link=link.edge_end(session), draft=edge_model, recorder=recorder, q_dtype=options.q_dtype,
                traffic=lambda link=link: (link.up.bytes, link.down.bytes), device=e.device.name,
            )
            link.forget(session)
            cloud = share.leave(key, session, rec.end) if has_cloud else (None if spec.cloud_cls is None else (0.0, 0.0))
            request_energy(rec, energy, edge_busy=busy.take(), cloud=cloud, session=session, edge_energy=own_energy)
            totals.requests += 1
            totals.tokens += rec.n_tokens
            totals.rounds += len(rec.rounds)
            if options.on_request is not None:
                options.on_request(rec, FleetRequest(index, e, p, req, session))
            if totals.requests % collect_every == 0:
                gc.collect()

    collect_every = max(GC_EVERY, 2 * len(members))
    try:
        await serve_clients(spec, asyncio.gather(*(client(i) for i in members)), tasks)
    finally:
        totals.virtual_s = max(totals.virtual_s, clock.now())
        totals.dropped_replies += end.dropped


def run_fleet(spec: SystemSpec, cfg, draft: Engine | None, target: Engine | None, plan: FleetPlan,
              templates: Sequence[GenerationRequest], options: FleetOptions | None = None) -> FleetTotals:
    """Simulate the fleet in virtual time; records go to ``options.on_request`` and
    ``options.on_batch`` as they happen. ``templates``: the workload's requests, which the
    edges take in turn (:func:`edge_requests`). Each verifier's island (it and its edges)
    runs in its own virtual time from 0: one after another here, or spread over
    ``options.workers`` processes (:mod:`harness.fleet_workers`), with the same records
    either way. Returns the run's totals."""
    if not templates:
        raise ValueError("the fleet needs at least one request to take its prompts from")
    options = options or FleetOptions()
    edge_model, templates = edge_engine(spec, draft, target), list(templates)
    islands = [v for v in range(plan.verifiers) if any(e.verifier == v for e in plan.edges)]

    def simulate(verifier: int, options: FleetOptions) -> FleetTotals:
        part = FleetTotals(batches=[0] * plan.verifiers)
        run_virtual(_island(spec, cfg, edge_model, target, plan, templates, options, part, verifier))
        return part

    if min(options.workers, len(islands)) < 2:
        parts = [simulate(v, options) for v in islands]
    else:
        def in_worker(verifier: int, send) -> FleetTotals:
            # the records go back to this process's callbacks; edges travel as their index
            on_request = None if options.on_request is None else (
                lambda rec, item: send(("request", rec, item.edge_index, item.template, item.request, item.session)))
            on_batch = None if options.on_batch is None else (lambda rec, v: send(("batch", rec, v)))
            return simulate(verifier, dataclasses.replace(options, on_request=on_request, on_batch=on_batch))

        def receive(item) -> None:
            if item[0] == "request":
                _, rec, index, template, request, session = item
                options.on_request(rec, FleetRequest(index, plan.edges[index], template, request, session))
            else:
                options.on_batch(item[1], item[2])

        parts = run_islands(islands, options.workers, in_worker, receive)
    return _sum(parts, plan.verifiers)


def _sum(parts: Sequence[FleetTotals], verifiers: int) -> FleetTotals:
    """The fleet's totals from its islands' (each counts its own verifier's passes)."""
    totals = FleetTotals(batches=[0] * verifiers)
    for part in parts:
        totals.requests += part.requests
        totals.tokens += part.tokens
        totals.rounds += part.rounds
        totals.batches = [a + b for a, b in zip(totals.batches, part.batches)]
        totals.virtual_s = max(totals.virtual_s, part.virtual_s)
        totals.dropped_replies += part.dropped_replies
    return totals


__all__ = ("FleetOptions", "FleetRequest", "FleetTotals", "edge_requests", "run_fleet")
