"""netem/: profiles, the backends on real links, the probe, lifecycle, wall mode over a link.

The link tests bring up real links (namespaces, TUN devices, the user-space wire or the
relay) and measure them with the probe; the ``netem`` backend runs where the kernel has
sch_netem and is skipped with the probe's exact reason elsewhere.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.link import LinkProfile
from netem import kernel, ns
from netem.backends import open_link
from netem.probe import PING, ProbeClient, ProbeServer, message_times, probe_link, slope
from netem.profile import ProfileError, load_profile, parse_profile

REPO = Path(__file__).resolve().parent.parent
NETWORKS = sorted(glob.glob(str(REPO / "conf" / "network" / "*.yaml")))


def _need(backend: str) -> None:
    caps = kernel.capabilities()
    if not caps.available(backend):
        pytest.skip(f"backend {backend}: {caps.reasons[backend]}")


def _ours() -> list[str]:
    return [n for n in ns.list_ours() if ns.owner(n) == os.getpid()]


# ---- profiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", NETWORKS, ids=lambda p: Path(p).stem)
def test_every_shipped_profile_loads_and_names_its_source(path):
    p = load_profile(path)
    assert p.name == Path(path).stem and p.source
    assert p.backend == "auto"


@pytest.mark.parametrize("data,key", [
    ({"rtt_ms": -1}, "network.rtt_ms"),
    ({"up_mbps": 0}, "network.up_mbps"),
    ({"loss": 1.5}, "network.loss"),
    ({"jitter_distribution": "pareto"}, "network.jitter_distribution"),
    ({"backend": "ns3"}, "network.backend"),
    ({"queue_ms": 0}, "network.queue_ms"),
    ({"rtt": 5}, "unknown key"),
    ({"trace": {"steps": [{"at_s": 1, "up_mbps": 2}, {"at_s": 1, "up_mbps": 3}]}}, r"steps\[1\]\.at_s"),
    ({"trace": {"generate": {"every_s": 20, "up_mbps": [80, 10]}}}, "generate.up_mbps"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ProfileError, match=key):
        parse_profile({"name": "x", **data})


def test_pipesd_s4_trace_is_seeded_and_within_the_paper_ranges():
    a = load_profile(REPO / "conf" / "network" / "pipesd_s4.yaml")
    b = load_profile(REPO / "conf" / "network" / "pipesd_s4.yaml")
    assert a.trace == b.trace and "seed 4" in a.trace.source
    steps = a.trace.steps
    assert [s.at_s for s in steps[:4]] == [0, 20, 40, 60]
    assert all(10e6 <= s.up_bps <= 80e6 and 150e6 <= s.down_bps <= 280e6 for s in steps)
    assert len({s.up_bps for s in steps}) > 10  # it varies


def test_virtual_model_serializes_across_a_trace_step_piecewise():
    net = parse_profile({"name": "t", "rtt_ms": 10, "header_bytes": 0,
                         "trace": {"steps": [{"at_s": 0, "up_mbps": 1}, {"at_s": 1, "up_mbps": 4}]}})
    link = LinkProfile.from_network(net)
    # 1 Mbit/s for the first second carries 125,000 B; the other 125,000 B go at 4 Mbit/s (0.25 s)
    assert link.serialized_at(0.0, 250_000, "up") == pytest.approx(1.25)
    assert link.transfer_time(250_000, "up") == pytest.approx(1.255)
    assert link.serialized_at(2.0, 500_000, "up") == pytest.approx(3.0)


def test_virtual_model_charges_headers_per_segment():
    net = load_profile(REPO / "conf" / "network" / "wan_50ms_10mbit.yaml")
    link = LinkProfile.from_network(net)
    n = 1_000_000
    segments = -(-(n + net.overhead_bytes) // net.mss)
    assert link.wire_bytes(n) == n + net.overhead_bytes + 52 * segments
    assert link.transfer_time(n, "up") == pytest.approx(0.025 + link.wire_bytes(n) * 8 / 10e6)


def test_the_kernel_probe_explains_every_unavailable_backend():
    caps = kernel.capabilities().describe()
    assert set(caps) == {"netem", "tun", "relay", "none"}
    assert caps["relay"] == "available"
    # A reason names what is missing; where a command failed, it quotes the command and its own error.
    reason = re.compile(r"^(not running as root \(|iproute2's `ip` and `tc` commands are not installed$"
                        r"|cannot create a network namespace: \S|/dev/net/tun does not exist \("
                        r"|`(tc qdisc add dev lo root netem delay 1ms|ip tuntap add mode tun)` failed: \S)")
    for name, state in caps.items():
        assert state == "available" or reason.match(state), f"{name}: {state!r}"
    assert caps["none"] == "available"


# ---- the links, measured -----------------------------------------------------------------------
TARGETS = [(50.0, 10.0), (200.0, 1.0)]


@pytest.mark.wan
@pytest.mark.parametrize("backend", ["netem", "tun", "relay"])
@pytest.mark.parametrize("rtt_ms,mbps", TARGETS, ids=["50ms-10mbit", "200ms-1mbit"])
def test_link_delivers_the_profile(backend, rtt_ms, mbps, report):
    _need(backend)
    profile = parse_profile({"name": "t", "rtt_ms": rtt_ms, "up_mbps": mbps, "down_mbps": mbps})
    with open_link(profile, backend) as link:
        res = probe_link(link)
    rtt = res["rtt_ms"]
    report(f"link {backend} {rtt_ms:g} ms/{mbps:g} Mbit/s: RTT median {rtt['median']:.2f} (min {rtt['min']:.2f}, "
           f"p95 {rtt['p95']:.2f}) ms; goodput up {res['up']['goodput_mbps']:.3f} down "
           f"{res['down']['goodput_mbps']:.3f} of {res['up']['expected_mbps']:.3f} Mbit/s; new connection "
           f"{res['connect_ms']['median']:.2f} ms (measured)")
    # The floor: the RTT plus the ping's own serialization each way (0.67 ms a way at 1 Mbit/s).
    floor_ms = rtt_ms + 2 * profile.wire_bytes(PING) * 8 / (mbps * 1e6) * 1e3
    assert rtt["median"] <= floor_ms + max(3.0, 0.03 * rtt_ms)
    assert rtt["min"] >= rtt_ms - 0.5
    for d in ("up", "down"):
        assert res[d]["intact"]
        assert 0.90 <= res[d]["goodput_mbps"] / res[d]["expected_mbps"] <= 1.02, res[d]
    connect = res["connect_ms"]["median"]
    if backend == "relay":  # stream-level: the relay accepts at once
        assert connect < 5.0
    else:  # packet-level: a real handshake costs one RTT
        assert rtt_ms - 0.5 <= connect <= rtt_ms + max(3.0, 0.03 * rtt_ms)


@pytest.mark.wan
@pytest.mark.parametrize("backend", ["netem", "tun", "relay"])
def test_loss_shows_up_as_retransmissions(backend, report):
    """1% loss each way: TCP retransmits and the transfers arrive intact. The relay carries a
    byte stream and cannot lose packets: on it the loss setting does not apply (none counted)."""
    _need(backend)
    profile = load_profile(REPO / "conf" / "network" / "lossy.yaml")
    with open_link(profile, backend) as link:
        res = probe_link(link, bulk_s=3.0)
    assert res["up"]["intact"] and res["down"]["intact"]
    if backend == "relay":
        assert "no packet loss" in res["level"]
        assert res["emulator"]["up"]["lost"] == res["emulator"]["down"]["lost"] == 0
        return
    for d in ("up", "down"):
        assert res[d]["retransmissions"] > 0
        if backend == "tun":
            emu = res["emulator"][d]
            sent = emu["packets"] + emu["lost"] + emu["queue_drops"]
            band = 3 * (0.01 * 0.99 / sent) ** 0.5
            assert abs(emu["loss_fraction"] - 0.01) <= band, emu
    report(f"link {backend} 1% loss: retransmissions up {res['up']['retransmissions']}, down "
           f"{res['down']['retransmissions']}; emulator loss up {res['emulator']['up']['loss_fraction']:.4f}, "
           f"down {res['emulator']['down']['loss_fraction']:.4f}; transfers intact (measured)")


@pytest.mark.wan
@pytest.mark.parametrize("backend", ["netem", "tun", "relay"])
def test_jitter_spread_matches_the_profile(backend, report):
    _need(backend)
    profile = parse_profile({"name": "j", "rtt_ms": 50, "jitter_ms": 10, "up_mbps": 10, "down_mbps": 10})
    with open_link(profile, backend) as link:
        res = probe_link(link, pings=120, directions=())
    spread, expected = res["jitter_ms"]["rtt_stdev"], res["jitter_ms"]["expected_rtt_stdev"]
    report(f"link {backend} jitter 10 ms/direction: RTT stdev {spread:.2f} ms measured, {expected:.2f} expected "
           f"(sqrt(2) x 10), median {res['rtt_ms']['median']:.2f} ms")
    assert abs(spread - expected) <= 0.25 * expected


@pytest.mark.wan
def test_a_trace_changes_the_delivered_rate_on_schedule(report):
    _need("tun")
    steps = [{"at_s": 0, "down_mbps": 8}, {"at_s": 2, "down_mbps": 2}, {"at_s": 4, "down_mbps": 6}]
    # A queue deep enough to absorb the step down without a burst of drops: otherwise TCP's
    # loss recovery (RTO back-off), not the link, sets the rate for a second after it.
    profile = parse_profile({"name": "trace", "rtt_ms": 20, "up_mbps": 10, "queue_ms": 400,
                             "trace": {"steps": steps}})
    with open_link(profile, "tun") as link:
        server = ProbeServer(link)
        try:
            # 8 Mbit/s x 2 s + 2 x 2 + 6 x 1.6: the transfer lasts about 5.6 s of the schedule
            res = ProbeClient(link, server).download(int(29.6e6 / 8 * profile.goodput_fraction()))
        finally:
            server.close()
        origin, emulator = link.origin, link.counters()
    assert res["intact"]
    marks = [(t - origin, b) for t, b in res["marks"]]
    # what to look at when a step misses: a late first byte (slow start inside the first
    # window), retransmissions or queue drops (TCP recovery), or the emulator's CPU time
    context = (f"first byte at {marks[0][0]:.3f} s of the trace, {res['retransmissions']} retransmissions, "
               f"emulator {emulator}")
    eff = profile.goodput_fraction()
    got = []
    for (lo, hi), mbps in zip([(0.6, 1.9), (2.6, 3.9), (4.5, 5.3)], [8, 2, 6]):
        window = [m for m in marks if lo <= m[0] <= hi]
        rate = slope(window) / 1e6
        got.append(rate)
        assert rate == pytest.approx(mbps * eff, rel=0.12), (lo, hi, rate, context)
    report("trace 8 -> 2 -> 6 Mbit/s at 2 s steps (tun): goodput by step " +
           ", ".join(f"{g:.2f}" for g in got) + f" Mbit/s measured (expected x{eff:.3f} for headers); {context}")


@pytest.mark.wan
def test_virtual_and_real_link_agree_on_message_delivery(report):
    """Edge->cloud delivery time of one message, 1 B to 1 MB: the virtual link model vs the
    tun link (warm connection), within 10% or 2 ms."""
    _need("tun")
    profile = parse_profile({"name": "wan", "rtt_ms": 50, "up_mbps": 10, "down_mbps": 10})
    virtual = LinkProfile.from_network(profile)
    sizes = [1, 1_000, 10_000, 100_000, 1_000_000]
    with open_link(profile, "tun") as link:
        # the median of 5: one busy moment on a shared host moves a median of 3
        real = message_times(link, sizes, repeats=5, warm_bytes=2_000_000)
    rows = []
    for n in sizes:
        model = virtual.transfer_time(n + 8, "up")  # 8 B: the probe's length prefix
        rows.append((n, model, real[n]))
    report("virtual vs real (tun) delivery, 50 ms / 10 Mbit/s: " + "; ".join(
        f"{n} B: {1e3 * m:.2f} modelled / {1e3 * r:.2f} measured ms" for n, m, r in rows))
    for n, model, measured in rows:
        assert abs(measured - model) <= max(0.10 * model, 0.002), (n, model, measured)


# ---- lifecycle -----------------------------------------------------------------------------------
_HOLDER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
from netem.backends import open_link
from netem.profile import parse_profile
with open_link(parse_profile({"name": "h", "rtt_ms": 10, "up_mbps": 10}), "tun") as link:
    print(",".join(link.namespaces.values()), flush=True)
    print(link.workdir, flush=True)
    time.sleep(60)
"""


