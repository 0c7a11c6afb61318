"""Run a system in one process: a cloud policy, edge policies, an in-process link.

This is the runner the conformance suite uses, and the core of virtual-time runs: the real
engines compute real tokens, the link carries real encoded messages, and time is either
virtual (devices and the link are priced by profiles) or the wall clock.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
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
from systems.records import RequestRecord, RoundRecord


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
) -> RequestRecord:
    """Serve one request with an edge device's policy; its record.

    The per-request part of every edge device, shared by the in-process runner and the
    wall-mode edge client (:mod:`harness.edge_client`): a drafter seeded by the request, the
    policy's context, and the record. ``draft`` is the edge device's engine: the draft
    model's, or the target's for a system whose edge runs the target (no drafter then).
    ``traffic()`` gives the device link's (bytes up, bytes down) so far; the record holds what
    this request added. Pass ``recorder`` to keep hold of what was emitted if the request fails.
    """
    recorder = recorder if recorder is not None else RequestRecorder(clock)
    rng = np.random.default_rng(req.seed)
    drafter = Drafter(draft, req.sampling, rng, q_dtype) if draft is not None and spec.edge_model == "draft" else None
    ctx = EdgeContext(session, clock, compute, link, recorder, drafter, rng, engine=draft)
    traffic = traffic or (lambda: (0, 0))
    await policy.warm_up(ctx)
    start, (up0, down0) = clock.now(), traffic()
    output = await policy.generate(req, ctx)
    if output != recorder.tokens:
        raise RuntimeError(f"{spec.name}: returned tokens differ from the emitted ones")
    up1, down1 = traffic()
    return RequestRecord(
        request_id=req.request_id, system=spec.name, prompt_tokens=len(req.prompt),
        output_tokens=output, start=start, end=clock.now(), token_times=recorder.token_times,
        rounds=recorder.rounds, bytes_up=up1 - up0, bytes_down=down1 - down0,
    )


def _compute(cost):
    return InstantCompute() if cost is None else ModelledCompute(cost)


async def _serve(spec: SystemSpec, cfg, edge, target, requests, options: RunOptions) -> list[RequestRecord]:
    clock = LoopClock()
    cloud_end = CloudEnd()
    cloud_task = None
    cloud_compute = None
    if spec.cloud_cls is not None:
        cloud = spec.cloud_cls(cfg)
        cloud_compute = _compute(options.cloud_cost)
        cloud_ctx = CloudContext(target, clock, cloud_compute, cloud_end)
        cloud_task = asyncio.get_running_loop().create_task(cloud.serve(cloud_ctx))

    records: dict[int, RequestRecord] = {}
    edge_busy: dict[int, list] = {}  # request index -> its edge device's busy intervals
    sessions: dict[int, str] = {}

    async def client(index: int) -> None:
        link = cloud_end.new_link(options.link)
        compute = _compute(options.edge_cost)
        policy = spec.edge_cls(cfg)
        for i in range(index, len(requests), options.clients):
            req = requests[i]
            session = f"c{index}-{req.request_id}"
            sessions[i] = session
            cloud_end.route(session, link)
            recorder = RequestRecorder(clock)
            recorder.on_round = options.on_round
            n0 = len(getattr(compute, "intervals", ()))
            records[i] = await serve_request(
                spec, policy, req, session=session, clock=clock, compute=compute,
                link=link.edge_end(session), draft=edge, recorder=recorder, q_dtype=options.q_dtype,
                traffic=lambda link=link: (link.up.bytes, link.down.bytes),
            )
            edge_busy[i] = list(getattr(compute, "intervals", ())[n0:])
            if options.on_request is not None:
                options.on_request(records[i])

    clients = asyncio.gather(*(client(i) for i in range(min(options.clients, max(1, len(requests))))))
    try:
        if cloud_task is None:
            await clients
        else:
            done, _ = await asyncio.wait({clients, cloud_task}, return_when=asyncio.FIRST_COMPLETED)
            if cloud_task in done:
                clients.cancel()
                cloud_task.result()
                raise RuntimeError(f"{spec.name}: the cloud policy stopped while requests were in flight")
            clients.result()
    finally:
        if cloud_task is not None:
            cloud_task.cancel()
            await asyncio.gather(cloud_task, return_exceptions=True)
    out = [records[i] for i in range(len(requests))]
    energy = options.energy
    if energy is not None and options.edge_cost is None and energy.edge is not None:
        energy = replace(energy, edge=None, edge_reason="no edge device cost (instant compute): busy time unknown")
    if energy is not None and cloud_compute is not None and options.cloud_cost is None and energy.cloud is not None:
        energy = replace(energy, cloud=None, cloud_reason="no cloud device cost (instant compute): busy time unknown")
    attribute_run(out, energy, edge_busy=[edge_busy[i] for i in range(len(requests))],
                  cloud_busy=None if cloud_compute is None else getattr(cloud_compute, "intervals", []),
                  sessions=[sessions[i] for i in range(len(requests))])
    return out

