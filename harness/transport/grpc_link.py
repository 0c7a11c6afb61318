"""The gRPC data plane: one bidirectional stream per edge device (``specwan.proto``).

Edge side: :class:`GrpcEdgeLink` holds one edge device's stream. Its sessions share it:
``link.session(name)`` gives a per-session :class:`GrpcSessionLink` (a
:class:`systems.api.EdgeLink`), and replies are demultiplexed by ``msg.session``.

Cloud side: :class:`GrpcCloudLink` is the cloud policy's :class:`systems.api.CloudLink`:
one inbox for the messages of every stream, and each reply routed back to the stream its
session came from. Add it to a ``grpc.aio`` server with :meth:`GrpcCloudLink.add_to_server`.

Byte counts are ``len(payload)``, the encoded message's own bytes (framing excluded), so they
equal the in-process link's. Timestamps are ``time.monotonic()`` on both sides, which is
also what the wall clock of the policies (:class:`harness.clock.LoopClock` on an ordinary
asyncio loop) reads. That makes ``t_uplink``/``t_downlink`` (one side's send time against the
other side's receive time) meaningful when edge and cloud run on one host, as over loopback.
Across hosts the two monotonic clocks have unrelated origins: those one-way times then need a
clock offset (measured, e.g. NTP-style from request/response pairs) before they mean anything;
round-trip times measured on one side stay valid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from harness.transport.frames import (
    FULL_SERVICE,
    MD_DEVICE,
    MD_MODEL,
    MD_PROTOCOL,
    MD_SYSTEM,
    MD_VOCAB,
    METHOD,
    METHOD_PATH,
    FrameError,
    decode_frame,
    encode_frame,
)
from harness.transport.auth import MD_AUTH, bearer, bearer_matches
from systems.api import Envelope
from systems.messages import PROTOCOL_VERSION, CloseSession, Message, TokenOut, Verdict, decode, encode

log = logging.getLogger(__name__)

# The largest message the protocol needs, with room to spare: 32 float32 draft rows of the
# default pair's 151,936-token vocabulary (19.4 MB), or a 4,096-position prompt's float32
# hidden states of its 1.5B target (1,536 wide: 25.2 MB). gRPC's 4 MB default is too small;
# a larger limit only lets a bad client make the cloud buffer more before it is refused.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# The cloud lets its edges ping as often as their liveness check needs (gRPC's server default
# answers pings more often than every 5 minutes with GOAWAY "too_many_pings").
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 100),
    ("grpc.http2.max_ping_strikes", 0),
]


def keepalive_options(timeout_s: float, interval_s: float = 1.0) -> list[tuple[str, int]]:
    """Channel options that ping the cloud every ``interval_s`` and end the stream when a ping
    goes ``timeout_s`` unanswered: a cloud process that stopped (a stall, SIGSTOP, a dead host)
    is then found out within ``interval_s + timeout_s``, however long its verifications take,
    since gRPC's own threads answer pings while the policy computes."""
    return [
        ("grpc.keepalive_time_ms", max(1, int(interval_s * 1000))),
        ("grpc.keepalive_timeout_ms", max(1, int(timeout_s * 1000))),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.ping_timeout_ms", max(1, int(timeout_s * 1000))),
    ]


class LinkClosedError(ConnectionError):
    """The stream to the cloud is gone (the cloud stopped, died or refused the edge)."""


@dataclass
class Counter:
    """Messages and payload bytes that went one way."""

    messages: int = 0
    bytes: int = 0

    def add(self, nbytes: int) -> None:
        self.messages += 1
        self.bytes += nbytes


def _identity(b: bytes) -> bytes:
    return b


_CLOSED = object()  # inbox sentinel: the stream ended


