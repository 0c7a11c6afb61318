"""analysis/figures.py: each figure plots what the records hold, checked against values computed
by hand from small synthetic run folders (read back from the figures' lines, bars and bands)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import figures as F
from analysis.load import load_runs
from analysis.stats import paired_ratio
from harness.results import RunWriter, build_manifest
from systems.records import RequestRecord, RoundRecord

NETWORKS = {"lan": {"name": "lan", "rtt_ms": 1.0, "up_mbps": 1000, "down_mbps": 1000},
            "4g": {"name": "4g", "rtt_ms": 50.0, "up_mbps": 10, "down_mbps": 35}}
N_TOKENS = 5


def request(prompt: str, system: str, tpot: float, *, ttft: float = 0.1, rounds=(), energy=None) -> RequestRecord:
    """A request of N_TOKENS tokens whose recorded TTFT and TPOT are exactly ``ttft`` and ``tpot``."""
    times = [ttft + i * tpot for i in range(N_TOKENS)]
    return RequestRecord(request_id=prompt, system=system, prompt_tokens=3, output_tokens=list(range(N_TOKENS)),
                         start=0.0, end=times[-1], token_times=times, rounds=list(rounds), energy=energy)


def write_run(run_dir, system: str, network: str, requests, *, clock: str = "virtual",
              categories: dict | None = None) -> None:
    """One run folder of ``system`` on ``network`` holding ``requests`` (RequestRecords)."""
    config = {"system": {"name": system}, "network": NETWORKS[network], "pair": {"name": "toy"}}
    with RunWriter(run_dir, build_manifest(config, {"clock": clock})) as w:
        for rec in requests:
            w.append(rec, {"pair": "toy", "network": network, "workload": "synthetic", "prompt_id": rec.request_id,
                           "seed": 0, "category": (categories or {}).get(rec.request_id, "chat")})


TPOT = {  # system -> network -> per-prompt tpot (s)
    "cloud_only": {"lan": [0.010, 0.012, 0.011, 0.013, 0.010, 0.012],
                   "4g": [0.020, 0.024, 0.022, 0.021, 0.025, 0.023]},
    "vanilla": {"lan": [0.008, 0.009, 0.007, 0.010, 0.008, 0.009],
                "4g": [0.030, 0.029, 0.033, 0.031, 0.028, 0.032]},
    "pipesd": {"lan": [0.005, 0.006, 0.006, 0.005, 0.007, 0.006],
               "4g": [0.012, 0.011, 0.013, 0.012, 0.014, 0.012]},
}
CATEGORY = {f"q{i}": ("code", "math")[i % 2] for i in range(6)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three systems on two networks, six prompts each: (requests, rounds)."""
    root = tmp_path_factory.mktemp("sweep")
    for system, by_net in TPOT.items():
        for net, values in by_net.items():
            write_run(root / f"{system}-{net}", system, net,
                      [request(f"q{i}", system, v) for i, v in enumerate(values)], categories=CATEGORY)
    return load_runs(root)


def _line(ax, gid: str):
    (line,) = [ln for ln in ax.lines if ln.get_gid() == gid]
    return np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)


def _band(ax, gid: str) -> np.ndarray:
    (band,) = [c for c in ax.collections if c.get_gid() == gid]
    return band.get_paths()[0].vertices


def _bars(ax) -> dict[str, list]:
    return {c.get_label(): list(c.patches) for c in ax.containers if hasattr(c, "patches")}


# ---- speedup --------------------------------------------------------------------------------------


@pytest.mark.parametrize("draw,x_of", [(F.speedup_vs_rtt, lambda n: NETWORKS[n]["rtt_ms"]),
                                       (F.speedup_vs_bandwidth, lambda n: NETWORKS[n]["up_mbps"])])
def test_speedup_lines_are_ratios_of_means_against_the_network_figure(sweep, draw, x_of):
    requests, rounds = sweep
    fig = draw(requests, rounds)  # baseline: cloud_only (present)
    ax = fig.axes[0]
    for system in ("vanilla", "pipesd"):
        points = sorted((x_of(n), np.mean(TPOT["cloud_only"][n]) / np.mean(TPOT[system][n])) for n in NETWORKS)
        x, y = _line(ax, f"speedup:{system}")
        assert x.tolist() == [p[0] for p in points]
        assert y == pytest.approx([p[1] for p in points], rel=1e-9)
        # the band is the paired CI of each point
        verts = _band(ax, f"ci:{system}")
        for xv, yv in zip(x, y):
            net = next(n for n in NETWORKS if x_of(n) == xv)
            r = paired_ratio(requests[requests.network == net], "tpot", system, "cloud_only")
            at = verts[np.isclose(verts[:, 0], xv)][:, 1]
            assert at.min() == pytest.approx(r.low) and at.max() == pytest.approx(r.high)
            assert r.low <= yv <= r.high
    assert "cloud_only" in ax.get_ylabel()
    assert "modelled" in ax.get_title() and "measured" not in ax.get_title()
    assert "modelled" in F.figure_caption(fig)


