"""analysis/tables.py: the console tables of run folders, checked against values computed by hand
from small synthetic runs whose times, tokens, rounds, bytes and energy are chosen here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis import report as R
from analysis import tables as T
from analysis.load import load_runs
from harness.results import RunWriter, build_manifest
from systems.records import RequestRecord, RoundRecord

CATEGORY = {"q0": "code", "q1": "math"}
NO_ENERGY = "not measured: no energy meter or model for this run"


def rec(rid: str, system: str, tokens: int, e2e: float, *, rounds=(), up: int = 0, down: int = 0,
        energy: dict | None = None) -> RequestRecord:
    """A request of ``tokens`` tokens over ``e2e`` seconds; ``rounds``: (drafted, verified, accepted) each."""
    times = [e2e * (i + 1) / tokens for i in range(tokens)]
    rounds = [RoundRecord(request_id=rid, round=i, start=0.0, end=e2e, drafted=d, verified=v, accepted=a)
              for i, (d, v, a) in enumerate(rounds)]
    return RequestRecord(request_id=rid, system=system, prompt_tokens=3, output_tokens=list(range(tokens)),
                         start=0.0, end=e2e, token_times=times, rounds=rounds, bytes_up=up, bytes_down=down,
                         energy=energy)


def write(run_dir: Path, system: str, network: str, records, *, clock: str = "virtual") -> Path:
    """One run folder of ``system`` on ``network`` holding ``records`` (categories from CATEGORY)."""
    config = {"system": {"name": system}, "network": {"name": network}, "pair": {"name": "toy"}}
    with RunWriter(run_dir, build_manifest(config, {"clock": clock})) as w:
        for r in records:
            w.append(r, {"pair": "toy", "network": network, "workload": "synthetic", "prompt_id": r.request_id,
                         "seed": 0, "category": CATEGORY.get(r.request_id)})
    return run_dir


def estimated(edge: float, cloud: float) -> dict:
    return {"edge_j": edge, "cloud_j": cloud, "kind": "estimated"}


def measured(edge: float, cloud: float) -> dict:
    return {"edge_j": edge, "cloud_j": cloud, "kind": "measured"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """cloud_only and vanilla on lan and wan, pipesd alone on slow (no baseline there).

    Folders are read in path order: cloud_only-lan, cloud_only-wan, pipesd-slow, vanilla-lan, vanilla-wan.
    """
    root = tmp_path_factory.mktemp("tables")
    write(root / "cloud_only-lan", "cloud_only", "lan", [
        rec("q0", "cloud_only", 10, 0.5, up=100, down=200, energy=estimated(2.0, 6.0)),
        rec("q1", "cloud_only", 10, 0.3, up=300, down=200, energy=estimated(2.0, 4.0))])
    write(root / "cloud_only-wan", "cloud_only", "wan", [
        rec("q0", "cloud_only", 10, 1.0), rec("q1", "cloud_only", 10, 1.0)])
    write(root / "vanilla-lan", "vanilla", "lan", [
        rec("q0", "vanilla", 8, 0.1, rounds=[(5, 4, 3), (5, 5, 5)], up=50, down=30, energy=measured(5.0, 2.0)),
        rec("q1", "vanilla", 12, 0.3, rounds=[(6, 3, 1)], up=70, down=10, energy=measured(3.0, 2.0))])
    write(root / "vanilla-wan", "vanilla", "wan", [
        rec("q0", "vanilla", 8, 0.5, rounds=[(4, 3, 2)]), rec("q1", "vanilla", 12, 0.3, rounds=[(6, 3, 1)])])
    write(root / "pipesd-slow", "pipesd", "slow", [rec("q0", "pipesd", 4, 0.2, rounds=[(4, 0, 0)])])
    return root


@pytest.fixture(scope="module")
def frames(sweep):
    return load_runs(sweep)


@pytest.fixture(scope="module")
def by_network(frames) -> pd.DataFrame:
    return T.summary_by_network(*frames).set_index(["system", "network"])


@pytest.fixture(scope="module")
def by_category(frames) -> pd.DataFrame:
    return T.summary_by_category(*frames).set_index(["category", "system"])


# ---- per system and network -------------------------------------------------------------------------


def test_rows_in_first_appearance_order_with_bench_columns(frames):
    table = T.summary_by_network(*frames)
    assert list(zip(table["system"], table["network"])) == [
        ("cloud_only", "lan"), ("cloud_only", "wan"), ("pipesd", "slow"), ("vanilla", "lan"), ("vanilla", "wan")]
    assert list(table.columns) == [
        "system", "network", "tokens", "ms_per_token", "speedup_vs_cloud_only", "acceptance", "bytes_up_per_token",
        "bytes_down_per_token", "edge_J_per_token_estimated", "edge_J_per_token_measured",
        "cloud_J_per_token_estimated", "cloud_J_per_token_measured"]


def test_ms_per_token_pools_seconds_over_tokens(by_network):
    assert by_network.loc[("cloud_only", "lan"), "tokens"] == 20
    assert by_network.loc[("vanilla", "lan"), "tokens"] == 20
    # 1000 x (0.5 + 0.3) / 20, not the mean of per-request ratios (50 and 30 ms -> 40 as well; wan differs)
    assert by_network.loc[("cloud_only", "lan"), "ms_per_token"] == pytest.approx(40.0)
    assert by_network.loc[("vanilla", "lan"), "ms_per_token"] == pytest.approx(20.0)
    # (0.5 + 0.3) / 20 = 40 ms pooled; the mean of 62.5 and 25 ms would be 43.75
    assert by_network.loc[("vanilla", "wan"), "ms_per_token"] == pytest.approx(40.0)
    assert by_network.loc[("pipesd", "slow"), "ms_per_token"] == pytest.approx(50.0)


def test_speedup_is_cloud_only_over_the_system_on_the_same_network(by_network):
    assert by_network.loc[("vanilla", "lan"), "speedup_vs_cloud_only"] == pytest.approx(40.0 / 20.0)
    assert by_network.loc[("vanilla", "wan"), "speedup_vs_cloud_only"] == pytest.approx(100.0 / 40.0)
    assert by_network.loc[("cloud_only", "wan"), "speedup_vs_cloud_only"] == pytest.approx(1.0)
    assert pd.isna(by_network.loc[("pipesd", "slow"), "speedup_vs_cloud_only"])  # no cloud_only on slow


def test_acceptance_is_accepted_over_verified_not_drafted(by_network):
    assert by_network.loc[("vanilla", "lan"), "acceptance"] == pytest.approx((3 + 5 + 1) / (4 + 5 + 3))  # not 9/16
    assert by_network.loc[("vanilla", "wan"), "acceptance"] == pytest.approx((2 + 1) / (3 + 3))  # not 3/10
    assert pd.isna(by_network.loc[("pipesd", "slow"), "acceptance"])  # 4 drafted, none verified
    assert pd.isna(by_network.loc[("cloud_only", "lan"), "acceptance"])  # no rounds at all


def test_bytes_per_token_each_way(by_network):
    assert by_network.loc[("cloud_only", "lan"), "bytes_up_per_token"] == pytest.approx(400 / 20)
    assert by_network.loc[("cloud_only", "lan"), "bytes_down_per_token"] == pytest.approx(400 / 20)
    assert by_network.loc[("vanilla", "lan"), "bytes_up_per_token"] == pytest.approx(120 / 20)
    assert by_network.loc[("vanilla", "lan"), "bytes_down_per_token"] == pytest.approx(40 / 20)
    assert by_network.loc[("vanilla", "wan"), "bytes_up_per_token"] == 0


def test_energy_per_token_in_one_column_per_role_and_kind(by_network):
    cloud_lan, vanilla_lan = by_network.loc[("cloud_only", "lan")], by_network.loc[("vanilla", "lan")]
    assert cloud_lan["edge_J_per_token_estimated"] == pytest.approx(4.0 / 20)
    assert cloud_lan["cloud_J_per_token_estimated"] == pytest.approx(10.0 / 20)
    assert vanilla_lan["edge_J_per_token_measured"] == pytest.approx(8.0 / 20)
    assert vanilla_lan["cloud_J_per_token_measured"] == pytest.approx(4.0 / 20)
    # measured and estimated never share a column
    assert pd.isna(cloud_lan["edge_J_per_token_measured"]) and pd.isna(vanilla_lan["edge_J_per_token_estimated"])
    assert by_network.loc[("vanilla", "wan"), ["edge_J_per_token_measured", "edge_J_per_token_estimated",
                                               "cloud_J_per_token_measured",
                                               "cloud_J_per_token_estimated"]].isna().all()


def test_energy_of_mixed_kinds_is_not_added_and_no_energy_gets_a_plain_column(tmp_path):
    write(tmp_path / "mixed", "vanilla", "lan", [rec("q0", "vanilla", 4, 0.1, energy=measured(1.0, 1.0)),
                                                 rec("q1", "vanilla", 4, 0.1, energy=estimated(1.0, 1.0))])
    write(tmp_path / "none", "cloud_only", "lan", [rec("q0", "cloud_only", 4, 0.1)])
    table = T.summary_by_network(*load_runs(tmp_path))
    assert list(table.columns[-2:]) == ["edge_J_per_token", "cloud_J_per_token"]
    assert table[["edge_J_per_token", "cloud_J_per_token"]].isna().all().all()
    notes = table.attrs[T.PROVENANCE]
    assert ("edge J/token n/a where: edge figures of different kinds (estimated, measured) are not added; "
            f"{NO_ENERGY}") in notes


def test_provenance_notes_name_the_energy_kinds_and_why_a_figure_is_missing(frames):
    notes = T.summary_by_network(*frames).attrs[T.PROVENANCE]
    assert notes[0] == ("times: modelled (virtual clock: device profiles + link model); tokens and acceptance: "
                        "measured with pair toy; bytes: real message encodings")
    assert any(n.startswith("edge energy: estimated = ") and "not measured" in n for n in notes)
    assert any(n.startswith("cloud energy: measured = ") for n in notes)
    assert f"edge J/token n/a where: {NO_ENERGY}" in notes


# ---- per category ----------------------------------------------------------------------------------------


def test_category_table_columns_rows_and_requests(frames):
    table = T.summary_by_category(*frames)
    assert list(table.columns) == ["category", "system", "requests", "acceptance", "speedup@lan", "speedup@wan",
                                   "speedup@slow"]
    # cloud_only is the baseline and has no row
    assert list(zip(table["category"], table["system"])) == [("code", "pipesd"), ("code", "vanilla"),
                                                             ("math", "vanilla")]
    assert table["requests"].tolist() == [1, 1, 1]


def test_category_acceptance_is_pooled_over_the_networks(by_category):
    # code: q0 on lan (3+5 of 4+5 verified) and on wan (2 of 3); drafted would give 10/14
    assert by_category.loc[("code", "vanilla"), "acceptance"] == pytest.approx((8 + 2) / (9 + 3))
    assert by_category.loc[("math", "vanilla"), "acceptance"] == pytest.approx((1 + 1) / (3 + 3))
    assert pd.isna(by_category.loc[("code", "pipesd"), "acceptance"])


def test_category_speedup_per_network_against_cloud_only_in_the_same_category(by_category):
    code, math_ = by_category.loc[("code", "vanilla")], by_category.loc[("math", "vanilla")]
    assert code["speedup@lan"] == pytest.approx((1e3 * 0.5 / 10) / (1e3 * 0.1 / 8))  # 50 / 12.5
    assert code["speedup@wan"] == pytest.approx(100.0 / 62.5)
    assert math_["speedup@lan"] == pytest.approx(30.0 / 25.0)
    assert math_["speedup@wan"] == pytest.approx(100.0 / 25.0)
    assert code[["speedup@slow"]].isna().all()  # vanilla did not run on slow
    assert by_category.loc[("code", "pipesd"), ["speedup@lan", "speedup@wan", "speedup@slow"]].isna().all()


def test_category_table_leaves_out_requests_without_a_category(tmp_path):
    write(tmp_path / "a", "vanilla", "lan", [rec("other", "vanilla", 4, 0.1, rounds=[(2, 2, 1)])])
    table = T.summary_by_category(*load_runs(tmp_path))
    assert table.empty and list(table.columns) == ["category", "system", "requests", "acceptance"]


# ---- text ----------------------------------------------------------------------------------------------


def test_format_table_right_aligns_two_decimals_and_na():
    df = pd.DataFrame({"system": ["a", "bb"], "x": [1.234, None], "n": [3, 40]})
    df.attrs[T.PROVENANCE] = ["times: modelled"]
    assert T.format_table(df, ["a note"]) == "\n".join([
        "system     x   n",
        "     a  1.23   3",
        "    bb   n/a  40",
        "times: modelled",
        "a note"])


def test_format_table_calls_wall_clock_times_measured(tmp_path, frames):
    write(tmp_path / "w", "vanilla", "lan", [rec("q0", "vanilla", 4, 0.1)], clock="wall")
    text = T.format_table(T.summary_by_network(*load_runs(tmp_path)))
    assert "times: measured (wall clock)" in text and "modelled" not in text
    assert "times: modelled (virtual clock" in T.format_table(T.summary_by_network(*frames))


def test_console_summary_renders_both_tables(sweep):
    lines = T.console_summary(sweep).splitlines()
    header = lines[1].split()
    assert header[:6] == ["system", "network", "tokens", "ms_per_token", "speedup_vs_cloud_only", "acceptance"]
    vanilla_lan = next(ln.split() for ln in lines if ln.split()[:2] == ["vanilla", "lan"])
    assert vanilla_lan[2:8] == ["20", "20.00", "2.00", "0.75", "6.00", "2.00"]
    assert vanilla_lan[8:] == ["n/a", "0.40", "n/a", "0.20"]
    pipesd = next(ln.split() for ln in lines if ln.split()[:2] == ["pipesd", "slow"])
    assert pipesd[4:6] == ["n/a", "n/a"]
    at = lines.index(next(ln for ln in lines if ln.startswith("per category (workload synthetic;")))
    assert lines[at + 1].split() == ["category", "system", "requests", "acceptance", "speedup@lan", "speedup@wan",
                                     "speedup@slow"]
    assert lines[at + 3].split() == ["code", "vanilla", "1", "0.83", "4.00", "1.60", "n/a"]


# ---- the report's CLI and files -----------------------------------------------------------------------------


def test_report_cli_prints_the_tables_then_the_path_last(sweep, tmp_path, capsys):
    runs = [str(sweep / "cloud_only-lan"), str(sweep / "vanilla-lan")]
    assert R.main([*runs, "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert Path(lines[-1]) == tmp_path / "report.html" and Path(lines[-1]).is_file()
    assert lines[:-1] == T.console_summary(runs).splitlines()
    assert any(ln.split()[:5] == ["vanilla", "lan", "20", "20.00", "2.00"] for ln in lines)
    # the report folder holds both tables as CSV
    summary = pd.read_csv(tmp_path / T.SUMMARY_CSV)
    assert summary[["system", "network"]].values.tolist() == [["cloud_only", "lan"], ["vanilla", "lan"]]
    assert summary["ms_per_token"].tolist() == pytest.approx([40.0, 20.0])
    assert summary["acceptance"].iloc[1] == pytest.approx(0.75) and pd.isna(summary["acceptance"].iloc[0])
    categories = pd.read_csv(tmp_path / T.CATEGORY_CSV)
    assert categories[["category", "system"]].values.tolist() == [["code", "vanilla"], ["math", "vanilla"]]
    assert categories["speedup@lan"].tolist() == pytest.approx([4.0, 1.2])
