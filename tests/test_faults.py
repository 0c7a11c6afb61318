"""Faults on purpose and a lost cloud: the ``fault`` group, liveness, and what an edge does
when the cloud goes (fail, retry, edge_only). Toy pair; wall runs are real processes."""

from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_dir

from harness.faults import (
    Fault,
    FaultError,
    liveness_timeout,
    parse_faults,
    wall_options,
    with_link_faults,
)
from harness.pairs import ensure_pair, load_pair, open_engines
from harness.run import CONF_DIR, ConfigError, execute, make_plan
from harness.wall import WallRunError, run_wall
from netem.profile import parse_profile
from systems.api import GenerationRequest
from tests.support import greedy_decode

# long enough (toy pair: a few hundred tokens each) that faults a second in meet requests in flight
REQUESTS = [GenerationRequest(f"f{i}", [1, 2, 3 + i % 5], 300, seed=i) for i in range(24)]


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=["pair=toy", *overrides])


def _reference(role: str) -> dict[str, list[int]]:
    """Each request's greedy output from the toy pair's ``role`` model alone (what a lossless
    speculative run must produce with the target, and edge-only decoding with the draft)."""
    pair = load_pair("toy")
    draft, target = open_engines(pair, ensure_pair(pair, progress=False))
    engine = target if role == "target" else draft
    return {r.request_id: greedy_decode(engine, r.prompt, r.max_new_tokens)[0] for r in REQUESTS}


# ---- the config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("events,message", [
    ([{"kind": "meteor", "at_s": 1}], "fault.events[0].kind must be one of outage"),
    ([{"kind": "outage", "at_s": 1}], "fault.events[0].for_s must be seconds > 0"),
    ([{"kind": "outage", "at_s": -1, "for_s": 1}], "fault.events[0].at_s must be seconds >= 0"),
    ([{"kind": "bandwidth_collapse", "at_s": 1, "for_s": 1, "factor": 2}], "factor must be a fraction"),
    ([{"kind": "cloud_kill", "at_s": 1, "for_s": 3}], "cloud_kill takes at_s, kind, restart_after_s, not for_s"),
    ([{"kind": "loss_burst", "at_s": 1, "for_s": 3, "loss": 1.5}], "loss must be a probability in (0, 1)"),
])
def test_a_bad_fault_is_one_line_naming_its_key(events, message):
    with pytest.raises(FaultError) as info:
        parse_faults({"name": "x", "events": events})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_wall_options_and_their_errors():
    assert wall_options(None).on_cloud_lost == "fail" and wall_options(None).timeout_s is None
    with pytest.raises(FaultError, match="wall.on_cloud_lost must be one of fail, retry, edge_only"):
        wall_options({"on_cloud_lost": "pray"})
    with pytest.raises(FaultError, match="wall: unknown key"):
        wall_options({"timeout": 3})
    with pytest.raises(ConfigError, match="only mode=wall has"):
        make_plan(_compose("fault=cloud_restart"))
    plan = make_plan(_compose("mode=wall", "fault=cloud_stall", "wall.on_cloud_lost=edge_only",
                              "wall.timeout_s=900"))
    assert plan.wall.on_cloud_lost == "edge_only" and plan.wall.timeout_s == 900
    assert [f.kind for f in plan.faults] == ["cloud_stall"]


def test_link_faults_become_trace_steps_that_hold_traffic_back():
    profile = parse_profile({"name": "t", "rtt_ms": 20, "up_mbps": 8, "down_mbps": 8})
    faulty = with_link_faults(profile, parse_faults({"events": [
        {"kind": "outage", "at_s": 3, "for_s": 2},
        {"kind": "bandwidth_collapse", "at_s": 6, "for_s": 1, "factor": 0.5},
        {"kind": "loss_burst", "at_s": 8, "for_s": 1, "loss": 0.25}]}))
    steps = [(s.at_s, s.up_bps, s.down_bps, s.loss) for s in faulty.trace.steps]
    assert steps == [(0.0, 8e6, 8e6, None), (3.0, 0.0, 0.0, None), (5.0, 8e6, 8e6, None), (6.0, 4e6, 4e6, None),
                     (7.0, 8e6, 8e6, None), (8.0, 8e6, 8e6, 0.25), (9.0, 8e6, 8e6, None)]
    assert [faulty.loss_at(t) for t in (7.9, 8.0, 8.5, 9.0)] == [0.0, 0.25, 0.25, 0.0]
    trace = faulty.trace
    assert trace.finish("up", 1.0, 8e6) == pytest.approx(2.0)  # 1 s of bits at 8 Mbit/s
    assert trace.finish("up", 3.5, 8e6) == pytest.approx(6.0)  # nothing passes until 5 s
    assert trace.finish("up", 2.5, 8e6) == pytest.approx(5.5)  # half before the outage, half after
    assert trace.finish("down", 6.0, 4e6) == pytest.approx(7.0)  # at half rate
    with pytest.raises(FaultError, match="needs a rate-limited link"):
        with_link_faults(parse_profile({"name": "u"}), [Fault("bandwidth_collapse", 1, for_s=1, factor=0.5)])
    assert with_link_faults(profile, []) is profile


