"""analysis/capacity.py: many edges sharing one cloud. Run folders written by hand with RunWriter
(times chosen so every figure is worked out here by hand): SLO attainment, goodput, throughput
and wasted drafting per run and per device, capacity, WISP's ratios beside the paper's, the
estimator's error, non-FCFS evidence and refused admissions from batches.jsonl, the figure,
and the report's "Many edges" sections with capacity.csv."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import capacity as C
from analysis import figures as F
from analysis import report as R
from analysis.load import load_runs
from analysis.metrics import SLO
from harness.edges import slo_met as harness_slo_met
from harness.results import RunWriter, build_manifest
from systems.records import BatchRecord, RequestRecord, RoundRecord

EDGE_COLUMNS = {"edge": "string", "edge_device": "string", "edge_network": "string", "n_edges": "int64",
                "arrival": "float64", "slo_ttft_s": "float64", "slo_tpot_s": "float64", "slo_met": "bool"}


def req(rid: str, edge: str, device: str, *, arrival, start: float, ttft: float, tpot: float, n: int,
        drafted: int = 0, accepted: int = 0, wasted_j: float | None = None, slo=(0.5, 0.25)) -> dict:
    """One request's record and context: tokens at start + ttft + i * tpot, so the recorded TTFT
    and TPOT are exactly ``ttft`` and ``tpot``; ``slo`` = (ttft, tpot) limits in s, or None."""
    times = [start + ttft + i * tpot for i in range(n)]
    rounds = [RoundRecord(rid, 0, start, times[-1], drafted=drafted, uploaded=drafted, verified=drafted,
                          accepted=accepted, emitted=accepted + 1, wasted=drafted - accepted)] if drafted else []
    record = RequestRecord(rid, "x", prompt_tokens=3, output_tokens=list(range(n)), start=start, end=times[-1],
                           token_times=times, rounds=rounds)
    limits = slo or (None, None)
    met = harness_slo_met(record.ttft, record.tpot, *limits)
    context = {"edge": edge, "edge_device": device, "edge_network": "lan", "arrival": arrival,
               "slo_ttft_s": limits[0], "slo_tpot_s": limits[1], "slo_met": met}
    energy = None if wasted_j is None else {"edge_j": 1.0, "cloud_j": 2.0, "kind": "estimated", "wasted_j": wasted_j}
    return {"record": record, "context": context, "energy": energy}


def write_run(run_dir: Path, system: str, n_edges: int, requests: list[dict], *, clock: str = "virtual",
              batches: list[BatchRecord] = ()) -> Path:
    """A run folder of ``system`` with ``n_edges`` edges holding ``requests`` (from :func:`req`)."""
    config = {"system": {"name": system}, "network": {"name": "lan"}, "pair": {"name": "toy"},
              "edges": {"n": n_edges}}
    with RunWriter(run_dir, build_manifest(config, {"clock": clock}), extra_context=EDGE_COLUMNS) as w:
        for r in requests:
            record = r["record"]
            record.system = system
            w.append(record, {"pair": "toy", "network": "lan", "workload": "synthetic", "prompt_id": record.request_id,
                              "seed": 0, "n_edges": n_edges, **r["context"]}, r["energy"])
        for b in batches:
            w.append_batch(b, {"system": system, "network": "lan"})
    return run_dir


def four_requests(slo=(0.5, 0.25)) -> list[dict]:
    """Two devices, four requests; r4 carries no SLO. Ends: r1 1.0, r2 2.5, r3 2.25, r4 3.0;
    the first arrival is r1's at 0.0 (it started at 0.25): makespan 3.0 s."""
    return [
        req("r1", "e0", "phone", arrival=0.0, start=0.25, ttft=0.25, tpot=0.125, n=5, drafted=8, accepted=5,
            wasted_j=0.3, slo=slo),  # met
        req("r2", "e1", "laptop", arrival=0.5, start=0.5, ttft=1.0, tpot=0.5, n=3, drafted=6, accepted=2,
            wasted_j=0.6, slo=slo),  # TTFT 1.0 > 0.5: missed
        req("r3", "e1", "laptop", arrival=1.0, start=1.0, ttft=0.25, tpot=0.125, n=9, drafted=4, accepted=4,
            wasted_j=0.0, slo=slo),  # met
        req("r4", "e0", "phone", arrival=2.0, start=2.0, ttft=0.5, tpot=0.5, n=2, drafted=2, accepted=0,
            wasted_j=0.2, slo=None),  # no SLO of its own
    ]


