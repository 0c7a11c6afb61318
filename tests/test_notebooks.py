"""analysis/notebooks: the percent scripts render to valid notebooks (CLI included), and each
notebook, executed in a real kernel (nbclient + ipykernel) over real toy-pair runs in virtual
time, runs to the end and prints figures that match what the analysis modules give."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import notebooks as N
from analysis.decision import decision_table
from analysis.figures import speedup_table
from analysis.load import load_runs
from tests.analysis_runs import toy_run, toy_sweep

REPO = Path(__file__).resolve().parent.parent
SWEEP_SYSTEMS = ("cloud_only", "vanilla", "pipesd")
SWEEP_NETWORKS = ("lan", "4g")
GRID_SYSTEMS = ("cloud_only", "vanilla")
GRID_RTT_MS = (5, 80)
GRID_UP_MBPS = (1, 50)
RUN_SIZE = 3  # prompts per run


# ---- runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """Three systems on two networks (two RTTs), the toy pair in virtual time."""
    return toy_sweep(tmp_path_factory.mktemp("nb") / "sweep", SWEEP_SYSTEMS, SWEEP_NETWORKS, size=RUN_SIZE)


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory) -> Path:
    """Two systems at 2 RTTs x 2 uplink rates: the lan profile with its RTT and uplink overridden."""
    root = tmp_path_factory.mktemp("nb") / "grid"
    for system in GRID_SYSTEMS:
        for rtt in GRID_RTT_MS:
            for up in GRID_UP_MBPS:
                toy_run(root / f"{system}-rtt{rtt}-up{up}", system, "lan", size=RUN_SIZE,
                        **{"network.rtt_ms": rtt, "network.up_mbps": up})
    return root


# ---- executing a notebook -------------------------------------------------------------------------

PID_CELL = "import os as _os; print('kernel-pid:', _os.getpid())"


def _inject(nb, parameters: dict) -> None:
    """Papermill's way: a cell tagged injected-parameters right after the one tagged parameters."""
    import nbformat

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    """``run(name, env_runs=None, parameters=None)``: the notebook executed in a fresh kernel (cwd
    ``tmp_path``; IPython's and Jupyter's files there too), returned with the result it printed.
    Afterwards the kernel process is gone and its connection file removed."""
    import psutil
    from nbclient import NotebookClient

    runtime = tmp_path / "jupyter-runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.delenv(N.RUNS_ENV, raising=False)
    pids = []

    def run(name: str, env_runs: str | None = None, parameters: dict | None = None):
        if env_runs is not None:
            monkeypatch.setenv(N.RUNS_ENV, env_runs)
        nb = N.to_notebook(name)
        if parameters:
            _inject(nb, parameters)
        nb.cells.insert(0, __import__("nbformat").v4.new_code_cell(PID_CELL))
        client = NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        try:
            client.execute()
        finally:
            pid_out = [o for o in nb.cells[0].get("outputs", []) if o.get("name") == "stdout"]
            found = [int(m) for o in pid_out for m in re.findall(r"kernel-pid: (\d+)", o["text"])]
            assert len(found) == 1, "the kernel did not report its pid"
            pids.extend(found)
        return nb, N.read_result(nb)

    yield run
    for pid in pids:  # nbclient shut the kernel down: nothing of it is left running
        try:
            proc = psutil.Process(pid)
            assert proc.status() == psutil.STATUS_ZOMBIE, f"kernel {pid} still running"
        except psutil.NoSuchProcess:
            pass
    assert not runtime.exists() or not [p for p in runtime.iterdir() if p.name.startswith("kernel-")]


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells for o in c.get("outputs", []) if kind in o.get("data", {})]


# ---- the notebooks, executed ----------------------------------------------------------------------


@pytest.mark.slow
def test_walkthrough_runs_and_recomputes_the_recorded_figures(sweep_dir, run_notebook):
    run_dir = sweep_dir / "pipesd-4g"
    nb, result = run_notebook("walkthrough", env_runs=str(run_dir))
    requests, rounds = load_runs(run_dir)
    assert result["run"] == "pipesd-4g" and result["n_requests"] == len(requests) == RUN_SIZE
    assert result["mean_tpot"] == pytest.approx(requests["tpot"].mean(), rel=1e-12)
    assert result["mean_ttft"] == pytest.approx(requests["ttft"].mean(), rel=1e-12)
    assert result["pooled_acceptance"] == pytest.approx(rounds["accepted"].sum() / rounds["verified"].sum())
    mine = rounds[rounds["request_id"] == result["timeline_request"]]
    assert result["timeline_rounds"] == len(mine) > 0
    assert len(_outputs(nb, "image/png")) == 1  # the round timeline
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.slow
def test_sweep_runs_and_its_speedups_are_the_paired_ratios(sweep_dir, run_notebook):
    nb, result = run_notebook("sweep", env_runs=str(sweep_dir), parameters={"n_resamples": 999})
    requests, _ = load_runs(sweep_dir)
    table = speedup_table(requests, n_resamples=999)
    expected = {f"{r.candidate}@{r.network}": r.estimate for r in table.itertuples()}
    assert result["baseline"] == "cloud_only" and result["runs"] == len(SWEEP_SYSTEMS) * len(SWEEP_NETWORKS)
    assert set(result["speedups"]) == {f"{s}@{n}" for s in ("pipesd", "vanilla") for n in SWEEP_NETWORKS}
    assert result["speedups"] == pytest.approx(expected, rel=1e-12)
    assert result["figure"] == "speedup_vs_rtt" and result["figure_lines"] == ["pipesd", "vanilla"]
    assert len(_outputs(nb, "image/png")) == 1
    tables = "".join(o["data"]["text/html"] for o in _outputs(nb, "text/html"))
    assert "TPOT, ms" in tables and "modelled" in tables  # the summary table with its provenance


