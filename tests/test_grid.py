"""Comparison grids (experiment presets such as pipesd_table1): checked config, a small real run."""

from __future__ import annotations

import contextlib
import io

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from analysis.grid import grid_rows
from harness.grid import grid_spec, run_grid
from harness.run import CONF_DIR, ConfigError


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_pipesd_table1_preset_is_complete():
    spec = grid_spec(_compose("experiment=pipesd_table1").grid)
    assert [s.name for s in spec.scenarios] == ["S1", "S2", "S3", "S4"]
    for d in spec.datasets:
        assert [m.system for m in d.methods] == ["vanilla", "hsl", "edgellm", "pipesd"]
        assert set(d.paper["tpt_ms"]) == {"S1", "S2", "S3", "S4"}
    assert spec.tune["systems"] == ["pipesd"] and spec.tune["trials"] == 16 and spec.tune["tokens"] == 64


@pytest.mark.parametrize("override,message", [
    ("grid.datasets.math.methods.hsl.params.r2=2.0", "methods.hsl: hsl: r2 must be in"),
    ("+grid.datasets.math.methods.hsl.params.r3=0.5", "unknown key.*r3"),
    ("grid.scenarios.S1.network=nowhere", "unknown network 'nowhere'"),
    ("grid.accepted_tokens=0", "grid.accepted_tokens must be a positive integer"),
    ("grid.tune.prompts=0", "grid.tune.prompts must be a positive integer"),
])
def test_grid_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        grid_spec(_compose("experiment=pipesd_table1", override).grid)


GRID = {
    "name": "toy_grid", "accepted_tokens": 30, "max_new_tokens": 12,
    "scenarios": {"A": {"network": "pipesd_s1", "device": "laptop_gpu_cloud"},
                  "B": {"network": "slow_wan", "device": "phone_gpu_cloud"}},
    "tune": {"systems": ["pipesd"], "method": "random", "trials": 2, "tokens": 6, "prompts": 2},
    "datasets": {"smoke": {"workload": "smoke", "workload_params": {"chat_template": False},
                           "methods": {"vanilla": {"system": "vanilla", "params": {"gamma": 4, "uplink_q": "full"}},
                                       "pipesd": {"system": "pipesd", "params": {}}},
                           "paper": {"tpt_ms": {"A": [200, 100]}}}},
}


@pytest.fixture(scope="module")
def toy_grid_run(tmp_path_factory):
    """The toy grid run once: (run folder, cells run_grid returned, what it printed)."""
    cfg = _compose("pair=toy")
    OmegaConf.set_struct(cfg, False)
    cfg.grid = GRID
    run_dir = tmp_path_factory.mktemp("grid") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # capsys is per test; the run is shared by the module
        cells = run_grid(cfg, run_dir)
    return run_dir, cells, out.getvalue()


def test_grid_runs_every_cell_to_the_same_token_count(toy_grid_run):
    run_dir, cells, printed = toy_grid_run
    rows = grid_rows(run_dir)
    assert len(rows) == 4 and all(r["tokens"] == 30 for r in rows)
    assert [c.tokens for c in cells] == [r["tokens"] for r in rows]
    tuned = [r for r in rows if r["method"] == "pipesd"]
    assert all(0 < r["r1"] < 1 and 0 < r["r2"] < 1 for r in tuned)
    assert [(r["r1"], r["r2"]) for r in tuned] == [(c.params["r1"], c.params["r2"]) for c in cells
                                                   if c.method == "pipesd"]
    a = next(r for r in rows if (r["scenario"], r["method"]) == ("A", "pipesd"))
    assert a["paper_speedup_vs_vanilla"] == 2.0 and a["speedup_ratio"] == pytest.approx(a["speedup_vs_vanilla"] / 2)
    assert not (run_dir / "grid.csv").exists(), "the table is analysis's, from the run folder"
    requests = pd.read_parquet(run_dir / "requests.parquet")
    assert set(requests["scenario"]) == {"A", "B"} and set(requests["method"]) == {"vanilla", "pipesd"}
    from workloads import load_workload, workload_spec
    from harness.grid import _conf
    smoke = load_workload(workload_spec({**_conf("workload", "smoke"), "chat_template": False}), 12, progress=False)
    held_out = {p.id for p in smoke.prompts[-2:]}
    assert held_out.isdisjoint(set(requests["prompt_id"])), "the tuning prompts leaked into the evaluation"
    for _, cell in requests.groupby(["scenario", "method"]):  # one continuous run per cell: one edge device
        assert len(cell) > 1 and (cell["start"].to_numpy()[1:] >= cell["end"].to_numpy()[:-1]).all()
    assert printed.strip().splitlines() == [f"run folder: {run_dir}; its tables and report: "
                                            f"python -m analysis.report {run_dir}"]


def test_grid_rows_are_the_records_sums(toy_grid_run):
    """Each row from the records by hand: TPT, acceptance and cloud energy pooled over the cell."""
    run_dir, _, _ = toy_grid_run
    requests = pd.read_parquet(run_dir / "requests.parquet")
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    for r in grid_rows(run_dir):
        cell = ["scenario", "dataset", "method"]
        mine = requests[(requests[cell] == [r[c] for c in cell]).all(axis=1)]
        verified = rounds[(rounds[cell] == [r[c] for c in cell]).all(axis=1)]["verified"].sum()
        assert r["tpt_ms"] == pytest.approx(1e3 * mine["e2e"].sum() / mine["n_tokens"].sum())
        assert r["acceptance"] == pytest.approx(mine["accepted"].sum() / verified)
        busy = (mine["energy_cloud_j"] - mine["energy_cloud_idle_j"].fillna(0.0)).sum()
        assert r["cloud_busy_j_per_100"] == pytest.approx(100 * busy / mine["n_tokens"].sum())
        assert r["cloud_j_per_100_with_idle"] == pytest.approx(100 * mine["energy_cloud_j"].sum() / r["tokens"])
        assert r["cloud_energy_kind"] == "estimated"
        base = next(b for b in grid_rows(run_dir) if (b["scenario"], b["method"]) == (r["scenario"], "vanilla"))
        assert r["speedup_vs_vanilla"] == pytest.approx(base["tpt_ms"] / r["tpt_ms"])


def test_report_cli_prints_the_grid_and_writes_grid_csv(toy_grid_run, tmp_path, capsys):
    from analysis import report as R

    run_dir, _, _ = toy_grid_run
    assert R.main([str(run_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(tmp_path / "report.html"), "the report's path stays the last line"
    title = out.index("toy_grid")
    assert out[title + 1].split() == list(pd.DataFrame(grid_rows(run_dir)).columns)
    assert [line.split()[:3] for line in out[title + 2:title + 6]] == [
        ["A", "smoke", "vanilla"], ["A", "smoke", "pipesd"], ["B", "smoke", "vanilla"], ["B", "smoke", "pipesd"]]
    assert out[title + 6].startswith("ours: time modelled in virtual time") and "pair toy" in out[title + 6]
    written = pd.read_csv(tmp_path / "grid.csv")
    assert written.shape[0] == 4
    assert written["tpt_ms"].tolist() == pytest.approx([r["tpt_ms"] for r in grid_rows(run_dir)])
    page = (tmp_path / "report.html").read_text()
    assert "Comparison grid: toy_grid" in page
