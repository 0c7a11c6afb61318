"""The cloud process of wall mode: the target model, a system's cloud policy, two planes.

Data plane: gRPC (``harness/transport/specwan.proto``), one bidirectional stream per edge
device. Control plane: a FastAPI app served by uvicorn in the same process and event loop:

- ``GET /healthz``: ``{"status": "ok"}`` while the cloud policy runs (503 once it stopped);
- ``GET /info``: system and its config, model, vocabulary size and fingerprint, EOS ids,
  message protocol and transport versions, ports;
- ``GET /stats``: sessions open, messages and payload bytes each way, verify jobs done...;
- ``POST /shutdown``: stop serving and exit (status 0); only with the shared token, as a
  JSON body ``{"token": "..."}``;
- ``/docs``, ``/openapi.json``: the API's documentation (FastAPI).

::

    python -m harness.cloud_server --pair toy --system vanilla [--config '{"gamma": 4}'] \\
        --grpc-port 0 --http-port 0 --ready-file cloud.json [--batches batches.jsonl] \\
        [--host 0.0.0.0 --token-file token.txt] [--tls-cert cert.pem --tls-key key.pem]

Port 0 binds a free port; once both planes serve, the bound ports are written as JSON to
the ready file (atomically, readable by its owner only). SIGTERM and SIGINT stop it cleanly,
like ``/shutdown``.

Every gRPC stream must present the shared token (``harness/transport/auth.py``): from
``--token-file`` or the ``SPECWAN_CLOUD_TOKEN`` environment variable. Bound to loopback
without either, the server makes one and writes it to the ready file as ``"token"``; bound
to any other address it refuses to start without one. ``--tls-cert``/``--tls-key`` (PEM)
serve both planes over TLS.

With ``--batches``, each forward pass the cloud policy runs over sessions (a
:class:`systems.records.BatchRecord`) is appended to that file as one JSON line, flushed
as it is written, so a crash loses none already recorded. Its times are on the server's
clock, the event loop's monotonic time: on one host, the clock the edges record on too.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from fastapi import Request
from pydantic import BaseModel

log = logging.getLogger("specwan.cloud")


class ShutdownRequest(BaseModel):
    """The body of ``POST /shutdown``: the cloud's shared token."""

    token: str

TRANSPORT_VERSION = "specwan.v1"