# ---- the edge ------------------------------------------------------------------------------
class GrpcEdgeLink:
    """One edge device's stream to the cloud, shared by its sessions.

    Use ``await link.connect()`` (or ``async with``), then ``link.session(name)`` per request.
    :meth:`send` and :meth:`recv` on the link itself serve messages of sessions that have no
    :meth:`session` view (enough for one session at a time). When the stream breaks, every
    pending and later ``recv``/``send`` raises :class:`LinkClosedError`, and :attr:`broken`
    (an event) is set with the reason in :attr:`error`. ``token`` is the cloud's shared
    token; ``tls_ca`` (PEM bytes) connects over TLS trusting that CA; with
    ``liveness_timeout_s`` the link pings the cloud every second and breaks, naming the
    cloud as stopped, when a ping goes that long unanswered (:func:`keepalive_options`).
    """

    def __init__(self, address: str, *, system: str, vocab_fingerprint: str = "", device: str = "edge",
                 connect_timeout: float = 10.0, token: str | None = None, tls_ca: bytes | None = None,
                 liveness_timeout_s: float | None = None):
        self.address, self.system, self.device = address, system, device
        self.token, self.tls_ca = token, tls_ca
        self.liveness_timeout_s = liveness_timeout_s
        self.vocab_fingerprint = vocab_fingerprint
        self.connect_timeout = connect_timeout
        self.up, self.down = Counter(), Counter()
        self.server_info: dict[str, str] = {}
        self.broken = asyncio.Event()
        self.error: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._reader: asyncio.Task | None = None
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._writer: asyncio.Task | None = None
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._sessions: dict[str, asyncio.Queue] = {}

    async def connect(self) -> dict[str, str]:
        """Open the stream; returns the cloud's metadata (system, protocol, model)."""
        options = list(CHANNEL_OPTIONS)
        if self.liveness_timeout_s is not None:
            options += keepalive_options(self.liveness_timeout_s)
        if self.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_ca)
            self._channel = grpc.aio.secure_channel(self.address, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.address, options=options)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.connect_timeout)
        except asyncio.TimeoutError:
            await self._channel.close()
            raise LinkClosedError(f"no cloud answered at {self.address} within {self.connect_timeout:g} s") from None
        method = self._channel.stream_stream(METHOD_PATH, request_serializer=_identity,
                                             response_deserializer=decode_frame)
        self._call = method(metadata=(
            (MD_PROTOCOL, str(PROTOCOL_VERSION)),
            (MD_SYSTEM, self.system),
            (MD_VOCAB, self.vocab_fingerprint),
            (MD_DEVICE, self.device),
            *((bearer(self.token),) if self.token else ()),
        ))
        md = await self._call.initial_metadata()
        self.server_info = {k: v for k, v in (md or ()) if isinstance(v, str)}
        if MD_SYSTEM not in self.server_info:  # refused before accepting the stream
            code, details = await self._call.code(), await self._call.details()
            await self._channel.close()
            raise LinkClosedError(f"the cloud at {self.address} refused the stream: {code.name}: {details}")
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._writer = loop.create_task(self._write())
        return self.server_info

    async def __aenter__(self) -> "GrpcEdgeLink":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def session(self, name: str) -> "GrpcSessionLink":
        """The link of one session (request); replies for ``name`` go to it alone."""
        if name in self._sessions:
            raise ValueError(f"session {name!r} is already open on this link")
        inbox: asyncio.Queue = asyncio.Queue()
        if self.error is not None:
            inbox.put_nowait(_CLOSED)
        self._sessions[name] = inbox
        return GrpcSessionLink(self, name, inbox)

    def release(self, name: str) -> None:
        """Forget a finished session; late replies for it are dropped."""
        self._sessions.pop(name, None)

    async def send(self, msg: Message) -> int:
        """Queue one message (any session's) for the stream; returns its size in bytes.

        Like the in-process link, sending does not wait for the transport: frames are
        stamped now and written in order by one writer task.
        """
        if self.error is not None:
            raise LinkClosedError(self.error)
        payload = encode(msg)
        self._outbox.put_nowait(encode_frame(payload, time.monotonic()))
        self.up.add(len(payload))
        return len(payload)

    async def _write(self) -> None:
        try:
            while True:
                frame = await self._outbox.get()
                if frame is None:
                    await self._call.done_writing()
                    return
                await self._call.write(frame)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the call is over (the reader reports why) or unusable
            self._fail(f"sending to the cloud at {self.address} failed: {_describe(e)}")

    async def recv(self) -> Envelope:
        """The next message for a session without its own :meth:`session` view."""
        return await _take(self._inbox, self)

    async def _read(self) -> None:
        try:
            while True:
                frame = await self._call.read()
                if frame is grpc.aio.EOF:
                    code = await self._call.code()
                    if code == grpc.StatusCode.OK:
                        self._fail(f"the cloud at {self.address} ended the stream")
                    else:
                        self._fail(f"the cloud at {self.address} ended the stream: "
                                   f"{code.name}: {await self._call.details()}")
                    return
                payload, t_sent = frame
                t_recv = time.monotonic()
                msg = decode(payload)
                self.down.add(len(payload))
                inbox = self._sessions.get(msg.session, self._inbox)
                inbox.put_nowait(Envelope(msg, len(payload), t_sent, t_recv))
        except asyncio.CancelledError:
            self._fail("the link was closed")
            raise
        except grpc.aio.AioRpcError as e:
            said = (e.details() or "").lower()
            if self.liveness_timeout_s is not None and ("ping timeout" in said or "keepalive" in said):
                self._fail(f"the cloud at {self.address} stopped answering: no reply to a ping within "
                           f"{self.liveness_timeout_s:g} s ({_describe(e)})")
            else:
                self._fail(f"lost the stream to the cloud at {self.address}: {_describe(e)}")
        except Exception as e:  # a frame that does not decode
            self._fail(f"bad frame from the cloud at {self.address}: {type(e).__name__}: {e}")

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            self.broken.set()
            for inbox in [self._inbox, *self._sessions.values()]:
                inbox.put_nowait(_CLOSED)

    async def close(self, timeout: float = 5.0) -> None:
        """Flush what was sent, close our side, let the cloud end the stream, close the channel."""
        if self._writer is not None and self.error is None:
            self._outbox.put_nowait(None)  # the writer half-closes after the queued frames
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.gather(self._writer, self._reader)), timeout)
            except asyncio.TimeoutError:
                pass
        for task in (self._writer, self._reader):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fail("the link was closed")
        if self._channel is not None:
            await self._channel.close()