# ---- per run ----------------------------------------------------------------------------------------


def test_attainment_goodput_throughput_and_waste_per_run_and_per_device(tmp_path):
    requests, _ = load_runs(write_run(tmp_path / "wisp-n2", "wisp", 2, four_requests()))
    table = C.run_metrics(requests).set_index("edge_device")
    run = table.loc["all"]
    assert (run["system"], run["n_edges"], run["requests"], run["with_slo"], run["met"]) == ("wisp", 2, 4, 3, 2)
    assert run["attainment"] == pytest.approx(2 / 3)
    assert run["makespan_s"] == pytest.approx(3.0)  # from r1's arrival (0.0), not its start (0.25)
    assert run["good_tokens"] == 14 and run["goodput"] == pytest.approx(14 / 3)  # r1 + r3: 5 + 9 tokens
    assert run["throughput"] == pytest.approx(19 / 3)  # 5 + 3 + 9 + 2
    assert run["wasted_tokens_per_request"] == pytest.approx((3 + 4 + 0 + 2) / 4)
    assert run["wasted_j_per_request"] == pytest.approx((0.3 + 0.6 + 0.0 + 0.2) / 4)
    assert run["wasted_j_kind"] == "estimated" and run["clock"] == "modelled"
    # per device: its own tokens over the whole run's makespan (the devices' goodputs add up)
    phone, laptop = table.loc["phone"], table.loc["laptop"]
    assert (phone["with_slo"], phone["met"], phone["attainment"]) == (1, 1, 1.0)
    assert phone["goodput"] == pytest.approx(5 / 3) and phone["throughput"] == pytest.approx(7 / 3)
    assert phone["wasted_tokens_per_request"] == pytest.approx(2.5)
    assert laptop["attainment"] == pytest.approx(0.5)
    assert laptop["goodput"] == pytest.approx(9 / 3) and laptop["throughput"] == pytest.approx(12 / 3)
    assert laptop["wasted_tokens_per_request"] == pytest.approx(2.0)
    assert laptop["wasted_j_per_request"] == pytest.approx(0.3)
    assert phone["goodput"] + laptop["goodput"] == pytest.approx(run["goodput"])


def test_a_given_slo_judges_only_the_requests_without_their_own(tmp_path):
    requests, _ = load_runs(write_run(tmp_path / "own", "wisp", 2, four_requests()))
    # r4 (TTFT 0.5) is judged against the given SLO and misses its TTFT of 0.3 s; the others keep
    # their recorded verdicts, though r2 would meet a TTFT of 2 s
    run = C.sweep_table(requests, SLO(ttft=0.3, tpot=0.2)).iloc[0]
    assert (run["with_slo"], run["met"]) == (4, 2)
    run = C.sweep_table(requests, SLO(ttft=2.0)).iloc[0]
    assert (run["with_slo"], run["met"]) == (4, 3) and run["goodput"] == pytest.approx((5 + 9 + 2) / 3)
    # records without any SLO: judged wholly against the given one, or not at all
    bare, _ = load_runs(write_run(tmp_path / "bare", "wisp", 2, four_requests(slo=None)))
    run = C.sweep_table(bare, SLO(ttft=0.3, tpot=0.2)).iloc[0]
    assert (run["with_slo"], run["met"]) == (4, 2) and run["attainment"] == pytest.approx(0.5)
    run = C.sweep_table(bare).iloc[0]
    assert run["with_slo"] == 0 and np.isnan(run["attainment"]) and np.isnan(run["goodput"])
    assert run["throughput"] == pytest.approx(19 / 3)
    assert not C.has_many_edges(bare.assign(n_edges=1)) and C.has_many_edges(bare)


def test_a_request_with_objectives_but_no_verdict_is_judged_by_its_own_limits():
    frame = pd.DataFrame({"ttft": [0.2, 0.6, 0.2, None], "tpot": [0.1, 0.1, 0.3, None], "n_tokens": [4] * 4,
                          "slo_ttft_s": [0.5] * 4, "slo_tpot_s": [0.2] * 4, "slo_met": [None] * 4})
    assert C.request_slo_met(frame).tolist() == [True, False, False, False]


# ---- capacity and ratios -------------------------------------------------------------------------


def sweep_frame(values: dict[str, list[float]], column: str, **others) -> pd.DataFrame:
    rows = [{"system": s, "n_edges": n, column: v, **{k: o[s][n - 1] for k, o in others.items()}}
            for s, vs in values.items() for n, v in enumerate(vs, start=1)]
    return pd.DataFrame(rows)


