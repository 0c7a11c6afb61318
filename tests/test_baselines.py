"""HSL and EdgeLLM, PipeSD's baselines: their triggers and EdgeLLM's threshold update, from a run."""

from __future__ import annotations

import math

import pytest

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from systems.api import GenerationRequest
from systems.edgellm.policy import update_r1
from systems.engines import create_engine
from systems.protocol import SpeculativeEdge
from systems.sampling import SamplingParams
from tests.support import greedy_decode

LINK = LinkProfile("slow-up", rtt_s=0.02, up_bps=2e5, down_bps=2e7, overhead_bytes=66)


def _run(system, params):
    kw = dict(vocab_size=512, seed=2, sharpness=6.0)
    draft = create_engine("toy", role="draft", agreement=0.9, **kw)
    target = create_engine("toy", role="target", **kw)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 60, SamplingParams(), seed=i) for i in range(4)]
    recs = run_system(system, draft, target, reqs, params,
                      RunOptions(link=LINK, edge_cost=lambda op: 0.036, cloud_cost=lambda op: 0.015))
    for req, rec in zip(reqs, recs):
        assert rec.output_tokens == greedy_decode(target, req.prompt, 60)[0]
    return [r for rec in recs for r in rec.rounds if not r.extra.get("discarded")]


def test_hsl_verifies_at_the_first_unconfident_token_and_uploads_once():
    r2 = 0.5
    rounds = _run("hsl", {"r2": r2})
    fired = 0
    for r in rounds:
        trig = r.extra["trigger"]
        assert set(trig) == {"confidences", "r2"} and trig["r2"] == r2
        conf = trig["confidences"]
        if not conf:  # the last token of a request: the verdict alone supplies it
            continue
        assert all(c > r2 for c in conf[:-1])
        fired += conf[-1] <= r2
        assert r.n_uploads == 1, "HSL uploads a window only when it asks for verification"
    assert fired >= 10


def test_edgellm_sequence_trigger_and_adaptive_threshold():
    rounds = _run("edgellm", {"r1": 0.3})
    r1s = [r.extra["trigger"]["r1"] for r in rounds if "trigger" in r.extra]
    for r in rounds:
        trig = r.extra.get("trigger")
        if trig is None:
            continue
        conf = trig["confidences"]
        for k in range(1, len(conf)):  # R1 may change mid-window (a verdict arrives): the one in force
            assert math.prod(conf[:k]) > trig["r1s"][k - 1], "EdgeLLM should have verified earlier"
    assert len(set(r1s)) > 3, "R1 never adapted"
    assert any(r.n_uploads > 1 for r in rounds), "no window was uploaded in chunks while a verdict was pending"


def test_edgellm_r1_update():
    assert update_r1(0.5, 0.25, n_correct=2, n=4) == pytest.approx(0.5 / 0.25 ** 0.5)
    assert update_r1(0.9, 0.01, n_correct=0, n=4) == 1.0  # clamped
    assert update_r1(0.5, 0.25, n_correct=6, n=4) == pytest.approx(0.5 * 0.25 ** 0.5)  # more than N̂: lower
    assert update_r1(0.6, 0.25, n_correct=4, n=4) == pytest.approx(0.3)  # N_correct = N: halved


@pytest.mark.parametrize("r1_update,c_floor", [("window", 1e-6), ("n_hat", 1e-6), ("window", 0.4)])
def test_edgellm_r1_follows_each_verdict(r1_update, c_floor):
    """Replaying the update over the recorded windows gives the R1 each next window used
    (one window pending at a time, so every trigger saw the R1 left by the verdict before).
    N is the window's length, or N̂: the mean length of the windows closed so far; the
    product is floored at the configured C floor."""
    history = 3
    rounds = [r for r in _run("edgellm", {"r1": 0.3, "r1_update": r1_update, "max_windows": 1, "n_hat": 4,
                                          "history": history, "c_floor": c_floor}) if "trigger" in r.extra]
    lengths, checked, differs = [], 0, 0
    for prev, nxt in zip(rounds, rounds[1:]):
        trig = prev.extra["trigger"]
        assert trig["product"] == pytest.approx(math.prod(trig["confidences"]))
        lengths.append(len(trig["confidences"]))
        n_hat = max(1, round(sum(lengths[-history:]) / len(lengths[-history:])))  # the last `history` windows
        n = max(1, lengths[-1]) if r1_update == "window" else n_hat
        differs += n != max(1, lengths[-1])
        want = update_r1(trig["r1"], trig["product"], prev.accepted, n, c_floor)
        if prev.request_id == nxt.request_id and nxt.extra["trigger"]["r1s"]:
            assert nxt.extra["trigger"]["r1s"][0] == pytest.approx(want)
            checked += 1
    assert checked >= 10
    if r1_update == "n_hat":
        assert differs >= 5, "N̂ never differed from the window's length: the test cannot tell the modes apart"


