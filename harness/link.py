"""The in-process link: real message encoding, modelled delay and rate, FIFO per direction.

Messages are encoded to their wire bytes and decoded on the other side, so a policy can
never pass objects by reference and every byte count is real. Delivery time per message is
``start + bytes * 8 / rate + one_way_delay (+ jitter) (+ retransmissions)``, where
``start`` waits for the previous message in the same direction to finish serializing (one
FIFO queue per direction, as on one TCP connection: no reordering, so a delayed message
holds back the ones behind it). Loss is per MSS-sized segment; a lost segment costs one
retransmission timeout (Linux's minimum RTO, 200 ms, or RTT + 4 x jitter if larger).
Jitter is Gaussian (or uniform) on the one-way delay, clipped at zero, seeded. A profile
with no delay and no rate limit delivers at once.

Bytes on the wire: the encoded message (padded to a pair's declared vocabulary width where
it is a fitted pair's), plus ``overhead_bytes`` of framing per message,
plus ``header_bytes`` per MSS-sized TCP segment (52 B for TCP/IPv4 with timestamps in the
shipped profiles). A rate trace (:class:`netem.profile.Trace`) changes the rate over the
loop's time, from time 0 of the loop; a message serializing across a step is serialized
piecewise. The profile comes from the same :class:`netem.profile.NetworkProfile` the real
backends use (:meth:`LinkProfile.from_network`); the two agree on delivery times (see
``tests/test_link_agreement.py``).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass
from typing import Callable

from netem.profile import NetworkProfile, Trace, jitter_sample
from systems.api import Envelope
from systems.messages import CloseSession, Message, decode, encode


@dataclass(frozen=True)
class LinkProfile:
    """Delay and rate of a link; None rate means unlimited. Overhead is per-message framing."""

    name: str = "instant"
    rtt_s: float = 0.0
    up_bps: float | None = None
    down_bps: float | None = None
    overhead_bytes: int = 0
    jitter_s: float = 0.0  # standard deviation of the one-way delay
    loss: float = 0.0  # probability that a segment is lost (and retransmitted)
    mss: int = 1448
    rto_min_s: float = 0.2
    seed: int = 0
    header_bytes: int = 0  # per MSS-sized segment (TCP/IP headers)
    jitter_distribution: str = "normal"
    trace: Trace | None = None  # rates over the loop's time; replaces up_bps/down_bps

    def loss_at(self, t: float) -> float:
        """The loss probability in force at ``t`` (a trace step's, else the profile's)."""
        step_loss = self.trace.step_at(t).loss if self.trace is not None else None
        return self.loss if step_loss is None else step_loss

    @classmethod
    def from_network(cls, net: NetworkProfile) -> "LinkProfile":
        """The virtual model of a network profile (the one the real backends realise)."""
        return cls(net.name, net.rtt_s, net.up_bps, net.down_bps, net.overhead_bytes, jitter_s=net.jitter_s,
                   loss=net.loss, mss=net.mss, seed=net.seed, header_bytes=net.header_bytes,
                   jitter_distribution=net.jitter_distribution, trace=net.trace)

    @property
    def rto_s(self) -> float:
        return max(self.rto_min_s, self.rtt_s + 4 * self.jitter_s)

    def wire_bytes(self, nbytes: int) -> int:
        """Bytes a message of ``nbytes`` puts on the wire: framing, then headers per segment."""
        payload = nbytes + self.overhead_bytes
        return payload + (self.header_bytes * max(1, -(-payload // self.mss)) if self.header_bytes else 0)

    def serialized_at(self, start: float, nbytes: int, direction: str) -> float:
        """When a message of ``nbytes`` that starts serializing at ``start`` is fully sent."""
        if self.trace is not None:
            return self.trace.finish(direction, start, self.wire_bytes(nbytes) * 8.0)
        rate = self.up_bps if direction == "up" else self.down_bps
        return start + (0.0 if rate is None else self.wire_bytes(nbytes) * 8.0 / rate)

    def transfer_time(self, nbytes: int, direction: str) -> float:
        """Seconds to deliver ``nbytes`` on an idle link in one direction (from time 0 of a trace)."""
        return self.serialized_at(0.0, nbytes, direction) + self.rtt_s / 2.0


class _Direction:
    def __init__(self, profile: LinkProfile, name: str, padding: Callable[[Message], int] | None = None):
        self.profile, self.name, self.padding = profile, name, padding
        self._rng = random.Random(f"{profile.seed}-{name}")
        self._last_arrival = 0.0
        self._in_flight: deque = deque()
        self.retransmissions = 0
        self._free_at = 0.0
        self.bytes = 0
        self.messages = 0

    def send(self, msg: Message, deliver) -> int:
        loop = asyncio.get_running_loop()
        data = encode(msg)
        size = len(data) + (self.padding(msg) if self.padding is not None else 0)
        now = loop.time()
        start = max(now, self._free_at)
        self._free_at = self.profile.serialized_at(start, size, self.name)
        arrive = self._free_at + self.profile.rtt_s / 2.0
        if self.profile.jitter_s > 0:
            draw = jitter_sample(self._rng, self.profile.jitter_s, self.profile.jitter_distribution)
            arrive += max(-self.profile.rtt_s / 2.0, draw)
        loss = self.profile.loss_at(start)
        if loss > 0:
            segments = max(1, -(-(size + self.profile.overhead_bytes) // self.profile.mss))
            lost = sum(self._rng.random() < loss for _ in range(segments))
            self.retransmissions += lost
            arrive += lost * self.profile.rto_s
        arrive = max(arrive, self._last_arrival)  # one stream: no overtaking
        self._last_arrival = arrive
        self.bytes += size
        self.messages += 1
        self._in_flight.append((arrive, data, size, now, deliver))
        if len(self._in_flight) == 1:
            self._schedule(loop)
        return size

    def _schedule(self, loop) -> None:
        # Messages land strictly in order: only the head of the queue has a timer.
        arrive = self._in_flight[0][0]
        if arrive <= loop.time():
            loop.call_soon(self._land, loop)
        else:
            loop.call_at(arrive, self._land, loop)

    def _land(self, loop) -> None:
        _, data, size, sent, deliver = self._in_flight.popleft()
        deliver(Envelope(decode(data), size, sent, loop.time()))
        if self._in_flight:
            self._schedule(loop)


class InProcessLink:
    """One edge device's link to the cloud; many edge sessions may share it. ``padding``
    (:func:`systems.messages.declared_vocab_padding`) adds the bytes a message would carry at
    a pair's declared vocabulary width."""

    def __init__(self, profile: LinkProfile, cloud_inbox: asyncio.Queue,
                 padding: Callable[[Message], int] | None = None):
        self.profile = profile
        self.up = _Direction(profile, "up", padding)
        self.down = _Direction(profile, "down", padding)
        self._cloud_inbox = cloud_inbox
        self._edge_inboxes: dict[str, asyncio.Queue] = {}

    def edge_end(self, session: str) -> "EdgeEnd":
        inbox: asyncio.Queue = asyncio.Queue()
        self._edge_inboxes[session] = inbox
        return EdgeEnd(self, session, inbox)

    def deliver_down(self, env: Envelope) -> None:
        inbox = self._edge_inboxes.get(env.msg.session)
        if inbox is not None:
            inbox.put_nowait(env)

    def forget(self, session: str) -> None:
        """The edge is done with ``session``: what still reaches it is dropped, unread, as it
        would have been (its reader has stopped)."""
        self._edge_inboxes.pop(session, None)