def test_speedup_baseline_is_configurable_and_defaults_to_vanilla_without_cloud_only(sweep):
    requests, rounds = sweep
    ax = F.speedup_vs_rtt(requests, rounds, baseline="vanilla").axes[0]
    x, y = _line(ax, "speedup:pipesd")
    assert y == pytest.approx([np.mean(TPOT["vanilla"][n]) / np.mean(TPOT["pipesd"][n]) for n in ("lan", "4g")])
    assert {ln.get_gid() for ln in ax.lines} >= {"speedup:cloud_only", "speedup:pipesd"}
    no_cloud = requests[requests.system != "cloud_only"]
    assert F.default_baseline(no_cloud) == "vanilla" and F.default_baseline(requests) == "cloud_only"
    assert "over vanilla" in F.speedup_vs_rtt(no_cloud, rounds).axes[0].get_ylabel()


def test_wall_clock_records_are_called_measured(tmp_path):
    for system in ("cloud_only", "vanilla"):
        for net in NETWORKS:
            write_run(tmp_path / f"{system}-{net}", system, net,
                      [request(f"q{i}", system, v) for i, v in enumerate(TPOT[system][net])], clock="wall")
    requests, rounds = load_runs(tmp_path)
    fig = F.speedup_vs_rtt(requests, rounds)
    assert "measured" in fig.axes[0].get_title() and "modelled" not in fig.axes[0].get_title()


# ---- time per token by category ---------------------------------------------------------------------


def test_time_per_token_bars_are_medians_per_category_and_system(sweep):
    requests, rounds = sweep
    fig = F.time_per_token_by_category(requests, rounds)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert set(bars) == set(TPOT)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["code", "math"]
    for system, patches in bars.items():
        for patch, category in zip(patches, ("code", "math")):
            values = [v for net in NETWORKS for i, v in enumerate(TPOT[system][net]) if CATEGORY[f"q{i}"] == category]
            assert patch.get_height() == pytest.approx(1e3 * np.median(values), rel=1e-9)
    assert "modelled" in ax.get_title()


# ---- energy -----------------------------------------------------------------------------------------


def test_energy_bars_hatch_estimates_and_fill_measurements(tmp_path):
    joules = {"q0": (2.0, 10.0), "q1": (3.0, 20.0), "q2": (4.0, 15.0)}  # edge (measured), cloud (estimated)
    recs = [request(p, "vanilla", 0.01, energy={"edge_j": e, "cloud_j": c, "edge_kind": "measured",
                                                 "cloud_kind": "estimated"}) for p, (e, c) in joules.items()]
    write_run(tmp_path / "v", "vanilla", "lan", recs)
    requests, rounds = load_runs(tmp_path / "v")
    ax = F.energy_per_token(requests, rounds).axes[0]
    bars = _bars(ax)
    assert set(bars) == {"edge (measured)", "cloud (estimated)"}
    (edge,), (cloud,) = bars["edge (measured)"], bars["cloud (estimated)"]
    assert edge.get_height() == pytest.approx(np.median([e / N_TOKENS for e, _ in joules.values()]))
    assert cloud.get_height() == pytest.approx(np.median([c / N_TOKENS for _, c in joules.values()]))
    assert cloud.get_hatch() == F.ESTIMATED_HATCH
    assert not edge.get_hatch()  # measured: solid
    assert "measured and estimated" in ax.get_title()