def test_edgellm_uploads_one_at_a_time_and_drops_chunks_of_a_discarded_window(monkeypatch, report):
    """Each upload waits for the previous one's acknowledgement; chunks still queued when a
    rejection discards their window are never sent (the run stays lossless)."""
    events: dict[int, list[str]] = {}
    dropped = []
    real_send, real_ack, real_discard = SpeculativeEdge.send, SpeculativeEdge.next_ack, SpeculativeEdge.discard

    async def send(self, msg):
        events.setdefault(id(self), []).append("send")
        return await real_send(self, msg)

    async def next_ack(self):
        env = await real_ack(self)
        events.setdefault(id(self), []).append("ack")
        return env

    def discard(self, msg):
        dropped.append(len(msg.tokens))
        return real_discard(self, msg)

    monkeypatch.setattr(SpeculativeEdge, "send", send)
    monkeypatch.setattr(SpeculativeEdge, "next_ack", next_ack)
    monkeypatch.setattr(SpeculativeEdge, "discard", discard)
    _run("edgellm", {"r1": 0.3, "n_hat": 2})
    assert len(events) == 4
    for log in events.values():
        assert log[0] == "send" and log[-1] == "ack" and log.count("send") > 5
        assert all(a != b for a, b in zip(log, log[1:])), "an upload started before the previous one was acknowledged"
    report(f"EdgeLLM serial uploads (toy pair): {sum(map(len, events.values())) // 2} sent, {len(dropped)} "
           f"dropped unsent when their window was discarded (sizes {sorted(dropped)} tokens)")
    assert dropped, "no queued chunk was ever dropped: the run never exercised the rule"


def test_edgellm_r1_only_falls_when_every_draft_is_accepted():
    """Draft = target under greedy decoding: every window is wholly correct, so every
    verdict halves R1 (Eq. 7 with N_correct = N), including windows whose first token the
    previous verdict committed as its own (lead_row: that token counts as correct)."""
    kw = dict(vocab_size=64, seed=2, sharpness=2.0)
    draft = create_engine("toy", role="draft", agreement=1.0, **kw)
    target = create_engine("toy", role="target", **kw)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 40, SamplingParams(), seed=i) for i in range(4)]
    recs = run_system("edgellm", draft, target, reqs, {"r1": 0.92, "lead_row": True, "reset_r1": True},
                      RunOptions(link=LINK, edge_cost=lambda op: 0.036, cloud_cost=lambda op: 0.015))
    with_lead = halvings = 0
    for req, rec in zip(reqs, recs):
        assert rec.output_tokens == greedy_decode(target, req.prompt, 40)[0]
        r1s = []
        for r in rec.rounds:
            trig = r.extra.get("trigger")
            if trig is None or r.extra.get("discarded"):
                continue
            with_lead += len(trig["confidences"]) == r.verified + 1
            r1s += trig["r1s"]
        assert all(b <= a for a, b in zip(r1s, r1s[1:])), f"R1 rose although every draft was accepted: {r1s}"
        halvings += sum(b == pytest.approx(a / 2) for a, b in zip(r1s, r1s[1:]))
    assert with_lead >= 3, "no window counted a first token the previous verdict committed"
    assert halvings >= 3


