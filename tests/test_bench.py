"""`specwan bench` end to end on the toy pair: table, run folder, plot, memoized sweep."""

from __future__ import annotations

import pandas as pd

from harness.cli import main


def test_bench_writes_a_comparison(tmp_path, capsys):
    assert main(["bench", "--pair", "toy", "--networks", "lan,slow_wan", "--prompts", "2",
                 "--max-new-tokens", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speedup_vs_cloud_only" in out and "replayed" in out
    (run_dir,) = list(tmp_path.iterdir())
    for name in ("manifest.json", "requests.parquet", "rounds.parquet", "summary.csv", "comparison.png"):
        assert (run_dir / name).stat().st_size > 0, name
    requests = pd.read_parquet(run_dir / "requests.parquet")
    assert len(requests) == 2 * 2 * 3  # prompts x networks x systems
    summary = pd.read_csv(run_dir / "summary.csv")
    slow = summary.set_index(["system", "network"])["ms_per_token"]
    assert slow[("vanilla", "slow_wan")] > slow[("vanilla", "lan")]  # the link costs time
    assert slow[("edge_only", "slow_wan")] == slow[("edge_only", "lan")]  # edge-only never uses it


def test_bench_rejects_unknown_names(capsys):
    assert main(["bench", "--pair", "toy", "--systems", "nope"]) == 2
    assert "valid systems" in capsys.readouterr().err