def test_capacity_is_the_largest_n_held_at_every_smaller_n():
    table = sweep_frame({"centralized": [0.95, 0.92, 0.85, 0.95],  # N=3 misses, N=4 meets again: 2
                         "sled": [0.80, 0.95, 0.95, 0.95],  # N=1 already misses: none
                         "wisp": [1.0, 0.95, 0.90, 0.90]}, "attainment")  # 0.90 is at the threshold: 4
    caps = C.capacities(table).set_index("system")
    assert caps.loc["centralized", "capacity"] == 2 and caps.loc["centralized", "first_miss"] == 3
    assert pd.isna(caps.loc["sled", "capacity"]) and caps.loc["sled", "capacity_label"] == "none"
    assert caps.loc["wisp", "capacity"] == 4 and pd.isna(caps.loc["wisp", "first_miss"])
    # every N tested held: the capacity is at least the largest N tested
    assert caps.loc["wisp", "capacity_label"] == ">= 4" and caps.loc["centralized", "capacity_label"] == "2"
    assert caps.loc["centralized", "tested"] == "1, 2, 3, 4"
    lower = C.capacities(table, threshold=0.8).set_index("system")
    assert lower["capacity"].tolist() == [4, 4, 4]
    no_slo = C.capacities(sweep_frame({"wisp": [float("nan")] * 2}, "attainment"))
    assert no_slo["capacity_label"].tolist() == ["n/a (no SLO)"]


def test_ratios_of_goodput_and_capacity_beside_the_papers():
    table = sweep_frame({"centralized": [10, 20, 30, 40], "sled": [5, 8, 6, 4], "wisp": [12, 30, 60, 50]},
                        "goodput", attainment={"centralized": [0.95, 0.95, 0.5, 0.95], "sled": [0.5] * 4,
                                               "wisp": [1.0] * 4})
    caps = C.capacities(table)
    ratios = C.paper_ratios(table, caps, "modelled")
    got = {(r.metric, r.versus, r.basis.split(" (")[0].split(",")[0]): r for r in ratios.itertuples()}
    equal = got[("goodput", "centralized", "at N=3")]  # WISP peaks at N=3 (60 tok/s)
    assert equal.ours == pytest.approx(60 / 30) and "equal N" in equal.basis and equal.paper == 1.94
    peak = got[("goodput", "centralized", "each at its own peak")]
    assert peak.ours == pytest.approx(60 / 40) and "centralized N=4" in peak.basis
    assert got[("goodput", "sled", "at N=3")].ours == pytest.approx(60 / 6)
    assert got[("goodput", "sled", "each at its own peak")].ours == pytest.approx(60 / 8)
    assert got[("goodput", "sled", "at N=3")].paper == 3.7
    cap = got[("capacity", "centralized", "capacities: WISP >= 4")]  # WISP held at every N tested
    assert cap.ours == pytest.approx(4 / 2) and cap.paper == 2.1 and "this ratio is a bound" in cap.basis
    cap = got[("capacity", "sled", "capacities: WISP >= 4")]
    assert np.isnan(cap.ours) and "sled none" in cap.basis and cap.paper == 4.1
    assert set(ratios["ours_are"]) == {"modelled"} and len(ratios) == 6
    assert C.paper_ratios(table[table.system != "wisp"], caps, "measured").empty


# ---- the cloud's batches --------------------------------------------------------------------------


def batch(index: int, start: float, members: list[tuple[str, int, float]], *, kind: str = "verify",
          predicted: float | None = None, actual: float = 1.0, extra: dict | None = None) -> BatchRecord:
    """A batch of ``members`` (session, round, arrived)."""
    return BatchRecord(index=index, kind=kind, start=start, end=start + actual,
                       sessions=[m[0] for m in members], rounds=[m[1] for m in members],
                       new_tokens=[4] * len(members), context_tokens=[10] * len(members),
                       arrived=[m[2] for m in members], actual_s=actual, predicted_s=predicted, policy="test",
                       extra=extra or {})