def test_edgellm_sends_proactive_tokens_in_chunks_of_n_hat():
    """While a verdict is pending, drafted tokens go up in chunks of N̂, the mean length of
    the last ``history`` windows closed (replayed from the records; the first chunk also
    carries the lead token, sent as an id); the window's last upload is its flush."""
    history = 2
    recs = [r for r in _run("edgellm", {"r1": 0.3, "n_hat": 3, "history": history})]
    lengths, chunked = [], 0
    for r in recs:  # one edge device, requests in turn: windows close in this order
        trig = r.extra.get("trigger")
        if trig is None:
            continue
        n_hat = max(1, round(sum(lengths[-history:]) / len(lengths[-history:]))) if lengths else 3
        sizes = r.extra.get("upload_sizes")
        if sizes and "restarted_from" not in r.extra:
            lead = int(bool(r.extra.get("lead_implied")))
            assert [sizes[0] - lead] + sizes[1:-1] == [n_hat] * (len(sizes) - 1), (r.round, sizes, n_hat)
            chunked += 1
        lengths.append(len(trig["confidences"]))
    assert chunked >= 5


def test_cloud_only_rounds_by_hand():
    """Cloud-only records one round per streamed token: the committed length after it, and a
    downlink time equal to the link's transfer time of that message on an idle link."""
    link = LinkProfile("fixed", rtt_s=0.04, up_bps=1e6, down_bps=2e6, overhead_bytes=66)
    kw = dict(vocab_size=512, seed=2, sharpness=6.0)
    draft = create_engine("toy", role="draft", agreement=0.9, **kw)
    target = create_engine("toy", role="target", **kw)
    req = GenerationRequest("c", [4, 5, 6], 8, SamplingParams())
    (rec,) = run_system("cloud_only", draft, target, [req], {},
                        RunOptions(link=link, edge_cost=lambda op: 0.0, cloud_cost=lambda op: 0.01))
    assert rec.output_tokens == greedy_decode(target, req.prompt, 8)[0]
    assert [r.round for r in rec.rounds] == list(range(8))
    for i, r in enumerate(rec.rounds):
        assert (r.request_id, r.emitted, r.committed) == ("c", 1, 3 + i + 1)
        assert r.t_downlink == pytest.approx(link.transfer_time(r.bytes_down, "down"), rel=1e-9)


def _edgellm_run(params, stop_at=None, n=60):
    kw = dict(vocab_size=512, seed=2, sharpness=6.0)
    draft = create_engine("toy", role="draft", agreement=0.9, **kw)
    target = create_engine("toy", role="target", **kw)
    prompt = [3, 2, 3]
    ref = greedy_decode(target, prompt, n)[0]
    stop = () if stop_at is None else (ref[stop_at],)
    req = GenerationRequest("e", prompt, n, SamplingParams(), stop_ids=stop)
    (rec,) = run_system("edgellm", draft, target, [req], params,
                        RunOptions(link=LINK, edge_cost=lambda op: 0.036, cloud_cost=lambda op: 0.015))
    assert rec.output_tokens == (ref if stop_at is None else ref[: ref.index(stop[0]) + 1])
    return rec, [r for r in rec.rounds if not r.extra.get("discarded")]


@pytest.mark.parametrize("stop_at", [None, 14])
def test_edgellm_every_window_is_closed_by_its_trigger(stop_at):
    """Each window the edge sends for verification is closed by the trigger rule, which notes
    it: the confidence product fell to R1, a stop token was drafted, or the output is full."""
    rec, rounds = _edgellm_run({"r1": 0.3}, stop_at)
    assert rounds and all("trigger" in r.extra for r in rounds), [r.extra for r in rounds]
    for r in rounds:  # the product is of this window's own confidences, from 1
        trig = r.extra["trigger"]
        assert trig["product"] == pytest.approx(math.prod(trig["confidences"]), rel=1e-12)
        # its verdict's downlink: the message's bytes, at least the link's one-way time for them
        assert r.bytes_down > 0 and r.t_downlink >= LINK.transfer_time(r.bytes_down, "down") - 1e-12


def test_edgellm_trigger_fires_when_the_product_equals_r1():
    """The rule is product <= R1: with R1 set to the first draft's own confidence, the first
    window closes after that one token."""
    _, rounds = _edgellm_run({"r1": 0.3})
    c1 = rounds[0].extra["trigger"]["confidences"][0]
    _, rounds = _edgellm_run({"r1": c1})
    assert rounds[0].extra["trigger"]["confidences"] == [c1]
