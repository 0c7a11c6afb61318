"""The Hydra app: config errors are caught and named before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from harness.run import CONF_DIR, ConfigError, make_plan


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_plans():
    plan = make_plan(_compose())
    assert plan.system.name == "vanilla" and plan.mode == "virtual"
    assert plan.edge.kind in ("declared", "measured") and plan.cloud.cost
    assert plan.link.name == "loopback"


def test_requests_beyond_the_context_are_left_out_and_named(capsys):
    from types import SimpleNamespace

    from harness.run import fit_context
    from systems.api import GenerationRequest

    engine = SimpleNamespace(info=SimpleNamespace(n_ctx=100))
    turns = [SimpleNamespace(request_id=f"r{n}", request=GenerationRequest(f"r{n}", [1] * n, 40)) for n in (60, 61, 10)]
    kept, left = fit_context(turns, [engine, SimpleNamespace(info=SimpleNamespace(n_ctx=4096))])
    assert [t.request_id for t in kept] == ["r60", "r10"]  # 60 + 40 = 100 fits; 61 + 40 does not
    assert left == [{"request_id": "r61", "prompt_tokens": 61, "max_new_tokens": 40,
                     "reason": "prompt + max_new_tokens = 101 tokens exceed the models' context (100)"}]
    assert "leaving out r61" in capsys.readouterr().err


def test_a_budget_no_request_fits_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", "pair=toy", "workload.chat_template=false",
                          "max_new_tokens=1000000000", f"out={tmp_path}"], capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]  # after the workload's one-line summary
    assert out.returncode == 2 and "no request fits the models' context of 4096 tokens" in last
    assert "Traceback" not in out.stderr and "leaving out" not in out.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("system", ["vanilla", "edge_only", "cloud_only"])
@pytest.mark.parametrize("network", ["loopback", "lan", "wan_50ms_10mbit", "slow_wan", "pipesd_s1", "pipesd_s4",
                                     "wifi", "5g", "4g", "congested_cellular", "satellite", "lossy", "lossy_4g"])
def test_every_shipped_option_plans(system, network):
    plan = make_plan(_compose(f"system={system}", f"network={network}"))
    assert plan.system.name == system and plan.link.name == network


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as err:
        _compose("system=vanila")
    assert "vanilla" in str(err.value) and "cloud_only" in str(err.value)


@pytest.mark.parametrize("override,key", [
    ("system.params.gamma=four", "gamma"),
    ("+system.params.gammma=4", "gammma"),
    ("mode=fast", "mode"),
    ("max_new_tokens=0", "max_new_tokens"),
    ("network.rtt_ms=-5", "network.rtt_ms"),
    ("device.edge.step_s=-1", "step_s"),
])
def test_wrong_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_plan(_compose(override))


def test_cli_reports_a_config_error_in_one_line(tmp_path):
    # out= keeps Hydra's run folder (made before the config is checked) out of the repository's results/
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", "pair=toy", "system.params.gamma=x",
                          f"out={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "system.params (vanilla): key 'gamma' must be int" in out.stderr
    assert list(tmp_path.iterdir()) == []  # the refused run leaves no folder behind


@pytest.mark.parametrize("argv,message", [
    (["run", "pair=toy", "seed=abc"], "seed must be an integer, got 'abc'"),
    (["link-check", "network=nosuch"], "Could not find 'network/nosuch'; valid: 4g, 5g,"),
])
def test_more_mistakes_are_one_line(tmp_path, argv, message):
    out = subprocess.run([sys.executable, "-m", "harness.cli", *argv, f"out={tmp_path}"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("network", ["lan", "wan_50ms_10mbit", "slow_wan", "lossy", "satellite", "pipesd_s1"])
def test_documented_network_keys_can_be_set_on_every_profile(network):
    """The README's network keys (loss, jitter, queue) are overridable on any profile, not
    only on those that set them."""
    plan = make_plan(_compose("pair=toy", f"network={network}", "network.loss=0.01", "network.jitter_ms=3",
                              "network.queue_ms=80"))
    assert plan.network.loss == 0.01 and plan.network.jitter_s == pytest.approx(0.003)


def test_virtual_run_on_the_toy_pair(capsys):
    from harness.run import execute

    records = execute(_compose("pair=toy", "network=wan_50ms_10mbit", "workload.chat_template=false",
                               "workload.size=2", "max_new_tokens=16"))
    assert len(records) == 2
    for r in records:  # the limit or EOS (the toy's token 0) ends a request; no token before a round trip
        assert r.n_tokens == 16 or (0 < r.n_tokens < 16 and r.output_tokens[-1] == 0)
        assert r.ttft >= 0.05 and r.tpot > 0 and r.rounds
    assert "ms/token (modelled)" in capsys.readouterr().out


def test_run_writes_records_and_resumes(tmp_path, capsys):
    import pandas as pd

    from harness.run import execute

    cfg = _compose("pair=toy", "workload.chat_template=false", "workload.size=3", "max_new_tokens=8")
    assert len(execute(cfg, run_dir=tmp_path)) == 3
    assert len(pd.read_parquet(tmp_path / "requests.parquet")) == 3
    assert execute(cfg, run_dir=tmp_path) == []  # everything already recorded: nothing recomputed
    assert len(pd.read_parquet(tmp_path / "requests.parquet")) == 3


def test_multirun_with_the_joblib_launcher(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness.run", "-m", "hydra/launcher=joblib", "pair=toy",
                          "workload.chat_template=false", "workload.size=1", "max_new_tokens=4",
                          "system=vanilla,cloud_only", f"out={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(p.parent.name for p in tmp_path.glob("multirun-*/*/requests.parquet"))
    assert len(runs) == 2 and any("vanilla" in r for r in runs) and any("cloud_only" in r for r in runs)


def test_wall_mode_matches_virtual_mode_tokens(tmp_path):
    from harness.run import execute

    common = ("pair=toy", "workload.chat_template=false", "workload.size=2", "max_new_tokens=12")
    virtual = execute(_compose(*common))
    wall = execute(_compose(*common, "mode=wall"), run_dir=tmp_path)
    assert [r.output_tokens for r in wall] == [r.output_tokens for r in virtual]
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["clock"] == "wall"
    # energy: the edge per request, the cloud per run, labelled by kind, never zero when unmeasured
    cloud = manifest["energy"]["cloud_run"]
    # (CPU time advances in 10 ms ticks, so a tiny toy run may read 0 J: a reading, not a gap)
    assert cloud["kind"] in ("measured", "estimated") and cloud["joules"] is not None
    assert cloud["joules"] > 0 if cloud["kind"] == "estimated" else cloud["joules"] >= 0
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "requests.parquet")
    assert rows["energy_edge_j"].notna().all() and (rows["energy_edge_j"] >= 0).all()
    assert rows["energy_cloud_j"].isna().all()
    assert set(rows["energy_edge_kind"]) <= {"measured", "estimated"}


def test_wall_mode_names_an_unknown_backend():
    with pytest.raises(ConfigError, match="network.backend"):
        make_plan(_compose("pair=toy", "mode=wall", "network=slow_wan", "network.backend=carrier_pigeon"))


def test_multi_turn_run_serves_second_turns_and_resumes_them(tmp_path):
    import json

    import pandas as pd

    from harness.run import execute

    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": f"q{i}", "category": "chat",
                                           "turns": [f"<t{i + 1}><t2>", "<t3><t4>"]}) + "\n" for i in range(2)))
    cfg = _compose("pair=toy", "workload=file", f"workload.path={prompts}", "workload.chat_template=false",
                   "max_new_tokens=6")
    run_dir = tmp_path / "run"
    records = execute(cfg, run_dir=run_dir)
    ids = sorted(r.request_id for r in records)
    assert len(ids) == 4 and sum("turn2" in i for i in ids) == 2
    second = next(r for r in records if r.request_id.endswith("turn2"))
    first = next(r for r in records if r.request_id == second.request_id.split("#")[0])
    assert second.prompt_tokens > first.prompt_tokens + first.n_tokens - 1  # the answer is in the prompt
    assert len(pd.read_parquet(run_dir / "requests.parquet")) == 4
    assert execute(cfg, run_dir=run_dir) == []  # all recorded: nothing is served again
    # As if the run had stopped after the first turns: drop the turn-2 lines from the journals.
    for journal in ("requests.jsonl", "rounds.jsonl"):
        path = run_dir / journal
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if "#turn2" not in json.loads(line).get("request_id", "")]
        path.write_text("".join(kept))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest.pop("complete") is True  # a run cut short is never marked complete
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    resumed = execute(cfg, run_dir=run_dir)
    assert sorted(r.request_id for r in resumed) == sorted(i for i in ids if "turn2" in i)
    assert {r.request_id: r.output_tokens for r in resumed} == {
        r.request_id: r.output_tokens for r in records if "turn2" in r.request_id}


def test_a_refused_resume_is_one_line_and_keeps_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    common = [sys.executable, "-m", "harness.cli", "run", "pair=toy", "workload.size=1", "workload.chat_template=false",
              f"hydra.run.dir={run_dir}"]
    assert subprocess.run([*common, "max_new_tokens=4"], capture_output=True, text=True, timeout=120).returncode == 0
    out = subprocess.run([*common, "max_new_tokens=5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "was written with a different config" in out.stderr.strip().splitlines()[-1]
    assert (run_dir / "requests.jsonl").read_text().count("\n") == 1  # what was measured stays


def test_wall_runs_honour_pair_overrides(tmp_path):
    """mode=wall starts its processes on the pair as resolved, overrides included: a toy draft
    set equal to the target (agreement 1.0) has every draft token accepted in both modes."""
    from harness.results import load_run
    from harness.run import execute

    for mode in ("virtual", "wall"):
        cfg = _compose("pair=toy", "pair.draft.options.agreement=1.0", "workload.size=2", "max_new_tokens=12",
                       "workload.chat_template=false", f"mode={mode}")
        execute(cfg, tmp_path / mode)
        manifest, requests, rounds = load_run(tmp_path / mode)
        assert manifest["config"]["pair"]["draft"]["options"]["agreement"] == 1.0
        assert rounds["verified"].sum() > 0 and (rounds["accepted"] == rounds["verified"]).all(), mode