class EdgeEnd:
    """The edge side of a session on an in-process link."""

    def __init__(self, link: InProcessLink, session: str, inbox: asyncio.Queue):
        self.link, self.session, self.inbox = link, session, inbox

    async def send(self, msg: Message) -> int:
        return self.link.up.send(msg, self.link._cloud_inbox.put_nowait)

    async def recv(self) -> Envelope:
        return await self.inbox.get()


class CloudEnd:
    """The cloud side: one inbox for every session, replies routed to the sender's link.

    A session's route goes when the cloud receives its CloseSession (the last thing its edge
    sends); a reply for a session without a route (closed at both ends: nobody would read
    it) is dropped and counted in ``dropped``."""

    def __init__(self, padding: Callable[[Message], int] | None = None):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self._routes: dict[str, InProcessLink] = {}
        self.padding = padding
        self.dropped = 0

    def new_link(self, profile: LinkProfile) -> InProcessLink:
        return InProcessLink(profile, self.inbox, self.padding)

    def route(self, session: str, link: InProcessLink) -> None:
        self._routes[session] = link

    async def send(self, msg: Message) -> int:
        link = self._routes.get(msg.session)
        if link is None:
            self.dropped += 1
            return 0
        return link.down.send(msg, link.deliver_down)

    async def recv(self) -> Envelope:
        env = await self.inbox.get()
        if isinstance(env.msg, CloseSession):
            self._routes.pop(env.msg.session, None)
        return env