class GrpcSessionLink:
    """One session's end of an edge device's stream (a :class:`systems.api.EdgeLink`)."""

    def __init__(self, link: GrpcEdgeLink, session: str, inbox: asyncio.Queue):
        self.link, self.session, self._inbox = link, session, inbox

    async def send(self, msg: Message) -> int:
        return await self.link.send(msg)

    async def recv(self) -> Envelope:
        return await _take(self._inbox, self.link)


async def _take(inbox: asyncio.Queue, link: GrpcEdgeLink) -> Envelope:
    item = await inbox.get()
    if item is _CLOSED:
        inbox.put_nowait(_CLOSED)  # every later recv fails the same way
        raise LinkClosedError(link.error)
    return item


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


# ---- the cloud -----------------------------------------------------------------------------
@dataclass
class _Stream:
    id: int
    device: str
    peer: str
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    sessions: set[str] = field(default_factory=set)  # open sessions that came on this stream (cloud names)
    names: dict[str, str] = field(default_factory=dict)  # cloud name -> the edge's name, for replies
    ended: bool = False

    def cloud_name(self, name: str) -> str:
        """The name the cloud policy knows the edge's session ``name`` by: the stream's own
        namespace, so two streams' sessions never meet, whatever names their edges choose."""
        return f"{name}@{self.id}"


@dataclass
class CloudStats:
    """What crossed the cloud's end of the link (payload bytes) and what it did."""

    up: Counter = field(default_factory=Counter)  # edge -> cloud
    down: Counter = field(default_factory=Counter)  # cloud -> edge
    sessions_total: int = 0
    sessions_abandoned: int = 0  # open when their edge's stream ended
    streams_total: int = 0
    streams_refused: int = 0
    verify_jobs: int = 0  # verdicts sent for verified windows
    stale_verdicts: int = 0  # verdicts for windows an earlier verdict discarded
    tokens_streamed: int = 0  # tokens generated by the target alone (cloud-only)
    dropped_down: int = 0  # replies for sessions whose stream had gone