def test_energy_kinds_are_never_pooled_in_one_bar(tmp_path):
    recs = [request("q0", "vanilla", 0.01, energy={"edge_j": 5.0, "cloud_j": 5.0, "kind": "estimated"}),
            request("q1", "vanilla", 0.01, energy={"edge_j": 1.0, "cloud_j": 1.0, "kind": "measured"})]
    write_run(tmp_path / "v", "vanilla", "lan", recs)
    requests, rounds = load_runs(tmp_path / "v")
    bars = _bars(F.energy_per_token(requests, rounds).axes[0])
    heights = {k: v[0].get_height() for k, v in bars.items()}
    hatches = {k: v[0].get_hatch() for k, v in bars.items()}
    assert heights == pytest.approx({"edge (estimated)": 1.0, "cloud (estimated)": 1.0,
                                     "edge (measured)": 0.2, "cloud (measured)": 0.2})
    assert {k for k, h in hatches.items() if h == F.ESTIMATED_HATCH} == {"edge (estimated)", "cloud (estimated)"}
    assert {k for k, h in hatches.items() if not h} == {"edge (measured)", "cloud (measured)"}


# ---- acceptance by position ----------------------------------------------------------------------------


def _round(i, drafted, accepted, **kw):
    return RoundRecord("q0", i, kw.pop("start", 0.0), kw.pop("end", 0.0), drafted=drafted, uploaded=drafted,
                       verified=drafted, accepted=accepted, emitted=accepted + 1, **kw)


def test_acceptance_by_position_from_drafted_and_accepted_counts(tmp_path):
    # drafted 4,4,2,3 with accepted 4,1,2,0; a cloud-only round (nothing drafted) is left out
    rounds = [_round(0, 4, 4), _round(1, 4, 1), _round(2, 2, 2), _round(3, 3, 0), _round(4, 0, 0)]
    write_run(tmp_path / "v", "vanilla", "lan", [request("q0", "vanilla", 0.01, rounds=rounds)])
    other = [_round(0, 2, 0), _round(1, 2, 1)]
    write_run(tmp_path / "p", "pipesd", "lan", [request("q0", "pipesd", 0.01, rounds=other)])
    requests, rounds_df = load_runs(tmp_path)
    ax = F.acceptance_by_position(requests, rounds_df).axes[0]
    x, y = _line(ax, "acceptance:vanilla")
    assert x.tolist() == [1, 2, 3, 4]
    assert y == pytest.approx([3 / 4, 2 / 4, 1 / 3, 1 / 2])
    x, y = _line(ax, "acceptance:pipesd")
    assert x.tolist() == [1, 2] and y == pytest.approx([1 / 2, 0 / 2])
    assert "measured" in ax.get_title()


# ---- one request's rounds ----------------------------------------------------------------------------


def test_round_timeline_places_each_phase_from_the_round_times(tmp_path):
    phases = dict(t_draft=0.030, t_uplink=0.004, t_queue=0.002, t_verify=0.010, t_downlink=0.003)
    rounds = [_round(0, 3, 2, start=1.000, end=1.060, **phases), _round(1, 3, 3, start=1.060, end=1.110, **phases)]
    write_run(tmp_path / "v", "vanilla", "lan", [request("q0", "vanilla", 0.01, rounds=rounds)])
    requests, rounds_df = load_runs(tmp_path / "v")
    fig = F.round_timeline(requests, rounds_df)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert list(bars) == list(F.PHASES)
    ms = lambda s: pytest.approx(1e3 * s, abs=1e-9)  # noqa: E731
    for row, (start, end) in enumerate(((1.000, 1.060), (1.060, 1.110))):
        # draft from the round's start; downlink ends at the round's end, verify before it, and so on
        expect = {"draft": (start, 0.030), "downlink": (end - 0.003, 0.003), "verify": (end - 0.013, 0.010),
                  "queue": (end - 0.015, 0.002), "uplink": (end - 0.019, 0.004)}
        for phase, (begin, width) in expect.items():
            patch = bars[phase][row]
            assert patch.get_x() == ms(begin - 1.000) and patch.get_width() == ms(width)
            assert patch.get_y() + patch.get_height() / 2 == pytest.approx(row)
    assert "round's end" in F.figure_caption(fig) and "modelled" in ax.get_title()


def test_phases_are_laid_end_to_end_without_round_times():
    frame = pd.DataFrame({"round": [0, 1], "t_draft": [0.02, 0.01], "t_uplink": [0.005, np.nan],
                          "t_queue": [0.0, 0.0], "t_verify": [0.01, 0.02], "t_downlink": [0.001, 0.001]})
    spans, anchored = F.phase_spans(frame)
    assert not anchored
    begins = spans["begin"].tolist()
    assert spans["phase"].tolist() == ["draft", "uplink", "queue", "verify", "downlink",
                                       "draft", "queue", "verify", "downlink"]  # a null phase is left out
    assert begins == pytest.approx([0, 0.02, 0.025, 0.025, 0.035, 0.036, 0.046, 0.046, 0.066])