def test_estimator_error_over_the_held_out_batches(tmp_path):
    batches = [batch(0, 0.0, [("e0-a", 0, 0.0)], predicted=3.0, extra={"fitted": True}),  # error 2.0
               batch(1, 1.0, [("e0-a", 1, 0.9)], predicted=5.0, extra={"fitted": True})]  # error 4.0
    for i, predicted in enumerate((1.1, 0.8, 1.3, 0.6, 1.5), start=2):  # errors 0.1 .. 0.5
        batches.append(batch(i, float(i), [("e0-a", i, i - 0.1)], predicted=predicted))
    batches.append(batch(7, 7.0, [("e0-a", 7, 6.9)], predicted=None))  # no prediction
    run = write_run(tmp_path / "wisp", "wisp", 1, [req("q", "e0", "phone", arrival=0.0, start=0.0, ttft=0.25,
                                                       tpot=0.125, n=3)], batches=batches)
    loaded = C.load_batches(tmp_path)
    assert len(loaded) == 8 and set(loaded["run"]) == {"wisp"}
    errors = C.estimator_error(loaded).iloc[0]
    assert (errors["system"], errors["count"], errors["fitted_excluded"]) == ("wisp", 5, 2)
    assert errors["median"] == pytest.approx(0.3) and errors["p90"] == pytest.approx(0.46)  # 0.4 + 0.6 * 0.1
    everything = C.estimator_error(loaded, held_out=False).iloc[0]
    assert everything["count"] == 7 and everything["median"] == pytest.approx(0.4)
    late = C.estimator_error(loaded, held_out=False, min_index=4).iloc[0]  # errors 0.3, 0.4, 0.5
    assert late["count"] == 3 and late["median"] == pytest.approx(0.4)
    assert C.load_batches(write_run(tmp_path / "none", "sled", 1, [])).empty
    assert run.exists()


def test_work_taken_ahead_of_earlier_waiting_work_is_not_fcfs():
    # e1-a reached the cloud at 0.9 and was verified in batch 0 (at 1.0) while e0-b, there since
    # 0.5, waited until batch 1
    out_of_order = pd.DataFrame([batch(0, 1.0, [("e1-a", 0, 0.9), ("e2-c", 0, 0.3)]).as_row(),
                                 batch(1, 2.0, [("e0-b", 0, 0.5)]).as_row()]).assign(system="wisp")
    pairs = C.non_fcfs_pairs(out_of_order)
    assert pairs[["batch", "later", "waiting", "waiting_batch"]].values.tolist() == [[0, "e1-a", "e0-b", 1]]
    assert pairs[["later_arrived", "waiting_arrived"]].values.tolist() == [[0.9, 0.5]]
    # first come first served: each batch takes the oldest waiting work
    fcfs = pd.DataFrame([batch(0, 1.0, [("e0-b", 0, 0.5)]).as_row(),
                         batch(1, 2.0, [("e1-a", 0, 0.9), ("e0-b", 1, 1.5)]).as_row()]).assign(system="sled")
    assert C.non_fcfs_pairs(fcfs).empty
    # continuous batching: a stream stays in every step after it was taken up, which is not waiting
    decode = pd.DataFrame([batch(0, 1.0, [("e0-a", -1, 0.2)], kind="decode").as_row(),
                           batch(1, 1.1, [("e0-a", -1, 0.2), ("e1-b", -1, 1.05)], kind="decode").as_row(),
                           batch(2, 1.2, [("e0-a", -1, 0.2), ("e1-b", -1, 1.05)], kind="decode").as_row()])
    assert C.non_fcfs_pairs(decode.assign(system="centralized")).empty
    # runs are told apart: the same batch indices in another run are not mixed in
    two = pd.concat([out_of_order.assign(run="a").iloc[[0]], out_of_order.assign(run="b").iloc[[1]]])
    assert C.non_fcfs_pairs(two).empty


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 5), st.integers(0, 3), st.integers(0, 12)),
                min_size=1, max_size=40),
       st.lists(st.integers(0, 12), min_size=8, max_size=8))
def test_the_order_summary_counts_what_the_pairs_list(members, starts):
    """The summary's counts (a Fenwick tree over arrivals) against the pairs listed one by one,
    on random batches: sessions sharing rounds and arrival times, work in several batches,
    batches starting before some of their members arrived."""
    by_batch: dict[int, list] = {}
    for b, s, r, a in members:
        by_batch.setdefault(b, []).append((f"e{s}", r, a / 4))
    rows = pd.DataFrame([batch(b, starts[b] / 4, m).as_row() for b, m in sorted(by_batch.items())])
    two_runs = pd.concat([rows.assign(run="a"), rows.iloc[::2].assign(run="b")]).assign(system="wisp")
    pairs, summary = C.non_fcfs_pairs(two_runs), C.non_fcfs_summary(two_runs)
    for run, got in summary.set_index("run").iterrows():
        listed = pairs[pairs["run"] == run]
        assert (got["pairs"], got["batches"]) == (len(listed), listed["batch"].nunique())
        if len(listed):
            assert got["example"] == listed.drop(columns=["run", "system"]).iloc[0].to_dict()
        else:
            assert got["example"] is None