@pytest.mark.wan
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_links_are_torn_down_on_signals_and_stale_sets_cleaned(sig):
    _need("tun")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        names = proc.stdout.readline().strip().split(",")
        workdir = Path(proc.stdout.readline().strip())
        assert len(names) == 2 and all(n in ns.list_ours() for n in names)
        proc.send_signal(sig)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGKILL:  # no chance to clean up: the next start removes the dead owner's set
        assert workdir.name.startswith("specwan-link-")
        # its emulator gets SIGTERM on the holder's death and writes its counters into the folder as it
        # exits; the folder can go only once that writer is gone
        emulators = [p for p in psutil.process_iter(["cmdline"]) if str(workdir) in " ".join(p.info["cmdline"] or [])]
        _, alive = psutil.wait_procs(emulators, timeout=15)
        assert not alive, f"the killed holder's emulator outlived it: {alive}"
        shutil.rmtree(workdir)  # the killed holder's own folder, which only it could have removed
        assert all(n in ns.list_ours() for n in names)
        live = [n for n in ns.list_ours() if ns.owner(n) == os.getpid()]
        removed = ns.clean_stale()
        assert set(names) <= set(removed) and not set(live) & set(removed)
    time.sleep(0.2)
    assert not set(names) & set(ns.list_ours())
    assert not workdir.exists(), "the link's work folder outlived it"