def build_app(state: "CloudState"):
    """The control-plane app over the server's live state."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    from harness.transport.auth import token_matches

    app = FastAPI(
        title="SpecWAN cloud server",
        version=TRANSPORT_VERSION,
        description="Control plane of a SpecWAN cloud verifier. The data plane is the gRPC service "
                    "specwan.v1.SpecLink (harness/transport/specwan.proto).",
    )

    @app.get("/healthz", summary="Liveness: ok while the cloud policy serves",
             responses={503: {"description": "the cloud policy has stopped (with its error)"}})
    def healthz():
        if state.policy_done():
            return JSONResponse({"status": "stopped", "error": state.policy_error()}, status_code=503)
        return {"status": "ok", "uptime_s": time.monotonic() - state.started}

    @app.get("/info", summary="What this server runs: system, model, vocabulary, versions")
    def info():
        return state.info()

    @app.get("/stats", summary="Traffic and work so far")
    def stats():
        return {**state.link.snapshot(), "uptime_s": time.monotonic() - state.started}

    @app.post("/shutdown", summary="Stop serving and exit (needs the shared token, as JSON)",
              responses={400: {"description": "the body does not parse as JSON"},
                         401: {"description": "missing or wrong token"},
                         415: {"description": "the body is not application/json"}})
    def shutdown(body: ShutdownRequest, request: Request):
        # FastAPI parses a body sent without a Content-Type as JSON too; a browser can send
        # that cross-origin without a preflight, so the type is required here.
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise HTTPException(415, "send the token as a JSON body with Content-Type: application/json")
        if not token_matches(body.token, state.token):
            raise HTTPException(401, "missing or wrong token")
        state.request_stop("/shutdown")
        return {"status": "shutting down"}

    return app


class BatchFile:
    """The cloud policy's batch recorder in this process: one JSON line per
    :class:`BatchRecord` (:meth:`BatchRecord.as_row`), appended to ``path`` and flushed."""

    def __init__(self, path: Path):
        from harness.wall import batch_to_json

        self._encode = batch_to_json
        self._f = open(path, "a", encoding="utf-8")
        self.written = 0

    def batch(self, record) -> None:
        """Record one forward pass (called by the cloud policy, on the event loop)."""
        # Flushed to the kernel, not fsync'ed: this runs between a pass and its verdicts,
        # and a crash of this process (not of the host) then loses nothing.
        self._f.write(self._encode(record) + "\n")
        self._f.flush()
        self.written += 1

    def close(self) -> None:
        """Close the file (what was written is already flushed)."""
        self._f.close()


class CloudState:
    """What the control plane reports, and the stop switch."""

    def __init__(self, *, system, config, pair, engine, link, grpc_port: int, http_port: int, stop: asyncio.Event,
                 token: str, tls: bool = False):
        self.system, self.config, self.pair, self.engine, self.link = system, config, pair, engine, link
        self.grpc_port, self.http_port, self.stop = grpc_port, http_port, stop
        self.token, self.tls = token, tls
        self.started = time.monotonic()
        self.policy_task: asyncio.Task | None = None
        self.stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self.stop.set()

    def policy_done(self) -> bool:
        return self.policy_task is not None and self.policy_task.done()

    def policy_error(self) -> str | None:
        t = self.policy_task
        if t is None or not t.done() or t.cancelled() or t.exception() is None:
            return None
        e = t.exception()
        return f"{type(e).__name__}: {e}"

    def info(self) -> dict:
        from systems.messages import PROTOCOL_VERSION

        ei = self.engine.info
        return {
            "system": self.system,
            "config": dataclasses.asdict(self.config),
            "pair": self.pair,
            "model": ei.model,
            "backend": ei.backend,
            "vocab_size": ei.vocab_size,
            "vocab_fingerprint": ei.vocab_fingerprint,
            "eos_token_ids": list(ei.eos_token_ids),
            "n_ctx": ei.n_ctx,
            "protocol_version": PROTOCOL_VERSION,
            "transport": TRANSPORT_VERSION,
            "grpc_port": self.grpc_port,
            "http_port": self.http_port,
            "tls": self.tls,
            "pid": os.getpid(),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        }


def _uvicorn_server(app, log_level: str, tls: tuple[Path, Path] | None = None):
    import uvicorn

    class _Server(uvicorn.Server):
        # The process owns its signals (SIGTERM/SIGINT stop both planes): uvicorn must not
        # take them over and re-raise them at exit.
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    ssl = dict(ssl_certfile=str(tls[0]), ssl_keyfile=str(tls[1])) if tls else {}
    return _Server(uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False, **ssl))


async def serve(engine, spec, cfg, *, pair: str, host: str, grpc_port: int, http_port: int,
                ready_file: Path | None, log_level: str = "warning", batches: Path | None = None,
                token: str, token_generated: bool = False, tls: tuple[Path, Path] | None = None) -> int:
    """Serve until /shutdown, SIGTERM/SIGINT, or the cloud policy fails; the exit status.

    ``batches``: append each forward pass the policy reports (:class:`BatchFile`) to this file.
    ``token``: the shared token every stream and ``/shutdown`` must present (written to the
    ready file when ``token_generated``). ``tls``: (certificate, key) PEM files.
    """
    import grpc

    from harness.clock import LoopClock
    from harness.transport.grpc_link import SERVER_OPTIONS, GrpcCloudLink
    from harness.transport.auth import write_private
    from harness.wall import WallCompute
    from systems.api import CloudContext

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    link = GrpcCloudLink(system=spec.name, model=engine.info.model, vocab_fingerprint=engine.info.vocab_fingerprint,
                         token=token)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    link.add_to_server(server)
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls[1].read_bytes(), tls[0].read_bytes())])
        bound_grpc = server.add_secure_port(f"{host}:{grpc_port}", creds)
    else:
        bound_grpc = server.add_insecure_port(f"{host}:{grpc_port}")
    if not bound_grpc:
        log.error("cannot bind the gRPC port %s:%s", host, grpc_port)
        return 1
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, http_port))
    except OSError as e:
        log.error("cannot bind the HTTP port %s:%s: %s", host, http_port, e)
        sock.close()
        return 1
    sock.listen(128)
    sock.setblocking(False)
    bound_http = sock.getsockname()[1]

    state = CloudState(system=spec.name, config=cfg, pair=pair, engine=engine, link=link,
                       grpc_port=bound_grpc, http_port=bound_http, stop=stop, token=token, tls=tls is not None)
    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        loop.add_signal_handler(sig, state.request_stop, name)

    try:
        recorder = BatchFile(batches) if batches is not None else None
    except OSError as e:
        log.error("cannot open the batches file %s: %s", batches, e)
        sock.close()
        return 1
    compute = WallCompute()
    await server.start()
    http = _uvicorn_server(build_app(state), log_level, tls)
    http_task = loop.create_task(http.serve(sockets=[sock]))
    while not http.started and not http_task.done():
        await asyncio.sleep(0.01)
    if http_task.done():
        log.error("the control plane failed to start: %r", http_task.exception())
        await server.stop(None)
        if recorder is not None:
            recorder.close()
        return 1

    policy = spec.cloud_cls(cfg)
    state.policy_task = policy_task = loop.create_task(
        policy.serve(CloudContext(engine, LoopClock(), compute, link, recorder)))
    if ready_file is not None:
        ready = {"grpc_port": bound_grpc, "http_port": bound_http, "host": host, "pid": os.getpid(),
                 "system": spec.name, "tls": tls is not None}
        if token_generated:
            ready["token"] = token
        write_private(ready_file, json.dumps(ready))
    log.info("serving %s: gRPC %s:%d, HTTP %s:%d", spec.name, host, bound_grpc, host, bound_http)

    stop_task = loop.create_task(stop.wait())
    await asyncio.wait({stop_task, policy_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if policy_task.done() and not policy_task.cancelled() and policy_task.exception() is not None:
        e = policy_task.exception()
        reason = f"the {spec.name} cloud policy failed: {type(e).__name__}: {e}"
        log.error("%s", reason, exc_info=(type(e), e, e.__traceback__))
        status = 1
    elif http_task.done() and not stop.is_set():
        reason = "the cloud's control plane stopped unexpectedly"
        log.error("%s", reason)
        status = 1
    else:
        reason = f"the cloud server is shutting down ({state.stop_reason or 'policy ended'})"
        log.info("%s", reason)

    # Tear down: open streams end with the reason; nothing is left listening.
    link.close_streams(reason)
    policy_task.cancel()
    stop_task.cancel()
    await asyncio.gather(policy_task, stop_task, return_exceptions=True)
    await server.stop(grace=1.0)
    http.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(http_task, 5.0)
    compute.close()
    if recorder is not None:
        recorder.close()
    if ready_file is not None:
        with contextlib.suppress(OSError):
            ready_file.unlink()
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.cloud_server", description=__doc__.splitlines()[0])
    ap.add_argument("--pair", required=True, help="pair name (conf/pair) or YAML file")
    ap.add_argument("--system", required=True, help="registered system name")
    ap.add_argument("--config", default="{}", help="system config overrides as a JSON object")
    ap.add_argument("--host", default="127.0.0.1", help="address both planes bind (default 127.0.0.1)")
    ap.add_argument("--grpc-port", type=int, default=0, help="data-plane port (0: any free port)")
    ap.add_argument("--http-port", type=int, default=0, help="control-plane port (0: any free port)")
    ap.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON when serving")
    ap.add_argument("--token-file", type=Path, default=None,
                    help="the shared token every client must present (default: $SPECWAN_CLOUD_TOKEN; on "
                         "loopback without one, a new token is written to the ready file)")
    ap.add_argument("--tls-cert", type=Path, default=None, help="serve both planes over TLS: certificate (PEM)")
    ap.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key (PEM)")
    ap.add_argument("--batches", type=Path, default=None,
                    help="append each batched forward pass here, one JSON line each (default: not recorded)")
    ap.add_argument("--cpus", default=None, help="pin to these CPUs, e.g. '1' or '2,3' (skipped where impossible)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s cloud[%(process)d] %(levelname)s %(message)s")

    from harness.wall import die_with_parent, ensure_role_model, open_role_engine, parse_cpus, pin_to

    die_with_parent()
    pin_to(parse_cpus(args.cpus))
    from harness.pairs import load_pair
    from harness.transport.auth import AuthError, is_loopback, new_token, read_token
    from systems.api import get_system

    try:
        token = read_token(args.token_file)
    except AuthError as e:
        print(f"cloud_server: error: {e}", file=sys.stderr)
        return 2
    token_generated = token is None
    if token is None and not is_loopback(args.host):
        print(f"cloud_server: error: binding {args.host} (not loopback) needs a shared token: pass --token-file "
              "FILE or set SPECWAN_CLOUD_TOKEN", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("cloud_server: error: TLS needs both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    tls = (args.tls_cert, args.tls_key) if args.tls_cert is not None else None
    for p in tls or ():
        if not p.is_file():
            print(f"cloud_server: error: no such TLS file: {p}", file=sys.stderr)
            return 2
    token = token or new_token()

    try:
        spec = get_system(args.system)
        if spec.cloud_cls is None:
            raise ValueError(f"system {spec.name!r} has no cloud half; it needs no cloud server")
        overrides = json.loads(args.config)
        if not isinstance(overrides, dict):
            raise ValueError(f"--config must be a JSON object, got {args.config!r}")
        cfg = spec.make_config(overrides)
        pair = load_pair(args.pair)
        path = ensure_role_model(pair, "target")
        engine = open_role_engine(pair, "target", path)
        spec.check_engine(cfg, engine)
    except Exception as e:
        print(f"cloud_server: error: {e}", file=sys.stderr)
        return 2
    log.info("target %s (%s) loaded", engine.info.model, engine.info.backend)
    # What start-up made (modules, the model's Python objects) lives to the end: keep it out of
    # the cyclic collector's scans, which would otherwise run in the middle of rounds.
    gc.collect()
    gc.freeze()
    try:
        return asyncio.run(serve(engine, spec, cfg, pair=pair.name, host=args.host, grpc_port=args.grpc_port,
                                 http_port=args.http_port, ready_file=args.ready_file,
                                 log_level="warning" if args.log_level != "debug" else "info",
                                 batches=args.batches, token=token, token_generated=token_generated, tls=tls))
    finally:
        if hasattr(engine, "close"):
            engine.close()


if __name__ == "__main__":
    sys.exit(main())