def test_refused_admissions_are_listed_per_batch():
    frame = pd.DataFrame([batch(0, 0.0, [("e0-a", 0, 0.0)], extra={"refused": ["e2-c"], "order": ["e0-a"]}).as_row(),
                          batch(1, 1.0, [("e2-c", 0, 0.5)], extra={"refused": []}).as_row(),
                          batch(2, 2.0, [("e1-b", 0, 1.5)]).as_row(),
                          batch(3, 3.0, [("e1-b", 1, 2.5)], extra={"refused": ["e0-a", "e2-c"]}).as_row()])
    refused = C.refused_admissions(frame.assign(system="wisp"))
    assert refused[["system", "batch", "session"]].values.tolist() == [
        ["wisp", 0, "e2-c"], ["wisp", 3, "e0-a"], ["wisp", 3, "e2-c"]]


# ---- a sweep: figure and report ------------------------------------------------------------------

# Per system and N: which of the N edges' requests meet a TTFT of 0.5 s (met: TTFT 0.25, end 0.75;
# missed: TTFT 1.0, end 1.5; five tokens each, all arriving at 0).
MET = {"centralized": {1: 1, 2: 2, 3: 2}, "sled": {1: 0, 2: 1, 3: 1}, "wisp": {1: 1, 2: 2, 3: 3}}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("capacity") / "wisp_capacity"
    for system, by_n in MET.items():
        for n, met in by_n.items():
            rows = [req(f"q{i}", f"e{i}", ("phone", "laptop")[i % 2], arrival=0.0, start=0.0,
                        ttft=0.25 if i < met else 1.0, tpot=0.125, n=5, drafted=0 if system == "centralized" else 6,
                        accepted=0 if system == "centralized" else 4, wasted_j=0.1) for i in range(n)]
            batches = []
            if system == "wisp" and n == 3:
                batches = [batch(0, 0.1, [("e1-q1", 0, 0.05)], predicted=1.2, extra={"refused": ["e2-q2"]}),
                           batch(1, 1.2, [("e0-q0", 0, 0.02)], predicted=0.9)]  # errors 0.2, 0.1
            write_run(root / f"system={system},edges.n={n}", system, n, rows, batches=batches)
    return root


def test_figure_draws_attainment_and_goodput_against_n(sweep):
    requests, rounds = load_runs(sweep)
    fig = F.attainment_goodput_vs_edges(requests, rounds)
    left, right = fig.axes
    for system, by_n in MET.items():
        (att,) = [ln for ln in left.lines if ln.get_gid() == f"attainment:{system}"]
        assert list(att.get_xdata()) == [1, 2, 3]
        assert list(att.get_ydata()) == pytest.approx([by_n[n] / n for n in (1, 2, 3)])
        (good,) = [ln for ln in right.lines if ln.get_gid() == f"goodput:{system}"]
        makespans = [0.75 if by_n[n] == n else 1.5 for n in (1, 2, 3)]
        assert list(good.get_ydata()) == pytest.approx([5 * by_n[n] / m for n, m in zip((1, 2, 3), makespans)])
    assert fig._suptitle.get_text().endswith("modelled (virtual time)")
    assert left.get_xlabel() == "edge devices sharing the cloud, N"
    assert "share of requests" in left.get_ylabel() and "tokens/s" in right.get_ylabel()
    assert F.EDGES_FIGURES[0].check(requests, rounds) is None
    one_n = requests[requests.n_edges == 2]
    assert "one number of edges only (2)" in F.draw_figures(one_n, rounds, F.EDGES_FIGURES)[1][
        "attainment_goodput_vs_edges"]
    assert F.EDGES_FIGURES[0].name not in {s.name for s in F.FIGURES}  # drawn in the report's own section


def _section(page: str, heading: str) -> str:
    return re.search(rf"<h2>{re.escape(heading)}</h2>(.*?)(?=<h2>|</body>)", page, re.S).group(1)