# ---- wall mode over the link, on the toy pair -------------------------------------------------------
@pytest.mark.wan
@pytest.mark.parametrize("system", ["vanilla", "cloud_only"])
def test_wall_run_over_the_50ms_link_records_the_probe(system, tmp_path):
    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, execute

    def cfg(*extra):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose(config_name="config", overrides=[
                "pair=toy", f"system={system}", "workload.chat_template=false", "workload.size=2",
                "max_new_tokens=10", "network=wan_50ms_10mbit", *extra])

    virtual = execute(cfg())
    wall = execute(cfg("mode=wall"), run_dir=tmp_path)
    assert [r.output_tokens for r in wall] == [r.output_tokens for r in virtual]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    link = manifest["link"]
    chosen = "netem" if kernel.capabilities().available("netem") else "tun"
    assert link["backend"] == chosen and link["configured"]["rtt_ms"] == 50
    measured = link["measured"]
    assert 49.5 <= measured["rtt_ms_median"] <= 53.0 and measured["up_intact"] and measured["down_intact"]
    assert link["emulator_total"] is not None or chosen == "netem"
    details = json.loads((tmp_path / "link.json").read_text())
    assert {r["figure"] for r in details["side_by_side"]} >= {"RTT median (ms)", "up goodput (Mbit/s)"}
    # the request crosses the 50 ms link and back; vanilla pays that in every verification round
    for rec in wall:
        assert rec.e2e >= 0.05 * (len(rec.rounds) if system == "vanilla" else 1)


def test_link_check_command_prints_configured_and_measured(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness.cli", "link-check", "network=wan_50ms_10mbit",
                          "network.backend=relay", "--bulk-s", "1", "--json", str(tmp_path / "l.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backend relay (stream-level" in out.stdout and "RTT median (ms)" in out.stdout
    data = json.loads((tmp_path / "l.json").read_text())
    assert data["measured"]["connect_ms"]["median"] < 5.0  # the relay: no handshake on the link
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "link-check", "network=wan_50ms_10mbit",
                          "network.rtt_ms=-3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "network.rtt_ms must be" in bad.stderr, bad.stderr


def test_no_namespace_of_this_session_is_left():
    assert _ours() == []
