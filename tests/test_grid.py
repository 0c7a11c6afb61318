"""Comparison grids (experiment presets such as pipesd_table1): checked config, a small real run."""

from __future__ import annotations

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.grid import grid_spec, run_grid, summary_rows
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


def test_grid_runs_every_cell_to_the_same_token_count(tmp_path, capsys):
    cfg = _compose("pair=toy")
    OmegaConf.set_struct(cfg, False)
    cfg.grid = GRID
    cells = run_grid(cfg, tmp_path / "run")
    assert len(cells) == 4 and all(c.tokens == 30 for c in cells)
    tuned = [c for c in cells if c.method == "pipesd"]
    assert all(0 < c.params["r1"] < 1 and 0 < c.params["r2"] < 1 for c in tuned)
    rows = summary_rows(grid_spec(cfg.grid), cells)
    a = next(r for r in rows if (r["scenario"], r["method"]) == ("A", "pipesd"))
    assert a["paper_speedup_vs_vanilla"] == 2.0 and a["speedup_ratio"] == pytest.approx(a["speedup_vs_vanilla"] / 2)
    assert pd.read_csv(tmp_path / "run" / "grid.csv").shape[0] == 4
    requests = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    assert set(requests["scenario"]) == {"A", "B"} and set(requests["method"]) == {"vanilla", "pipesd"}
    from workloads import load_workload, workload_spec
    from harness.grid import _conf
    smoke = load_workload(workload_spec({**_conf("workload", "smoke"), "chat_template": False}), 12, progress=False)
    held_out = {p.id for p in smoke.prompts[-2:]}
    assert held_out.isdisjoint(set(requests["prompt_id"])), "the tuning prompts leaked into the evaluation"
    for _, cell in requests.groupby(["scenario", "method"]):  # one continuous run per cell: one edge device
        assert len(cell) > 1 and (cell["start"].to_numpy()[1:] >= cell["end"].to_numpy()[:-1]).all()
    assert "toy_grid" in capsys.readouterr().out
