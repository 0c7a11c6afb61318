"""`make bench` = `specwan run experiment=bench`: a Hydra multirun, one run folder per system
and network, on the toy pair. Its launchers give identical records; an interrupted sweep
resumes with the same command and ends with the records of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis.load import load_runs
from systems.api import system_names

pytestmark = pytest.mark.slow  # each test runs sweeps in child processes (15-60 s)

SLOW_WAN_RTT_MS = 200.0  # conf/network/slow_wan.yaml
SMALL = ["pair=toy", "workload.size=2", "max_new_tokens=16"]


def bench(out: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`specwan run experiment=bench` in a child process (Hydra owns its process's command line)."""
    return subprocess.run([sys.executable, "-m", "harness.cli", "run", "experiment=bench", *SMALL, f"out={out}",
                           *overrides], capture_output=True, text=True, timeout=timeout)


def records(sweep: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep's requests and rounds, in a fixed order, without the label of the folder they came from."""
    requests, rounds = load_runs(sweep)
    keys = ["system", "network", "request_id"]
    where = ["run", "config.out"]  # the folder each came from, nothing measured
    requests = requests.drop(columns=where).sort_values(keys).reset_index(drop=True)
    rounds = rounds.drop(columns=where).sort_values([*keys, "round"]).reset_index(drop=True)
    return requests, rounds


def same_records(a: Path, b: Path) -> None:
    for x, y in zip(records(a), records(b)):
        pd.testing.assert_frame_equal(x, y)


def test_bench_is_a_sweep_of_every_system_over_the_networks(tmp_path):
    res = bench(tmp_path, "network=lan,slow_wan")
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "bench-toy"
    runs = sorted(p.parent.name for p in sweep.glob("*/manifest.json"))
    assert runs == sorted(f"{s}-{n}" for s in system_names() for n in ("lan", "slow_wan"))
    for name in runs:
        manifest = json.loads((sweep / name / "manifest.json").read_text())
        assert manifest["complete"] is True and manifest["config"]["network"]["name"] == name.split("-")[-1]
        assert {manifest["energy"][role]["kind"] for role in ("edge", "cloud")} == {"estimated"}
    requests, _ = load_runs(sweep)
    assert len(requests) == 2 * 2 * len(system_names())  # prompts x networks x systems
    assert set(requests["workload"]) == {"mixed"} and requests["category"].notna().all()
    # each network's figures travel with its records: the analysis can plot speedup against RTT
    rtt = requests.groupby("network")["config.network.rtt_ms"].unique()
    assert list(rtt["lan"]) == [1.0] and list(rtt["slow_wan"]) == [SLOW_WAN_RTT_MS]
    per_token = requests.groupby(["system", "network"]).apply(lambda g: g["e2e"].sum() / g["n_tokens"].sum())
    assert per_token[("vanilla", "slow_wan")] > per_token[("vanilla", "lan")]  # the link costs time
    assert per_token[("edge_only", "slow_wan")] == per_token[("edge_only", "lan")]  # edge-only never uses it
    # progress: a bar per job counting its requests, named by the system and network
    assert "vanilla on slow_wan: 100%" in res.stderr and "2/2" in res.stderr
    # one process serves the sweep: a system's second network replays the model calls of its first
    lines = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("model calls:")]
    assert len(lines) == len(runs) and any(" 0 computed" in ln for ln in lines)


