"""The in-process link model: serialization, delay, FIFO, jitter and loss, in virtual time."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from harness.clock import run
from harness.link import CloudEnd, LinkProfile
from systems.messages import CloseSession, Failure, Upload


def _deliveries(profile: LinkProfile, sizes: list[int], gap: float = 0.0) -> list[float]:
    """Send messages of about ``sizes`` bytes edge -> cloud; return each delivery delay."""

    async def go():
        cloud = CloudEnd()
        link = cloud.new_link(profile)
        edge = link.edge_end("s")
        loop = asyncio.get_running_loop()
        sent = []
        for n in sizes:
            sent.append(loop.time())
            await edge.send(Upload("s", round=0, start=0, tokens=[1] * max(0, n // 2)))
            if gap:
                await asyncio.sleep(gap)
        return [(await cloud.recv()).t_recv - t for t in sent]

    return run(go(), virtual=True)


def test_delay_and_rate():
    p = LinkProfile("wan", rtt_s=0.05, up_bps=10e6, down_bps=10e6)
    (one,) = _deliveries(p, [100_000])
    nbytes = len(__import__("systems.messages", fromlist=["encode"]).encode(
        Upload("s", round=0, start=0, tokens=[1] * 50_000)))
    assert one == pytest.approx(0.025 + nbytes * 8 / 10e6, rel=1e-9)


def test_fifo_queueing_back_to_back():
    p = LinkProfile("wan", rtt_s=0.02, up_bps=1e6)
    d = _deliveries(p, [10_000, 10_000, 10_000])
    assert d[0] < d[1] < d[2]  # each waits for the previous one to serialize


def test_jitter_spread():
    p = LinkProfile("jit", rtt_s=0.1, jitter_s=0.01, seed=3)
    d = _deliveries(p, [10] * 400, gap=0.05)
    assert statistics.pstdev(d) == pytest.approx(0.01, rel=0.25)
    assert statistics.mean(d) == pytest.approx(0.05, abs=0.003)


def test_uniform_jitter_stays_within_its_bounds():
    """A uniform jitter of standard deviation s spreads the one-way delay over +-s*sqrt(3) and no
    further (a normal draw of the same s would pass that bound for about 8% of messages)."""
    p = LinkProfile("jit", rtt_s=0.1, jitter_s=0.01, seed=3, jitter_distribution="uniform")
    d = _deliveries(p, [10] * 400, gap=0.05)
    half = 0.01 * 3 ** 0.5
    assert all(0.05 - half - 1e-9 <= x <= 0.05 + half + 1e-9 for x in d)
    assert max(d) - min(d) > 1.8 * half  # it does spread over (nearly) the whole range
    assert statistics.pstdev(d) == pytest.approx(0.01, rel=0.25)


def test_without_loss_a_messages_size_does_not_change_the_jitter_of_the_ones_after():
    """The seeded jitter is drawn once per message: on a loss-free link, small and large
    messages (1 and 14 segments) sent at the same times get the same delays."""
    p = LinkProfile("jit", rtt_s=0.1, jitter_s=0.01, seed=5)
    small = _deliveries(p, [10] * 50, gap=1.0)
    large = _deliveries(p, [20_000] * 50, gap=1.0)
    assert len(set(small)) > 40  # the jitter is there
    assert small == large


def test_loss_is_drawn_per_segment_a_message_spans():
    """A message a little over one MSS long (framing included) spans two segments, each lost
    with the profile's probability: 400 such messages at 10% loss lose about 80 segments (sd 9),
    where one draw per message, or a count rounded down, would lose about 40."""
    from systems.messages import encode

    msg = Upload("s", round=0, start=0, tokens=[1] * 1000)
    overhead = 1448 + 60 - len(encode(msg))  # the message and its framing: 1,508 bytes, 2 segments
    profile = LinkProfile("l", rtt_s=0.05, loss=0.1, seed=4, overhead_bytes=overhead)

    async def go():
        cloud = CloudEnd()
        link = cloud.new_link(profile)
        edge = link.edge_end("s")
        for _ in range(400):
            await edge.send(msg)
        return link.up.retransmissions

    assert 60 <= run(go(), virtual=True) <= 100


def test_jitter_never_reorders():
    """Messages 1 ms apart with 10 ms of jitter would overtake each other often if each kept
    its own draw; on one stream they land in the order sent, a late one holding back those
    behind it."""

    async def go():
        cloud = CloudEnd()
        edge = cloud.new_link(LinkProfile("jit", rtt_s=0.1, jitter_s=0.01, seed=5)).edge_end("s")
        for i in range(300):
            await edge.send(Upload("s", round=i, start=0, tokens=[1]))
            await asyncio.sleep(0.001)
        return [await cloud.recv() for _ in range(300)]

    got = run(go(), virtual=True)
    assert [e.msg.round for e in got] == list(range(300))
    times = [e.t_recv for e in got]
    assert all(a <= b for a, b in zip(times, times[1:]))
    held = sum(b == a for a, b in zip(times, times[1:]))  # landed together behind a late one
    assert held > 30, f"only {held} messages were held back: the jitter cannot have tested the order"


def test_jitter_never_delivers_before_sending():
    """One-way delay 25 ms with 25 ms of jitter after serializing at 1 Mbit/s: a draw below
    -25 ms is clipped to zero delay, never to an arrival before the message is on the wire;
    so the delay is serialization + max(0, X), X ~ N(25 ms, 25 ms), whose mean is
    mu*Phi(1) + sigma*phi(1) past the serialization."""
    from scipy.stats import norm

    from systems.messages import encode

    mu = sigma = 0.025
    profile = LinkProfile("jit", rtt_s=2 * mu, up_bps=1e6, jitter_s=sigma, seed=11)
    ser = profile.serialized_at(0.0, len(encode(Upload("s", round=0, start=0, tokens=[1] * 500))), "up")
    assert ser > 0.004
    d = [x - ser for x in _deliveries(profile, [1000] * 2000, gap=1.0)]
    assert min(d) >= -1e-12
    assert sum(x < 1e-12 for x in d) / len(d) == pytest.approx(norm.cdf(-1.0), abs=0.03)
    assert statistics.mean(d) == pytest.approx(mu * norm.cdf(1.0) + sigma * norm.pdf(1.0), rel=0.05)


def test_loss_costs_retransmission_timeouts():
    clean = _deliveries(LinkProfile("c", rtt_s=0.05, up_bps=1e7), [20_000] * 50, gap=1.0)
    lossy = _deliveries(LinkProfile("l", rtt_s=0.05, up_bps=1e7, loss=0.05, seed=1), [20_000] * 50, gap=1.0)
    extra = [b - a for a, b in zip(clean, lossy)]
    assert all(x >= -1e-12 for x in extra) and max(extra) >= 0.2  # a lost segment costs >= one RTO
    assert all(abs(x / 0.2 - round(x / 0.2)) < 1e-6 for x in extra)



def test_counters_and_timeouts_with_jitter():
    """RTT 250 ms with 20 ms of jitter: a lost segment costs RTT + 4 x jitter = 330 ms (above
    Linux's 200 ms floor). The link counts each message, its bytes and each lost segment;
    per message, the delay past the clean one is the number of its lost segments times the
    RTO, within the jitter (the two runs draw different jitter)."""
    from systems.messages import encode

    profile = LinkProfile("l", rtt_s=0.25, up_bps=1e7, jitter_s=0.02, loss=0.05, seed=2, overhead_bytes=40)
    assert profile.rto_s == pytest.approx(0.33)

    async def go():
        cloud = CloudEnd()
        link = cloud.new_link(profile)
        edge = link.edge_end("s")
        loop = asyncio.get_running_loop()
        msg = Upload("s", round=0, start=0, tokens=[1] * 10_000)
        sent = []
        for _ in range(60):
            sent.append(loop.time())
            await edge.send(msg)
            await asyncio.sleep(2.0)
        delays = [(await cloud.recv()).t_recv - t for t in sent]
        return link.up, delays, len(encode(msg))

    up, delays, nbytes = run(go(), virtual=True)
    assert up.messages == 60 and up.bytes == 60 * nbytes
    base = profile.serialized_at(0.0, nbytes, "up") + profile.rtt_s / 2
    lost = [round((d - base) / profile.rto_s) for d in delays]
    assert all(abs(d - base - k * profile.rto_s) < 0.1 for d, k in zip(delays, lost))
    assert up.retransmissions == sum(lost) > 0


def test_wire_bytes_of_a_small_message():
    """One segment: the message, its framing and one set of headers."""
    p = LinkProfile("w", overhead_bytes=26, header_bytes=52, mss=1448)
    assert p.wire_bytes(100) == 100 + 26 + 52
    assert p.wire_bytes(1448 - 26) == 1448 + 52 and p.wire_bytes(1448 - 25) == 1449 + 2 * 52
    assert LinkProfile("w", overhead_bytes=26).wire_bytes(100) == 126


def test_a_network_profile_carries_every_field_into_the_virtual_link():
    """The virtual link models the same profile the real backends realise: every field the
    two share arrives unchanged (each set to a value no default has)."""
    from dataclasses import fields

    from netem.profile import NetworkProfile, RateStep, Trace

    trace = Trace((RateStep(0.0, 1e6, 2e6), RateStep(1.0, 3e6, 4e6)))
    net = NetworkProfile("wan-x", rtt_s=0.083, up_bps=3.1e6, down_bps=7.7e6, jitter_s=0.004,
                         jitter_distribution="uniform", loss=0.013, overhead_bytes=11, header_bytes=40,
                         mss=1300, trace=trace, seed=17)
    link = LinkProfile.from_network(net)
    shared = {f.name for f in fields(LinkProfile)} & {f.name for f in fields(NetworkProfile)}
    assert shared == {"name", "rtt_s", "up_bps", "down_bps", "jitter_s", "jitter_distribution", "loss",
                      "overhead_bytes", "header_bytes", "mss", "trace", "seed"}
    for name in shared:
        assert getattr(link, name) == getattr(net, name), name


def test_replies_after_a_sessions_close_are_dropped_and_counted_one_by_one():
    """The cloud routes a reply down its session's link until it receives that session's
    CloseSession; after that each reply is dropped unsent (0 bytes) and counted once, the
    count a fleet run reports as ``dropped_replies``."""

    async def go():
        cloud = CloudEnd()
        link = cloud.new_link(LinkProfile("lan", rtt_s=0.002))
        edge = link.edge_end("s")
        cloud.route("s", link)
        sent_while_open = await cloud.send(Failure("s", reason="before the close"))
        assert sent_while_open > 0 and cloud.dropped == 0
        assert (await edge.recv()).msg.reason == "before the close"
        await edge.send(CloseSession("s"))
        assert isinstance((await cloud.recv()).msg, CloseSession)
        sizes = [await cloud.send(Failure("s", reason=f"late {i}")) for i in range(3)]
        return sizes, cloud.dropped

    sizes, dropped = run(go(), virtual=True)
    assert sizes == [0, 0, 0]
    assert dropped == 3
