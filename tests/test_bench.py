"""`specwan bench` end to end on the toy pair: table, run folder, plot, memoized sweep."""

from __future__ import annotations

import pandas as pd

from harness.cli import main
from systems.api import system_names


def test_bench_writes_a_comparison(tmp_path, capsys):
    assert main(["bench", "--pair", "toy", "--networks", "lan,slow_wan", "--prompts", "2",
                 "--max-new-tokens", "16", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "speedup_vs_cloud_only" in out and "replayed" in out
    # progress: one bar over every request (later turns included), named by the system and network it serves
    n_requests = len(pd.read_parquet(next(tmp_path.iterdir()) / "requests.parquet"))
    assert f"{n_requests}/{n_requests}" in captured.err and "request" in captured.err
    assert "vanilla on slow_wan" in captured.err
    (run_dir,) = list(tmp_path.iterdir())
    for name in ("manifest.json", "requests.parquet", "rounds.parquet", "summary.csv", "comparison.png"):
        assert (run_dir / name).stat().st_size > 0, name
    requests = pd.read_parquet(run_dir / "requests.parquet")
    assert len(requests) == 2 * 2 * len(system_names())  # prompts x networks x systems
    assert set(requests["workload"]) == {"mixed"} and requests["category"].notna().all()
    assert "per category" in out
    by_category = pd.read_csv(run_dir / "summary_by_category.csv")
    assert set(by_category["category"]) == set(requests["category"])
    assert {"acceptance", "speedup_vs_cloud_only"} <= set(by_category.columns)
    summary = pd.read_csv(run_dir / "summary.csv")
    slow = summary.set_index(["system", "network"])["ms_per_token"]
    assert slow[("vanilla", "slow_wan")] > slow[("vanilla", "lan")]  # the link costs time
    assert slow[("edge_only", "slow_wan")] == slow[("edge_only", "lan")]  # edge-only never uses it
    # energy: J/token per role, its kind in the column name (modelled in virtual time)
    assert "edge_J_per_token_estimated" in out and "edge energy: estimated" in out
    energy = summary.set_index(["system", "network"])
    assert (energy["edge_J_per_token_estimated"] > 0).all()
    assert energy.loc[("edge_only", "lan"), "cloud_J_per_token_estimated"] == 0.0
    assert energy.loc[("vanilla", "slow_wan"), "edge_J_per_token_estimated"] > \
        energy.loc[("vanilla", "lan"), "edge_J_per_token_estimated"]  # waiting on a slow link costs idle power
    assert requests["energy_edge_kind"].eq("estimated").all() and requests["energy_edge_j"].gt(0).all()
    assert (run_dir / "energy.png").stat().st_size > 0
    import json

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {manifest["energy"][role]["kind"] for role in ("edge", "cloud")} == {"estimated"}


def test_bench_rejects_unknown_names(capsys):
    assert main(["bench", "--pair", "toy", "--systems", "nope"]) == 2
    assert "valid systems" in capsys.readouterr().err