def test_round_timeline_picks_a_drafting_request_by_default(tmp_path):
    write_run(tmp_path / "c", "cloud_only", "lan", [request("q0", "cloud_only", 0.01, rounds=[_round(0, 0, 0)])])
    write_run(tmp_path / "v", "vanilla", "lan", [request("q0", "vanilla", 0.01, rounds=[_round(0, 2, 1)])])
    requests, rounds = load_runs(tmp_path)
    assert set(F.pick_request(rounds)["system"]) == {"vanilla"}
    assert set(F.pick_request(rounds, system="cloud_only")["system"]) == {"cloud_only"}


def test_round_timeline_draws_one_request_of_a_run_holding_many_systems_and_networks(tmp_path):
    """A run (or the sweep a report loads, as `make bench` writes) may hold every system on every
    network, each answering the same prompt ids: the timeline must draw one (system, network)
    pair's rounds, not all of them."""
    config = {"system": {"name": "bench"}, "pair": {"name": "toy"}}
    with RunWriter(tmp_path / "bench", build_manifest(config, {"clock": "virtual"})) as w:
        for system, n_rounds in (("vanilla", 2), ("pipesd", 3)):
            for network in ("lan", "4g"):
                rounds = [_round(i, 2, 1, start=float(i), end=i + 0.5, t_draft=0.1) for i in range(n_rounds)]
                w.append(request("q0", system, 0.01, rounds=rounds),
                         {"pair": "toy", "network": network, "workload": "synthetic", "prompt_id": "q0", "seed": 0})
    requests, rounds = load_runs(tmp_path / "bench")
    chosen = F.pick_request(rounds)  # the first by system name, then network
    assert chosen[["system", "network"]].drop_duplicates().values.tolist() == [["pipesd", "4g"]]
    assert chosen["round"].tolist() == [0, 1, 2]
    assert F.pick_request(rounds, system="vanilla")["round"].tolist() == [0, 1]
    ax = F.round_timeline(requests, rounds).axes[0]
    assert len(ax.get_yticks()) == 3 and all(len(b) == 3 for b in _bars(ax).values())


# ---- the registry --------------------------------------------------------------------------------------


def test_registry_draws_what_the_records_allow_and_says_why_not_the_rest(sweep):
    requests, rounds = sweep
    assert [s.name for s in F.FIGURES] == ["speedup_vs_rtt", "speedup_vs_bandwidth", "time_per_token_by_category",
                                           "energy_per_token", "acceptance_by_position", "round_timeline",
                                           "measured_vs_bound"]
    drawn, left_out = F.draw_figures(requests, rounds)
    assert set(drawn) == {"speedup_vs_rtt", "speedup_vs_bandwidth", "time_per_token_by_category"}
    assert "no energy figure" in left_out["energy_per_token"]
    assert left_out["acceptance_by_position"].startswith("no round records")  # the sweep recorded no rounds
    assert left_out["round_timeline"].startswith("no round records")
    cloud_rounds = pd.DataFrame({"system": ["cloud_only"], "drafted": [0], "accepted": [0]})
    assert "no round drafted" in F.draw_figures(requests, cloud_rounds)[1]["acceptance_by_position"]
    one_net = requests[requests.network == "lan"]
    _, left_out = F.draw_figures(one_net, rounds)
    assert "one RTT only (1.0)" in left_out["speedup_vs_rtt"]
    only_base = requests[requests.system == "cloud_only"]
    _, left_out = F.draw_figures(only_base, rounds)
    assert "only one system (cloud_only) ran" in left_out["speedup_vs_rtt"]
    no_baseline = requests[requests.system.isin(["pipesd", "vanilla"]) & (requests.system != "vanilla")]
    no_baseline = pd.concat([no_baseline, requests[requests.system == "cloud_only"].assign(system="edge_only")])
    _, left_out = F.draw_figures(no_baseline, rounds)  # two systems, neither a baseline
    assert "no baseline system" in left_out["speedup_vs_rtt"]


def test_png_has_no_software_url(sweep):
    png = F.figure_png(F.time_per_token_by_category(*sweep))
    assert png.startswith(b"\x89PNG") and b"http" not in png and b"matplotlib" not in png
