"""The edge process of wall mode: one edge device running a system's edge policy.

It loads the edge's model (the draft; the target for a system whose edge runs target
layers, :attr:`systems.api.SystemSpec.edge_model`), opens one gRPC stream to the cloud (its
requests' sessions share it), serves the requests one after another, and appends one JSON
line per finished request to ``--out`` (the fields of :class:`systems.records.RequestRecord`, rounds included),
flushed at once, so a crash loses at most the request in flight. If the link to the cloud
breaks (the cloud stopped or died) or a request fails, that request is written with
``error`` set and the client stops with a message and exit status 1.

::

    python -m harness.edge_client --pair toy --system vanilla --grpc 127.0.0.1:50051 \\
        --requests requests.jsonl --out records.jsonl [--token-file token.txt] [--tls-ca ca.pem]

The cloud's shared token comes from ``--token-file`` or ``SPECWAN_CLOUD_TOKEN``
(``harness/transport/auth.py``). Session names are ``<device>-<request id>``; the cloud keeps
each stream's sessions apart, so another client cannot claim one. With ``--liveness-timeout S`` the edge
pings the cloud every second and fails the request in flight, naming the cloud as stopped,
when a ping goes S seconds unanswered.

The requests file holds one JSON object per line with the fields of
:class:`systems.api.GenerationRequest` (``sampling`` as a mapping).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from systems.api import GenerationRequest, SystemSpec
from systems.records import RequestRecord


async def cancel_task(task: asyncio.Task, tries: int = 5, wait_s: float = 0.5) -> None:
    """Cancel a policy task; again if its clean-up awaits something that will never come."""
    for _ in range(tries):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=wait_s)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: no "never retrieved" noise


CLOUD_PER_RUN_REASON = ("cloud: one process serves every request, so its energy is a whole-run figure "
                        "(manifest.json, energy.cloud_run)")


async def run_edge(
    spec: SystemSpec,
    cfg,
    draft,
    requests: Sequence[GenerationRequest],
    out,
    *,
    address: str | None,
    device: str = "edge",
    q_dtype: str = "float32",
    energy_mode: str = "auto",
    token: str | None = None,
    tls_ca: bytes | None = None,
    liveness_timeout_s: float | None = None,
    on_cloud_lost: str = "fail",
    retry_within_s: float = 30.0,
) -> tuple[int, str | None]:
    """Serve ``requests`` in order, writing each record to ``out``; ``(finished, error)``.

    When the link to the cloud breaks, ``on_cloud_lost`` says what becomes of the request:
    ``fail`` (recorded with the error; the client stops), ``retry`` (served again from the
    start on a new stream, reconnecting for up to ``retry_within_s``), or ``edge_only`` (the
    tokens already committed are kept and the draft model decodes the rest alone, as do later
    requests while the cloud is gone). Either way the record's ``recovery`` says so.
    """
    from harness.clock import LoopClock
    from harness.energy.select import select_meter
    from harness.transport.grpc_link import GrpcEdgeLink, LinkClosedError
    from harness.wall import WallCompute, record_to_json

    loop = asyncio.get_running_loop()

    def quiet_link_errors(loop, context):
        # A policy's own reader task dies with the link; the request's failure says why.
        if not isinstance(context.get("exception"), LinkClosedError):
            loop.default_exception_handler(context)

    loop.set_exception_handler(quiet_link_errors)
    clock = LoopClock()
    compute = WallCompute()
    # Energy of this edge process per request (energy=auto: NVML, RAPL, else the CPU-time
    # estimate). The cloud serves every request from one process: its figure is per run.
    meter = select_meter("edge", energy_mode, pid=os.getpid())
    policy = spec.edge_cls(cfg)
    needs_cloud = spec.cloud_cls is not None
    if needs_cloud and not address:
        return 0, f"system {spec.name!r} needs a cloud: give --grpc HOST:PORT"
    if on_cloud_lost == "edge_only" and (draft is None or spec.edge_model != "draft"):
        return 0, f"on_cloud_lost=edge_only needs a draft model at the edge; {spec.name} has none"
    edge = _Edge(spec, policy, draft, clock, compute, q_dtype, device)

    async def connect(deadline: float | None = None):
        """A connected link; with ``deadline``, keep trying until then (None: one try)."""
        while True:
            link = GrpcEdgeLink(address, system=spec.name, device=device,
                                vocab_fingerprint=draft.info.vocab_fingerprint if draft is not None else "",
                                token=token, tls_ca=tls_ca, liveness_timeout_s=liveness_timeout_s,
                                connect_timeout=10.0 if deadline is None else max(1.0, min(10.0, deadline - loop.time())))
            try:
                await link.connect()
                return link
            except LinkClosedError:
                await link.close()
                if deadline is None or loop.time() + 0.5 >= deadline:
                    raise
                await asyncio.sleep(0.5)

    link = None
    lost: str | None = None  # why the cloud is gone (edge_only keeps going without it)
    finished = 0
    try:
        if needs_cloud:
            try:
                link = await connect(loop.time() + retry_within_s if on_cloud_lost == "retry" else None)
            except LinkClosedError as e:
                if on_cloud_lost != "edge_only":
                    return 0, str(e)
                lost = str(e)
        for req in requests:
            meter.begin(req.request_id)
            if needs_cloud and lost is not None:  # edge_only with the cloud gone: the draft alone
                record = await edge.finish_alone(req, None, lost)
            else:
                record, link_lost = await edge.attempt(req, link)
                if link_lost and on_cloud_lost == "retry":
                    reason, tries = record.error, 0
                    deadline = loop.time() + retry_within_s
                    while link_lost and loop.time() < deadline:
                        await link.close()
                        try:
                            link = await connect(deadline)
                        except LinkClosedError:
                            break
                        tries += 1
                        record, link_lost = await edge.attempt(req, link)
                    if record.error is None:
                        record.recovery = f"retried {tries} time(s): {reason}"
                    else:
                        record.error = f"{record.error} (after {tries} retries within {retry_within_s:g} s)"
                elif link_lost and on_cloud_lost == "edge_only":
                    lost = record.error
                    record = await edge.finish_alone(req, record, lost)
            reading = meter.end(req.request_id)
            record.energy = {"edge_j": reading.joules, "edge_kind": reading.kind if reading.joules is not None else None,
                             "cloud_j": None, "cloud_kind": None, "kind": None,
                             "reason": (reading.reason or "") + CLOUD_PER_RUN_REASON}
            out.write(record_to_json(record) + "\n")
            out.flush()
            if record.error is not None:
                return finished, f"request {req.request_id!r} failed: {record.error}"
            finished += 1
        return finished, None
    finally:
        if link is not None:
            await link.close()
        compute.close()


class _Edge:
    """One edge device's way of serving a request: over the cloud link, or alone."""

    def __init__(self, spec: SystemSpec, policy, draft, clock, compute, q_dtype: str, device: str):
        self.spec, self.policy, self.draft = spec, policy, draft
        self.clock, self.compute, self.q_dtype, self.device = clock, compute, q_dtype, device

    async def attempt(self, req: GenerationRequest, link) -> tuple[RequestRecord, bool]:
        """Serve ``req`` once; its record (``error`` set if it failed) and whether the link broke."""
        from harness.inprocess import RequestRecorder, serve_request
        from harness.transport.grpc_link import LinkClosedError

        session = f"{self.device}-{req.request_id}"
        recorder = RequestRecorder(self.clock)
        start = self.clock.now()
        traffic = (lambda: (link.up.bytes, link.down.bytes)) if link is not None else None
        up0, down0 = traffic() if traffic else (0, 0)
        task = asyncio.get_running_loop().create_task(serve_request(
            self.spec, self.policy, req, session=session, clock=self.clock, compute=self.compute,
            link=link.session(session) if link is not None else None, draft=self.draft,
            recorder=recorder, q_dtype=self.q_dtype, traffic=traffic))
        watch = {task}
        broken = None
        if link is not None:
            broken = asyncio.get_running_loop().create_task(link.broken.wait())
            watch.add(broken)
        try:
            await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if broken is not None:
                broken.cancel()
        if link is not None:
            link.release(session)
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result(), False
        link_lost = True
        if task.done() and not task.cancelled() and not isinstance(task.exception(), LinkClosedError):
            e = task.exception()
            error, link_lost = f"{type(e).__name__}: {e}", False
        else:
            error = link.error if link is not None and link.error else "the request was cancelled"
        await cancel_task(task)
        up1, down1 = traffic() if traffic else (0, 0)
        return RequestRecord(
            request_id=req.request_id, system=self.spec.name, prompt_tokens=len(req.prompt),
            output_tokens=list(recorder.tokens), start=start, end=self.clock.now(),
            token_times=list(recorder.token_times), rounds=list(recorder.rounds), error=error,
            bytes_up=up1 - up0, bytes_down=down1 - down0), link_lost

    async def finish_alone(self, req: GenerationRequest, partial: RequestRecord | None, why: str) -> RequestRecord:
        """``req`` completed by the draft model alone (edge-only decoding), after the tokens
        ``partial`` already committed with the cloud; the record says so in ``recovery``."""
        from harness.inprocess import RequestRecorder, serve_request
        from systems.api import get_system

        alone = get_system("edge_only")
        kept = list(partial.output_tokens) if partial is not None else []
        start = partial.start if partial is not None else self.clock.now()
        eos = set(self.draft.info.eos_token_ids) | set(req.stop_ids)
        left = req.max_new_tokens - len(kept)
        tail = None
        if left > 0 and not (kept and kept[-1] in eos):
            rest = dataclasses.replace(req, prompt=[*req.prompt, *kept], max_new_tokens=left, arrival=None)
            tail = await serve_request(alone, alone.edge_cls(alone.make_config({})), rest,
                                       session=f"{self.device}-{req.request_id}-alone", clock=self.clock,
                                       compute=self.compute, link=None, draft=self.draft,
                                       recorder=RequestRecorder(self.clock), q_dtype=self.q_dtype)
        return RequestRecord(
            request_id=req.request_id, system=self.spec.name, prompt_tokens=len(req.prompt),
            output_tokens=kept + (tail.output_tokens if tail else []), start=start,
            end=tail.end if tail else self.clock.now(),
            token_times=(list(partial.token_times) if partial else []) + (list(tail.token_times) if tail else []),
            rounds=list(partial.rounds) if partial else [],
            bytes_up=partial.bytes_up if partial else 0, bytes_down=partial.bytes_down if partial else 0,
            recovery=f"edge_only from token {len(kept)}: {why}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.edge_client", description=__doc__.splitlines()[0])
    ap.add_argument("--pair", required=True, help="pair name (conf/pair) or YAML file")
    ap.add_argument("--system", required=True, help="registered system name")
    ap.add_argument("--config", default="{}", help="system config overrides as a JSON object")
    ap.add_argument("--grpc", default=None, help="the cloud's data plane, HOST:PORT")
    ap.add_argument("--requests", required=True, type=Path, help="JSON lines of GenerationRequest fields")
    ap.add_argument("--out", required=True, type=Path, help="append one JSON line per finished request here")
    ap.add_argument("--device", default="edge", help="this edge device's name (prefixes its session names)")
    ap.add_argument("--q-dtype", default="float32", help="precision of uploaded draft distributions")
    ap.add_argument("--cpus", default=None, help="pin to these CPUs, e.g. '0' (skipped where impossible)")
    ap.add_argument("--token-file", type=Path, default=None,
                    help="the cloud's shared token (default: $SPECWAN_CLOUD_TOKEN)")
    ap.add_argument("--tls-ca", type=Path, default=None,
                    help="connect over TLS, trusting this CA certificate (PEM)")
    ap.add_argument("--liveness-timeout", type=float, default=None,
                    help="seconds an unanswered ping may take before the cloud counts as stopped (default: off)")
    ap.add_argument("--on-cloud-lost", default="fail", choices=["fail", "retry", "edge_only"],
                    help="when the cloud is lost: fail the request (default), retry it on a new stream, "
                         "or finish it with the draft model alone")
    ap.add_argument("--retry-within", type=float, default=30.0,
                    help="with --on-cloud-lost retry: seconds to keep reconnecting (default 30)")
    args = ap.parse_args(argv)

    from harness.wall import (
        die_with_parent,
        ensure_role_model,
        open_role_engine,
        parse_cpus,
        pin_to,
        request_from_json,
    )

    die_with_parent()
    pin_to(parse_cpus(args.cpus))
    from harness.pairs import load_pair
    from harness.transport.auth import read_token
    from systems.api import get_system

    try:
        token = read_token(args.token_file)
        tls_ca = args.tls_ca.read_bytes() if args.tls_ca is not None else None
        if args.liveness_timeout is not None and not args.liveness_timeout > 0:
            raise ValueError(f"--liveness-timeout must be > 0 seconds, got {args.liveness_timeout}")
        spec = get_system(args.system)
        overrides = json.loads(args.config)
        if not isinstance(overrides, dict):
            raise ValueError(f"--config must be a JSON object, got {args.config!r}")
        cfg = spec.make_config(overrides)
        requests = [request_from_json(json.loads(line))
                    for line in args.requests.read_text().splitlines() if line.strip()]
        pair = load_pair(args.pair)
        # the draft for a speculative system; the target for one whose edge runs target layers
        draft = open_role_engine(pair, spec.edge_model, ensure_role_model(pair, spec.edge_model))
        spec.check_engine(cfg, draft)
    except Exception as e:
        print(f"edge_client: error: {e}", file=sys.stderr)
        return 2
    # What start-up made (modules, the model's Python objects) lives to the end: keep it out of
    # the cyclic collector's scans, which would otherwise run in the middle of rounds.
    gc.collect()
    gc.freeze()
    try:
        with open(args.out, "a") as out:
            finished, error = asyncio.run(run_edge(spec, cfg, draft, requests, out, address=args.grpc,
                                                   device=args.device, q_dtype=args.q_dtype, token=token,
                                                   tls_ca=tls_ca, liveness_timeout_s=args.liveness_timeout,
                                                   on_cloud_lost=args.on_cloud_lost,
                                                   retry_within_s=args.retry_within))
    finally:
        if hasattr(draft, "close"):
            draft.close()
    if error is not None:
        print(f"edge_client {args.device}: stopped after {finished} of {len(requests)} requests: {error}",
              file=sys.stderr)
        return 1
    print(f"edge_client {args.device}: {finished} requests done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