def test_a_system_the_device_cannot_price_is_left_out_of_the_sweep(tmp_path):
    res = bench(tmp_path, "network=lan", "system=split_inference,vanilla", "device=phone_gpu_cloud",
                "workload.size=1", "max_new_tokens=4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "left out split_inference on lan: device: system split_inference runs target layers on the edge" in res.stderr
    sweep = tmp_path / "bench-toy"
    assert "must price the target" in (sweep / "split_inference-lan" / "left_out.txt").read_text()
    assert set(load_runs(sweep)[0]["system"]) == {"vanilla"}
    # run on its own, the same combination is an error, in one line
    single = subprocess.run([sys.executable, "-m", "harness.cli", "run", "pair=toy", "system=split_inference",
                             "device=phone_gpu_cloud", f"out={tmp_path / 'single'}"], capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 2 and "must price the target" in single.stderr and "Traceback" not in single.stderr
    assert not (tmp_path / "single").exists() or list((tmp_path / "single").iterdir()) == []  # no folder left


def test_the_joblib_launcher_gives_the_records_of_the_basic_one(tmp_path):
    grid = ["system=vanilla,pipesd,cloud_only", "network=lan,slow_wan"]
    basic = bench(tmp_path / "basic", *grid)
    assert basic.returncode == 0, basic.stderr[-3000:]
    parallel = bench(tmp_path / "joblib", *grid, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert "Joblib.Parallel" in parallel.stdout + parallel.stderr
    same_records(tmp_path / "basic" / "bench-toy", tmp_path / "joblib" / "bench-toy")


def test_an_interrupted_sweep_resumes_with_the_same_command(tmp_path):
    """SIGINT midway; the same command again runs only what is missing (a finished job is
    skipped, a job cut short resumes after its last request), and the records then equal an
    uninterrupted sweep's."""
    grid = ["system=vanilla,hsl,pipesd,edgellm,cloud_only", "network=lan,slow_wan", "workload.size=4",
            "max_new_tokens=24"]
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "harness.cli", "run", "experiment=bench", *SMALL, f"out={out}", *grid]
    # a suite started in the background inherits SIGINT ignored; the sweep must hear it as a user's Ctrl-C
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # the fifth job has started: four are finished
        seen.append(line)
        if "#4 : " in line or time.monotonic() > deadline:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(seen) + rest
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted; every finished request is recorded" in log and "Traceback" not in log
    sweep = out / "bench-toy"
    finished = {p.parent.name for p in sweep.glob("*/manifest.json")
                if json.loads(p.read_text()).get("complete")}
    assert 4 <= len(finished) < 10

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = {ln.split(" in ")[-1].split(",")[0].rsplit("/", 1)[-1]
               for ln in resumed.stderr.splitlines() if "already complete in" in ln}
    assert skipped == finished  # exactly the finished jobs were skipped, without loading a model
    assert all(json.loads(p.read_text()).get("complete") for p in sweep.glob("*/manifest.json"))

    whole = tmp_path / "whole"
    assert subprocess.run([*cmd[:-len(grid) - 1], f"out={whole}", *grid], capture_output=True,
                          timeout=600).returncode == 0
    same_records(sweep, whole / "bench-toy")
    # and so the report: its tables (the paired speedups and their bootstrap CIs included) match
    from analysis.report import report_sections
    from analysis.tables import console_summary

    assert console_summary(sweep) == console_summary(whole / "bench-toy")
    tables = [[s.table for s in report_sections([where], n_resamples=199) if s.heading != "Runs"]
              for where in (sweep, whole / "bench-toy")]
    for mine, theirs in zip(*tables):
        if mine is not None:
            pd.testing.assert_frame_equal(mine, theirs)


def test_a_sweep_reports_in_one_command(tmp_path, capsys):
    """The sweep folder is what `make bench` hands the report."""
    from analysis.report import main as report

    assert bench(tmp_path, "system=vanilla,cloud_only", "network=lan").returncode == 0
    assert report([str(tmp_path / "bench-toy")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    page = Path(printed[-1])
    assert page.name == "report.html" and page.is_file() and page.parent == tmp_path / "bench-toy" / "report"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray resolves 127.0.0.1 to the host's outward address unless clusters are off; off, every
# process of the head, the driver and the workers talks over loopback only
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def ray_head():
    """A Ray head on loopback, in its own process group; yields its address. Afterwards that
    group is stopped (SIGTERM, then SIGKILL) and its temporary folder removed."""
    temp = tempfile.mkdtemp(prefix="specwan-ray-")  # short: Ray's unix sockets live beneath it
    port = _free_port()
    log = open(Path(temp) / "head.log", "w+")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **RAY_ENV}, cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in Path(log.name).read_text():
            assert head.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait
            while time.monotonic() < end and _group_alive(head.pid):
                time.sleep(0.2)
            if not _group_alive(head.pid):
                break
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_ray_launcher_on_a_local_head_gives_the_records_of_the_basic_one(tmp_path, ray_head):
    grid = ["system=vanilla,pipesd,cloud_only", "network=lan,slow_wan"]
    basic = bench(tmp_path / "basic", *grid)
    assert basic.returncode == 0, basic.stderr[-3000:]
    on_ray = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "experiment=bench", *SMALL, f"out={tmp_path / 'ray'}", *grid,
         "hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_head}",
         "+hydra.launcher.ray.init.object_store_memory=null"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **RAY_ENV})
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "Ray Launcher is launching 6 jobs" in on_ray.stdout + on_ray.stderr
    same_records(tmp_path / "basic" / "bench-toy", tmp_path / "ray" / "bench-toy")