class GrpcCloudLink:
    """The cloud's end: one inbox for all streams, replies routed by session."""

    def __init__(self, *, system: str, model: str = "", vocab_fingerprint: str = "", token: str | None = None):
        """``token``: refuse every stream that does not present it (None: accept any)."""
        self.system, self.model, self.vocab_fingerprint = system, model, vocab_fingerprint
        self.token = token
        self.stats = CloudStats()
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._routes: dict[str, _Stream] = {}
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handler = grpc.stream_stream_rpc_method_handler(
            self._connect, request_deserializer=decode_frame, response_serializer=_identity)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FULL_SERVICE, {METHOD: handler}),))

    # ---- CloudLink -------------------------------------------------------------------------
    async def recv(self) -> Envelope:
        return await self._inbox.get()

    async def send(self, msg: Message) -> int:
        stream = self._routes.get(msg.session)
        if stream is None or stream.ended:
            self.stats.dropped_down += 1
            return len(encode(msg))
        payload = encode(dataclasses.replace(msg, session=stream.names[msg.session]))
        stream.outbox.put_nowait(encode_frame(payload, time.monotonic()))
        self.stats.down.add(len(payload))
        if isinstance(msg, Verdict):
            if msg.stale:
                self.stats.stale_verdicts += 1
            else:
                self.stats.verify_jobs += 1
        elif isinstance(msg, TokenOut):
            self.stats.tokens_streamed += 1
        return len(payload)

    # ---- status ----------------------------------------------------------------------------
    @property
    def sessions_open(self) -> int:
        return len(self._routes)

    @property
    def streams_open(self) -> int:
        return len(self._streams)

    def snapshot(self) -> dict:
        s = self.stats
        return {
            "sessions_open": self.sessions_open,
            "sessions_total": s.sessions_total,
            "sessions_abandoned": s.sessions_abandoned,
            "streams_open": self.streams_open,
            "streams_total": s.streams_total,
            "streams_refused": s.streams_refused,
            "messages_up": s.up.messages,
            "bytes_up": s.up.bytes,
            "messages_down": s.down.messages,
            "bytes_down": s.down.bytes,
            "verify_jobs": s.verify_jobs,
            "stale_verdicts": s.stale_verdicts,
            "tokens_streamed": s.tokens_streamed,
            "dropped_down": s.dropped_down,
        }

    def close_streams(self, reason: str = "the cloud server is shutting down") -> None:
        """End every stream with UNAVAILABLE and ``reason`` (what the edges will report)."""
        for stream in list(self._streams.values()):
            stream.outbox.put_nowait((grpc.StatusCode.UNAVAILABLE, reason))

    # ---- the RPC ---------------------------------------------------------------------------
    def _refusal(self, md: dict) -> str | None:
        """Why a stream with call metadata ``md`` is refused (after the token), or None."""
        proto = md.get(MD_PROTOCOL)
        if proto != str(PROTOCOL_VERSION):
            return f"message protocol version {proto!r} at the edge, {PROTOCOL_VERSION} at the cloud"
        system = md.get(MD_SYSTEM)
        if system != self.system:
            return f"the edge runs system {system!r}, the cloud serves {self.system!r}"
        vocab = md.get(MD_VOCAB, "")
        if self.vocab_fingerprint and not vocab:
            return ("the edge sent no vocabulary fingerprint (specwan-vocab): speculative decoding needs one "
                    "shared vocabulary, and the cloud checks it on every stream")
        if vocab and self.vocab_fingerprint and vocab != self.vocab_fingerprint:
            return (f"vocabulary fingerprints differ (edge draft {vocab}, cloud target "
                    f"{self.vocab_fingerprint}): speculative decoding needs one shared vocabulary")
        return None

    async def _connect(self, request_iterator, context):
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        if self.token is not None and not bearer_matches(md.get(MD_AUTH), self.token):
            self.stats.streams_refused += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token: pass the cloud's shared token (SPECWAN_CLOUD_TOKEN)")
        problem = self._refusal(md)
        if problem is not None:
            self.stats.streams_refused += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        await context.send_initial_metadata((
            (MD_SYSTEM, self.system), (MD_PROTOCOL, str(PROTOCOL_VERSION)), (MD_MODEL, self.model)))
        stream = _Stream(next(self._ids), md.get(MD_DEVICE, "edge"), context.peer())
        self._streams[stream.id] = stream
        self.stats.streams_total += 1
        reader = asyncio.get_running_loop().create_task(self._read(stream, request_iterator))
        try:
            while True:
                item = await stream.outbox.get()
                if item is None:
                    break
                if isinstance(item, tuple):  # (status code, reason): end the call with it
                    await context.abort(*item)
                yield item
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._end(stream)

    async def _read(self, stream: _Stream, request_iterator) -> None:
        try:
            async for payload, t_sent in request_iterator:
                t_recv = time.monotonic()
                try:
                    msg = decode(payload)
                except Exception as e:
                    stream.outbox.put_nowait((grpc.StatusCode.INVALID_ARGUMENT,
                                              f"undecodable message: {type(e).__name__}: {e}"))
                    return
                name = stream.cloud_name(msg.session)
                stream.names.setdefault(name, msg.session)
                msg.session = name
                owner = self._routes.get(name)
                if owner is None and not isinstance(msg, CloseSession):
                    self._routes[name] = stream
                    stream.sessions.add(name)
                    self.stats.sessions_total += 1
                self.stats.up.add(len(payload))
                self._inbox.put_nowait(Envelope(msg, len(payload), t_sent, t_recv))
                if isinstance(msg, CloseSession):
                    if owner is stream:
                        stream.sessions.discard(name)
                        self._routes.pop(name, None)
                    stream.names.pop(name, None)
        except asyncio.CancelledError:
            raise
        except FrameError as e:  # bytes that are not a Frame at all: that stream's fault, said so
            stream.outbox.put_nowait((grpc.StatusCode.INVALID_ARGUMENT, f"not a specwan.v1.Frame: {e}"))
            return
        except Exception as e:  # the edge vanished; the stream is over
            log.info("stream %d (%s) from %s ended: %s", stream.id, stream.device, stream.peer, _describe(e))
        # The edge closed its side (or is gone): once its sessions are settled, end the stream.
        stream.outbox.put_nowait(None)

    def _end(self, stream: _Stream) -> None:
        """Forget a stream; sessions still open on it are closed at the policy."""
        if stream.ended:
            return
        stream.ended = True
        self._streams.pop(stream.id, None)
        now = time.monotonic()
        for name in sorted(stream.sessions):  # cloud names
            if self._routes.get(name) is stream:
                del self._routes[name]
            self.stats.sessions_abandoned += 1
            self._inbox.put_nowait(Envelope(CloseSession(name), 0, now, now))
        stream.sessions.clear()
        stream.names.clear()