def test_report_adds_the_many_edges_sections_and_capacity_csv(sweep, tmp_path, capsys):
    assert R.main([str(sweep), "--out", str(tmp_path / "r")]) == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text()
    main = _section(page, R.EDGES_HEADING)
    assert "centralized 2 (first miss at N=3); sled none; wisp &gt;= 3." in main
    assert '<figure id="attainment_goodput_vs_edges">' in main and "Times modelled" in main
    rows = {tuple(re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", r))[:2]:
            [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", r)]
            for r in re.findall(r"<tr>(.*?)</tr>", main)[1:]}
    assert rows[("centralized", "3")][5] == "67%" and rows[("wisp", "3")][6] == R.fmt(20.0)
    csv = pd.read_csv(tmp_path / "r" / "capacity.csv")
    assert len(csv) == 9 and set(csv.columns) >= {"system", "n_edges", "attainment", "goodput", "throughput",
                                                  "wasted_tokens_per_request", "wasted_j_per_request", "capacity"}
    point = csv.set_index(["system", "n_edges"])
    assert point.loc[("centralized", 3), "goodput"] == pytest.approx(10 / 1.5)
    assert point.loc[("sled", 2), "attainment"] == pytest.approx(0.5)
    assert point.loc[("sled", 2), "wasted_tokens_per_request"] == pytest.approx(2.0)
    assert point.loc[("wisp", 1), "wasted_j_per_request"] == pytest.approx(0.1)
    assert csv.groupby("system")["capacity"].first().to_dict() == {"centralized": "2", "sled": "none", "wisp": ">= 3"}
    # WISP peaks at N=3 (20 tok/s): 3x centralized (6.67) and 6x SLED (3.33) there; capacity 3 / 2
    ratios = _section(page, "Many edges: WISP beside the paper")
    assert re.search(r"<td>WISP / centralized goodput</td><td>3x modelled</td><td>at N=3 \(WISP&#x27;s "
                     r"goodput peak\), both at equal N</td><td>1\.94x \[P\]</td>", ratios)
    assert re.search(r"<td>WISP / sled goodput</td><td>6x modelled</td>", ratios)
    assert re.search(r"<td>WISP / centralized capacity</td><td>1\.5x modelled</td>.*?<td>2\.1x \[P\]</td>", ratios)
    assert re.search(r"<td>WISP / sled capacity</td><td>n/a \(modelled\)</td>.*?<td>4\.1x \[P\]</td>", ratios)
    assert "Qwen3-32B on an A100 80 GB" in ratios
    # two device profiles: a per-device table; the batches: estimator error, order, refusals
    assert "<h2>Many edges: per edge device</h2>" in page
    batches = _section(page, "Many edges: the cloud&#x27;s batches")
    assert "<td>wisp</td><td>2</td><td>15%</td>" in batches  # errors 0.1, 0.2: median 15%
    assert "wisp: 2 batch(es); 1 batch(es) took work ahead of earlier-arrived work still waiting" in batches
    assert "the estimator refused 1 admission(s) in 1 batch(es) (e.g. e2-q2 in batch 0)" in batches
    # the threshold is an option: at 0.6, centralized's 2 of 3 at N=3 holds
    assert R.main([str(sweep), "--out", str(tmp_path / "r6"), "--capacity-attainment", "0.6"]) == 0
    csv = pd.read_csv(tmp_path / "r6" / "capacity.csv")
    assert csv.groupby("system")["capacity"].first().to_dict() == {"centralized": ">= 3", "sled": "none", "wisp": ">= 3"}
    assert R.main([str(sweep), "--capacity-attainment", "1.5"]) == 2


def test_report_without_many_edges_has_no_such_section(tmp_path):
    run = write_run(tmp_path / "one", "vanilla", 1, four_requests(slo=None))
    page = R.build_report(run, tmp_path / "out", n_resamples=99).read_text()
    assert "Many edges" not in page and not (tmp_path / "out" / "capacity.csv").exists()


def test_wall_clock_numbers_are_called_measured(tmp_path):
    requests, _ = load_runs(write_run(tmp_path / "wall", "wisp", 2, four_requests(), clock="wall"))
    assert C.clock_kind(requests) == "measured" and C.sweep_table(requests)["clock"].tolist() == ["measured"]
    assert C.clock_kind(requests.drop(columns="clock"), {"wall": {"clock": "wall"}}) == "measured"
    assert C.clock_kind(requests.drop(columns="clock"), {"v": {"clock": "virtual"}}) == "modelled"
    fig = F.attainment_goodput_vs_edges(pd.concat([requests, requests.assign(n_edges=3)]), None)
    assert fig._suptitle.get_text().endswith("measured (wall clock)")