def test_the_liveness_timeout_is_derived_from_the_link():
    loopback, _ = liveness_timeout(parse_profile({"name": "l"}))
    assert loopback == 2.0
    slow, how = liveness_timeout(parse_profile({"name": "s", "rtt_ms": 200, "up_mbps": 1, "down_mbps": 1}))
    assert slow > 2.0 + 0.8 and "uplink rate" in how  # a ping may queue behind a full send buffer
    assert math.isfinite(slow)


def test_a_loss_burst_drops_packets_only_while_it_lasts():
    """Inside the burst the link model (virtual time) and the tun wire's shaper lose at the
    burst's probability; outside it, nothing."""
    import asyncio

    from harness.clock import run
    from harness.link import LinkProfile, _Direction
    from netem.shaper import Shaper
    from systems.messages import OpenSession

    net = with_link_faults(parse_profile({"name": "t", "rtt_ms": 10, "up_mbps": 100, "down_mbps": 100}),
                           [Fault("loss_burst", 1.0, for_s=1.0, loss=0.5)])
    link = LinkProfile.from_network(net)
    assert (link.loss_at(0.5), link.loss_at(1.5), link.loss_at(2.5)) == (0.0, 0.5, 0.0)

    async def retransmissions_per_window() -> list[int]:
        loop, counts = asyncio.get_running_loop(), []
        d = _Direction(link, "up")
        for start in (0.0, 1.0, 2.0):
            before = d.retransmissions
            while loop.time() < start + 0.9:
                d.send(OpenSession("s", [1] * 400), lambda env: None)  # about one segment each
                await asyncio.sleep(0.01)
            await asyncio.sleep(start + 1.0 - loop.time())
            counts.append(d.retransmissions - before)
        return counts

    outside, inside, after = run(retransmissions_per_window(), virtual=True)
    assert outside == 0 and after == 0 and inside >= 20  # ~90 messages at 0.5

    shaper = Shaper(net, "up", origin=0.0)
    lost = [sum(shaper.admit(t + k * 1e-3, 1500) is None for k in range(200)) for t in (0.2, 1.2, 2.2)]
    assert lost[0] == 0 and lost[2] == 0 and 60 <= lost[1] <= 140, lost


def test_an_outage_in_virtual_time_delays_the_requests_by_its_length():
    """Same run with and without a 2 s outage at 1 s (virtual time: each request's clock starts
    at 0): the tokens are the same, and each request that was still running at 1 s is about 2 s
    later: what crossed the link then waited for the link to return, so up to 2 s and a round
    trip more, and at least 2 s less the time until the request next used the link (a round)."""
    base = ["system=vanilla", "workload=smoke", "workload.size=3", "network=wan_50ms_10mbit"]
    clean = execute(_compose(*base))
    faulty = execute(_compose(*base, "fault=outage_2s", "fault.events.0.at_s=1.0"))
    for a, b in zip(clean, faulty):
        assert a.output_tokens == b.output_tokens
        if a.e2e > 1.0:
            assert 2.0 - 0.2 <= b.e2e - a.e2e <= 2.0 + 0.06


# ---- wall mode: a stopped cloud, a killed one ------------------------------------------------------
def test_a_stalled_cloud_is_named_within_the_liveness_timeout(tmp_path):
    started = []
    with pytest.raises(WallRunError) as info:
        run_wall("vanilla", "toy", REQUESTS, workdir=tmp_path, on_start=started.append, liveness_timeout_s=1.0,
                 faults=[Fault("cloud_stall", 0.5, for_s=20.0)])
    run = started[0]
    stall = run.faults_fired[0]
    assert stall["kind"] == "cloud_stall" and 0.5 <= stall["fired_s"] < 1.5
    failed = info.value.failed
    assert len(failed) == 1 and "stopped answering: no reply to a ping within 1 s" in failed[0].error
    # noticed within interval + timeout (1 s + 1 s) of the stall, with room for a loaded machine;
    # far sooner than the stall's 20 s
    noticed = failed[0].end - (run.fault_origin + stall["fired_s"])
    assert 0 < noticed < 6.0, noticed
    finished = [r for r in info.value.records if r.error is None]
    assert finished and all(r.output_tokens == _reference("target")[r.request_id] for r in finished)


