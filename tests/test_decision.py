"""analysis/decision.py: the best system per network point and its margin, against cases computed
by hand from synthetic records (frames as load_runs returns them), ties included."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import decision as D
from analysis.figures import RTT_COLUMN, UPLINK_COLUMN, figure_caption
from analysis.stats import paired_ratio

PROMPTS = ("p0", "p1", "p2")


def requests_frame(values: dict, *, column: str = "tpot", n_tokens: int = 10, **extra) -> pd.DataFrame:
    """Request rows: ``values[(rtt, up)][system]`` = one value of ``column`` per prompt."""
    rows = []
    for (rtt, up), by_system in values.items():
        for system, per_prompt in by_system.items():
            for prompt, v in zip(PROMPTS, per_prompt):
                rows.append({"run": f"{system}-{rtt}-{up}", "system": system, "network": "lan", "prompt_id": prompt,
                             "request_id": prompt, "seed": 0, "attempt": 0, "clock": "virtual", "error": None,
                             "n_tokens": n_tokens, "rounds": 0, RTT_COLUMN: rtt, UPLINK_COLUMN: up, column: v,
                             **extra})
    return pd.DataFrame(rows)


# A: wins at low RTT, B at high RTT; C never. Means by hand: see EXPECTED.
GRID = {
    (10.0, 1.0): {"A": [1.0, 2.0, 3.0], "B": [2.0, 3.0, 4.0], "C": [5.0, 5.0, 5.0]},   # A 2, B 3, C 5
    (10.0, 100.0): {"A": [1.0, 1.0, 1.0], "B": [4.0, 4.0, 4.0], "C": [2.0, 2.0, 2.0]},  # A 1, C 2, B 4
    (80.0, 1.0): {"A": [6.0, 6.0, 6.0], "B": [3.0, 4.0, 5.0], "C": [8.0, 8.0, 8.0]},   # B 4, A 6, C 8
    (80.0, 100.0): {"A": [4.0, 5.0, 6.0], "B": [1.0, 2.0, 3.0], "C": [2.5, 2.5, 2.5]},  # B 2, C 2.5, A 5
}
EXPECTED = {  # point -> (best, value, runner-up, its value)
    (10.0, 1.0): ("A", 2.0, "B", 3.0),
    (10.0, 100.0): ("A", 1.0, "C", 2.0),
    (80.0, 1.0): ("B", 4.0, "A", 6.0),
    (80.0, 100.0): ("B", 2.0, "C", 2.5),
}


def test_best_and_margin_per_point_by_hand():
    table = D.decision_table(requests_frame(GRID), None, "latency", n_resamples=0)
    assert list(table[[RTT_COLUMN, UPLINK_COLUMN]].itertuples(index=False, name=None)) == list(EXPECTED)
    for row in table.to_dict("records"):
        best, value, runner, other = EXPECTED[(row[RTT_COLUMN], row[UPLINK_COLUMN])]
        assert (row["best"], row["runner_up"], row["tied"]) == (best, runner, False)
        assert row["value"] == pytest.approx(value) and row["runner_up_value"] == pytest.approx(other)
        assert row["margin"] == pytest.approx(1 - value / other)
        assert row["ratio"] == pytest.approx(other / value)
        assert row["n_systems"] == 3 and row["objective"] == "latency" and row["unit"] == "s/token"
        assert row["provenance"] == "modelled"
        assert math.isnan(row["margin_low"]) and not row["distinguishable"]  # no bootstrap asked for
    first = table.iloc[0]
    assert (first["value:A"], first["value:B"], first["value:C"]) == pytest.approx((2.0, 3.0, 5.0))


def test_a_tie_names_every_winner_and_measures_the_margin_to_the_next():
    grid = {(10.0, 1.0): {"B": [1.0, 2.0, 3.0], "A": [3.0, 2.0, 1.0], "C": [4.0, 4.0, 4.0]},  # A = B = 2, C 4
            (80.0, 1.0): {"A": [1.0, 1.0, 1.0], "B": [1.0, 1.0, 1.0]}}  # everyone ties
    table = D.decision_table(requests_frame(grid), None, "latency", n_resamples=0).set_index(RTT_COLUMN)
    tie = table.loc[10.0]
    assert tie["best"] == "A = B" and bool(tie["tied"])
    assert tie["value"] == pytest.approx(2.0)
    assert tie["runner_up"] == "C" and tie["margin"] == pytest.approx(0.5)
    everyone = table.loc[80.0]
    assert everyone["best"] == "A = B" and bool(everyone["tied"])
    assert pd.isna(everyone["runner_up"]) and math.isnan(everyone["margin"])
    # within rtol it is a tie; beyond it, not
    near = {(1.0, 1.0): {"A": [1.0, 1.0, 1.0], "B": [1.0 + 1e-12, 1.0, 1.0]}}
    assert bool(D.decision_table(requests_frame(near), None, n_resamples=0)["tied"].iloc[0])
    assert not D.decision_table(requests_frame(near), None, rtol=0.0, n_resamples=0)["tied"].iloc[0]


def test_margin_interval_is_the_paired_ratio_of_best_against_runner_up():
    rng = np.random.default_rng(1)
    base = rng.uniform(1.0, 2.0, 3)
    grid = {(10.0, 1.0): {"A": list(base), "B": list(base * 1.5 + rng.normal(0, 0.01, 3))}}
    requests = requests_frame(grid)
    row = D.decision_table(requests, None, "latency", n_resamples=999).iloc[0]
    ratio = paired_ratio(requests, "tpot", candidate="A", baseline="B", n_resamples=999)
    assert row["ratio"] == pytest.approx(ratio.estimate)
    assert row["margin_low"] == pytest.approx(1 - 1 / ratio.low)
    assert row["margin_high"] == pytest.approx(1 - 1 / ratio.high)
    assert bool(row["distinguishable"]) == (ratio.low > 1)
    assert row["margin_low"] <= row["margin"] <= row["margin_high"]


def test_failed_requests_and_null_figures_are_left_out():
    grid = {(10.0, 1.0): {"A": [1.0, 9.0, np.nan], "B": [3.0, 3.0, 3.0]}}
    requests = requests_frame(grid)
    requests.loc[(requests.system == "A") & (requests.prompt_id == "p1"), "error"] = "timeout"
    row = D.decision_table(requests, None, n_resamples=0).iloc[0]
    assert row["best"] == "A" and row["value"] == pytest.approx(1.0)  # only p0 counts
    assert row["value:B"] == pytest.approx(3.0)
    # a system with no usable request at a point is not a candidate there
    requests.loc[requests.system == "A", "tpot"] = np.nan
    row = D.decision_table(requests, None, n_resamples=0).iloc[0]
    assert row["best"] == "B" and pd.isna(row["runner_up"]) and row["n_systems"] == 1 and math.isnan(row["value:A"])


def _rounds(rows: list[tuple[str, str, float | None, int]]) -> pd.DataFrame:
    """Round rows (system, prompt, t_verify, batch_size) at the single point of CLOUD_GRID."""
    return pd.DataFrame([{"run": f"{s}-10.0-1.0", "system": s, "network": "lan", "prompt_id": p, "request_id": p,
                          "seed": 0, "attempt": 0, "clock": "virtual", "t_verify": t, "batch_size": b}
                         for s, p, t, b in rows])


def test_cloud_time_sums_verify_time_shared_by_batch_per_token():
    requests = requests_frame({(10.0, 1.0): {"A": [0, 0, 0], "B": [0, 0, 0], "E": [0, 0, 0]}}, column="unused")
    counts = {("A", "p0"): 2, ("A", "p1"): 1, ("A", "p2"): 2, ("B", "p0"): 1, ("B", "p1"): 1, ("B", "p2"): 1}
    requests["rounds"] = [counts.get((s, p), 0) for s, p in zip(requests.system, requests.prompt_id)]
    rounds = _rounds([("A", "p0", 0.4, 1), ("A", "p0", 0.6, 2),  # 0.4 + 0.3 = 0.7 s
                      ("A", "p1", 0.2, 1),                        # 0.2 s
                      ("A", "p2", 0.5, 1),                        # one of its two rounds missing: null
                      ("B", "p0", 1.0, 4), ("B", "p1", None, 1), ("B", "p2", 0.8, 1)])  # 0.25, null, 0.8
    values = D.objective_values(requests, rounds, "cloud_time")
    got = dict(zip(zip(requests.system, requests.prompt_id), values))
    assert got[("A", "p0")] == pytest.approx(0.07) and got[("A", "p1")] == pytest.approx(0.02)
    assert math.isnan(got[("A", "p2")]) and math.isnan(got[("B", "p1")])
    assert got[("B", "p0")] == pytest.approx(0.025) and got[("B", "p2")] == pytest.approx(0.08)
    assert all(got[("E", p)] == 0.0 for p in PROMPTS)  # edge-only: never used the cloud
    row = D.decision_table(requests, rounds, "cloud_time", n_resamples=0).iloc[0]
    assert row["best"] == "E" and row["value"] == 0.0 and row["runner_up"] == "A"
    assert row["runner_up_value"] == pytest.approx(0.045) and row["value:B"] == pytest.approx(0.0525)
    assert row["margin"] == 1.0 and row["ratio"] == math.inf
    with pytest.raises(ValueError, match="round records"):
        D.decision_table(requests, rounds.drop(columns="batch_size"), "cloud_time")


def test_energy_is_both_roles_per_token_and_null_unless_both_are_known():
    requests = requests_frame({(10.0, 1.0): {"A": [0, 0, 0], "B": [0, 0, 0]}}, column="unused", n_tokens=4,
                              energy_edge_kind="estimated", energy_cloud_kind="estimated")
    requests["energy_edge_j"] = [1.0, 2.0, 3.0, 4.0, None, 4.0]
    requests["energy_cloud_j"] = [3.0, 2.0, 1.0, 4.0, 4.0, 8.0]
    values = D.objective_values(requests, None, "energy").tolist()
    assert values[:4] == pytest.approx([1.0, 1.0, 1.0, 2.0]) and math.isnan(values[4]) and values[5] == 3.0
    row = D.decision_table(requests, None, "energy", n_resamples=0).iloc[0]
    assert (row["best"], row["value"], row["runner_up_value"]) == ("A", 1.0, 2.5)
    assert row["provenance"] == "estimated" and row["unit"] == "J/token"


def test_objectives_by_name_or_column_and_clear_errors():
    requests = requests_frame({(1.0, 1.0): {"A": [3, 3, 3], "B": [2, 2, 2]}}, column="bytes_up")
    assert D.decision_table(requests, None, "bytes_up", n_resamples=0)["best"].iloc[0] == "B"
    with pytest.raises(ValueError, match="unknown objective 'speed'"):
        D.decision_table(requests, None, "speed")
    with pytest.raises(ValueError, match="lack column.*tpot"):
        D.decision_table(requests, None, "latency")


def test_two_runs_of_one_system_at_one_point_are_refused_naming_what_differs():
    requests = requests_frame({(10.0, 1.0): {"A": [1, 1, 1], "B": [2, 2, 2]}})
    twice = requests[requests.system == "A"].assign(run="A-lossy", **{"config.network.loss": 0.05})
    requests = pd.concat([requests.assign(**{"config.network.loss": 0.0}), twice], ignore_index=True)
    with pytest.raises(ValueError, match=r"system 'A' answered the same prompt.*config\.network\.loss"):
        D.decision_table(requests, None)
    table = D.decision_table(requests, None, by=["config.network.loss"], n_resamples=0)
    assert list(table["best"]) == ["A", "A"] and list(table["n_systems"]) == [2, 1]


def test_decision_map_colours_each_cell_by_its_winner_and_writes_the_margin():
    grid = {**GRID, (80.0, 100.0): {"A": [1.0, 2.0, 3.0], "B": [3.0, 2.0, 1.0], "C": [4.0, 4.0, 4.0]}}  # a tie
    fig = D.decision_map(requests_frame(grid), None, "latency", n_resamples=0)
    ax = fig.axes[0]
    texts = {t.get_gid(): t.get_text() for t in ax.texts if str(t.get_gid()).startswith("cell:")}
    # rows: RTT 10, 80 (bottom to top); columns: uplink 1, 100
    assert texts["cell:0:0"] == "A\nsaves 33% vs B"
    assert texts["cell:0:1"] == "A\nsaves 50% vs C"
    assert texts["cell:1:0"] == "B\nsaves 33% vs A"
    assert texts["cell:1:1"] == "A =\nB\ntie · saves 50% vs C"
    codes = ax.images[0].get_array()
    assert codes.tolist() == [[0, 0], [1, 2]]  # A, B; the tie in its own colour
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "100"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["10", "80"]
    assert [h.get_text() for h in ax.get_legend().get_texts()] == ["A", "B", "tie"]
    assert "modelled" in ax.get_title() and "lowest mean time per output token" in figure_caption(fig)


def test_decision_map_leaves_a_missing_point_blank_and_refuses_mixed_pairs():
    grid = {k: v for k, v in GRID.items() if k != (80.0, 100.0)}
    fig = D.decision_map(requests_frame(grid), None, n_resamples=0)
    codes = fig.axes[0].images[0].get_array()
    assert np.ma.is_masked(codes[1, 1]) or np.isnan(codes[1, 1])
    mixed = pd.concat([requests_frame(grid, pair="toy"), requests_frame(grid, pair="big")], ignore_index=True)
    with pytest.raises(ValueError, match="varies in pair"):
        D.decision_map(mixed, None, n_resamples=0)


@pytest.mark.slow
def test_the_decision_map_experiment_end_to_end_on_the_toy_pair(tmp_path, capsys):
    """`specwan run experiment=decision_map` (a small grid) then `python -m analysis.decision`:
    one run folder per system and point, named by the point, and the table's winner at each
    point is the system with the lowest mean TPOT there, computed here from the records."""
    import subprocess
    import sys

    from analysis.load import load_runs

    res = subprocess.run([sys.executable, "-m", "harness.cli", "run", "experiment=decision_map", "pair=toy",
                          "workload.size=2", "max_new_tokens=16", f"out={tmp_path}", "system=vanilla,cloud_only,hsl",
                          "network.rtt_ms=0,300", "network.up_mbps=1,100"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "decision_map-toy"
    assert (sweep / "hsl-rtt300-up1" / "manifest.json").is_file() and len(list(sweep.glob("*/manifest.json"))) == 12
    assert D.main([str(sweep), "--objective", "latency", "cloud_time", "--systems", "vanilla,hsl,cloud_only",
                   "--out", str(tmp_path / "maps"), "--resamples", "0"]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in written] == ["decision_table_latency.csv", "decision_map_latency.png",
                                                        "decision_table_cloud_time.csv", "decision_map_cloud_time.png"]
    requests, _ = load_runs(sweep)
    means = requests.groupby([RTT_COLUMN, UPLINK_COLUMN, "system"])["tpot"].mean()
    table = pd.read_csv(tmp_path / "maps" / "decision_table_latency.csv")
    assert len(table) == 4
    for row in table.to_dict("records"):
        point = means.loc[(row[RTT_COLUMN], row[UPLINK_COLUMN])]
        assert row["best"] == point.idxmin() and row["value"] == pytest.approx(point.min())
    assert set(requests["network"]) == {"rtt0-up1", "rtt0-up100", "rtt300-up1", "rtt300-up100"}
    assert D.main([str(sweep), "--systems", "nope"]) == 2
    assert "no requests of nope" in capsys.readouterr().err


def test_decision_map_says_when_a_saving_is_within_noise():
    """With bootstrap CIs: a point whose best beats its runner-up on every prompt keeps its plain
    margin; one where the two swap from prompt to prompt (means 2.0 and 2.03) is marked."""
    grid = {**GRID, (10.0, 100.0): {"A": [1.0, 3.0, 2.0], "B": [2.9, 1.1, 2.1], "C": [9.0, 9.0, 9.0]}}
    table = D.decision_table(requests_frame(grid), None, "latency", n_resamples=999)
    noisy = table[(table[RTT_COLUMN] == 10.0) & (table[UPLINK_COLUMN] == 100.0)].iloc[0]
    assert noisy["best"] == "A" and not noisy["distinguishable"] and noisy["margin_low"] < 0 < noisy["margin_high"]
    texts = {t.get_gid(): t.get_text() for t in D.decision_map(requests_frame(grid), None, "latency", table=table)
             .axes[0].texts if str(t.get_gid()).startswith("cell:")}
    assert texts["cell:0:1"] == "A\nsaves 2% vs B\n(within noise)"
    assert texts["cell:0:0"] == "A\nsaves 33% vs B"  # B is slower on every prompt