@pytest.mark.slow
def test_decision_map_runs_over_rtt_by_bandwidth(grid_dir, run_notebook):
    nb, result = run_notebook("decision_map", env_runs=str(grid_dir), parameters={"n_resamples": 199})
    requests, rounds = load_runs(grid_dir)
    table = decision_table(requests, rounds, "latency", n_resamples=0)
    assert result["objective"] == "latency"
    assert result["points"] == len(table) == len(GRID_RTT_MS) * len(GRID_UP_MBPS) == result["cells"]
    got = {k: (v["best"], v["runner_up"], v["margin"]) for k, v in result["decisions"].items()}
    want = {f"{r['config.network.rtt_ms']:g} ms / {r['config.network.up_mbps']:g} Mbit/s":
            (r["best"], r["runner_up"], pytest.approx(r["margin"], rel=1e-12)) for r in table.to_dict("records")}
    assert got == want
    assert len(_outputs(nb, "image/png")) == 1


@pytest.mark.slow
def test_parameters_cell_takes_injected_values_over_the_environment(grid_dir, run_notebook, tmp_path):
    (tmp_path / "empty").mkdir()
    _, result = run_notebook("decision_map", env_runs=str(tmp_path / "empty"),  # would fail: not a run
                             parameters={"runs": [str(grid_dir)], "objective": "cloud_time", "n_resamples": 0})
    requests, rounds = load_runs(grid_dir)
    table = decision_table(requests, rounds, "cloud_time", n_resamples=0)
    assert result["objective"] == "cloud_time"
    assert {v["best"] for v in result["decisions"].values()} == set(table["best"])


@pytest.mark.slow
def test_a_notebook_without_runs_stops_with_the_clear_message(run_notebook):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError) as info:
        run_notebook("sweep")
    assert "NotebookParameterError" in str(info.value) and "SPECWAN_RUNS" in str(info.value)


# ---- rendering and the helpers (no kernel) ----------------------------------------------------------


def test_render_cli_writes_a_valid_unexecuted_notebook_each(tmp_path):
    import nbformat

    out = subprocess.run([sys.executable, "-m", "analysis.notebooks", "render", "--out", str(tmp_path / "nb")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    paths = [Path(p) for p in out.stdout.split()]
    assert paths == [tmp_path / "nb" / f"{n}.ipynb" for n in N.NOTEBOOKS]
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert not any(c.get("outputs") for c in code)
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and re.search(r"^runs = None", tagged[0].source, re.M)
        assert "report_result(" in code[-1].source  # it ends by printing its checked figures
        assert nb.cells[0].cell_type == "markdown"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nb"]  # nothing else written


def test_render_cli_refuses_an_unknown_notebook(tmp_path):
    out = subprocess.run([sys.executable, "-m", "analysis.notebooks", "render", "nope", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown notebook(s) nope" in out.stderr and "walkthrough" in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", N.NOTEBOOKS)
def test_scripts_round_trip_through_jupytext_unchanged(name):
    import jupytext

    text = N.script_path(name).read_text()
    again = jupytext.writes(N.to_notebook(name), fmt="py:percent")
    # jupytext stamps its own version into the header; the cells come back exactly as written
    again = re.sub(r"^#       (format_version|jupytext_version): .*\n", "", again, flags=re.M)
    assert again == text


def test_resolve_runs_takes_the_parameter_then_the_environment(monkeypatch):
    monkeypatch.setenv(N.RUNS_ENV, os.pathsep.join(["a/run", "b/sweep", ""]))
    assert N.resolve_runs(None) == ["a/run", "b/sweep"]
    assert N.resolve_runs([]) == ["a/run", "b/sweep"]
    assert N.resolve_runs("c/run") == ["c/run"]
    assert N.resolve_runs([Path("c"), "d"]) == ["c", "d"]
    monkeypatch.delenv(N.RUNS_ENV)
    with pytest.raises(N.NotebookParameterError, match=r"set `runs` in the notebook's parameters cell.*SPECWAN_RUNS"):
        N.resolve_runs(None)


def test_read_result_finds_the_last_result_line(capsys):
    import nbformat

    N.report_result({"x": 1.5})
    printed = capsys.readouterr().out
    assert printed == N.RESULT_PREFIX + json.dumps({"x": 1.5}) + "\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="noise\n" + printed),
        nbformat.v4.new_output("stream", name="stdout", text=N.RESULT_PREFIX + '{"x": 2}\n')])])
    assert N.read_result(nb) == {"x": 2}
    with pytest.raises(LookupError):
        N.read_result(nbformat.v4.new_notebook())