def test_a_killed_and_restarted_cloud_is_retried_losslessly(tmp_path):
    started = []
    records = run_wall("vanilla", "toy", REQUESTS, workdir=tmp_path, on_start=started.append,
                       liveness_timeout_s=1.0, on_cloud_lost="retry", retry_within_s=30,
                       faults=[Fault("cloud_kill", 0.5, restart_after_s=1.0)])
    kill = started[0].faults_fired[0]
    assert kill["new_pid"] != kill["pid"] and kill["restarted_s"] >= kill["killed_s"] + 1.0
    reference = _reference("target")
    assert [r.request_id for r in records] == [r.request_id for r in REQUESTS]
    assert all(r.error is None and r.output_tokens == reference[r.request_id] for r in records)
    retried = [r for r in records if r.recovery]
    assert len(retried) == 1 and retried[0].recovery.startswith("retried 1 time(s): ")


def test_without_a_cloud_the_edge_finishes_alone_and_says_so(tmp_path):
    records = run_wall("vanilla", "toy", REQUESTS, workdir=tmp_path, liveness_timeout_s=1.0,
                       on_cloud_lost="edge_only", faults=[Fault("cloud_kill", 0.5)])
    target, draft = _reference("target"), _reference("draft")
    assert all(r.error is None for r in records)
    served = [r for r in records if r.recovery is None]
    alone = [r for r in records if r.recovery]
    assert served and alone and all(r.recovery.startswith("edge_only from token ") for r in alone)
    assert all(r.output_tokens == target[r.request_id] for r in served)
    cut = alone[0]  # the request in flight: the cloud's tokens, then the draft's from there on
    k = int(cut.recovery.split("edge_only from token ")[1].split(":")[0])
    assert cut.output_tokens[:k] == target[cut.request_id][:k]
    for r in alone[1:]:  # after it, the draft alone from the prompt
        assert r.recovery.startswith("edge_only from token 0: ") and r.output_tokens == draft[r.request_id]
    assert len(cut.token_times) == cut.n_tokens


def test_the_whole_run_timeout_is_an_option(tmp_path):
    """A cloud stalled for good, with no pings to notice it: the run's own bound ends it."""
    with pytest.raises(WallRunError, match=r"timed out after 15 s \(wall.timeout_s\)"):
        run_wall("vanilla", "toy", REQUESTS, workdir=tmp_path, timeout_s=15.0,
                 faults=[Fault("cloud_stall", 0.0, for_s=60.0)])


# ---- through the harness, on the tun link ---------------------------------------------------------
@pytest.mark.wan
@pytest.mark.parametrize("fault,extra", [
    ("outage_2s", ["fault.events.0.at_s=0.5"]),
    ("cloud_restart", ["fault.events.0.at_s=0.5", "wall.on_cloud_lost=retry"]),
])
def test_faults_on_the_tun_link_lose_nothing_finished(fault, extra, tmp_path):
    from netem import kernel

    if not kernel.capabilities().available("tun"):
        pytest.skip(f"tun link backend: {kernel.capabilities().reasons['tun']}")
    cfg = _compose("system=vanilla", "workload=smoke", "workload.chat_template=false", "workload.size=6",
                   "max_new_tokens=300", "mode=wall", "network=wan_50ms_10mbit", "network.backend=tun",
                   f"fault={fault}", *extra)
    try:
        records = execute(cfg, run_dir=tmp_path)
    except WallRunError as exc:  # a request recorded as failed, with its reason, is allowed
        records = exc.records
        assert all(r.error for r in exc.failed)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    fired = manifest["faults"]["fired"]
    assert fired and fired[0]["kind"] == ("outage" if fault == "outage_2s" else "cloud_kill")
    on_disk = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert {r.request_id for r in records} <= {d["request_id"] for d in on_disk}
    reference = {r.request_id: r.output_tokens for r in execute(_compose(
        "system=vanilla", "workload=smoke", "workload.chat_template=false", "workload.size=6",
        "max_new_tokens=300"))}
    for d in on_disk:
        if d.get("error") is None:
            assert d["output_ids"] == reference[d["request_id"]], d["request_id"]
