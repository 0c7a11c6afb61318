"""analysis/bounds.py: each system's measured speedup beside its analytical model, checked against
values worked out by hand from small synthetic run folders (and load_runs-shaped frames)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import bounds as B
from analysis import figures as F
from analysis.load import load_runs
from systems.records import RequestRecord, RoundRecord
from tests.test_analysis_figures import write_run

# Four rounds per (system, network): three judged 4 draft tokens each, the last drafted 3 and was
# discarded (verified 0) after going over the link, as PipeSD's invalidated windows are.
#   (drafted, verified, accepted, t_draft, (t_uplink, t_queue, t_verify, t_downlink))
ROUNDS = {
    "lan": [(4, 4, 3, 0.04, (0.005, 0.001, 0.010, 0.004)),   # link+verify 0.020
            (5, 4, 1, 0.05, (0.010, 0.002, 0.012, 0.006)),   # 0.030
            (6, 4, 2, 0.06, (0.015, 0.003, 0.014, 0.008)),   # 0.040
            (3, 0, 0, 0.03, (0.100, 0.000, 0.000, 0.100))],  # discarded: not a round of the model
    "4g": [(4, 4, 3, 0.04, (0.030, 0.001, 0.010, 0.019)),    # 0.060
           (5, 4, 1, 0.05, (0.040, 0.002, 0.012, 0.026)),    # 0.080
           (6, 4, 2, 0.06, (0.050, 0.003, 0.014, 0.033)),    # 0.100
           (3, 0, 0, 0.03, (0.100, 0.000, 0.000, 0.100))],
}
# By hand, on both networks:
#   alpha = (3+1+2) / (4+4+4) = 6/12 = 0.5   (over drafted it would be 6/18 = 1/3)
#   n     = mean(4, 4, 4) = 4                  (the discarded round verified nothing)
#   t_d   = (0.04+0.05+0.06+0.03) / 18 = 0.18/18 = 0.01 s per drafted token  (0.015 over verified)
#   E[L]  = (1 - 0.5^5) / (1 - 0.5) = (31/32) / (1/2) = 31/16 = 1.9375 tokens per round
#   n*t_d = 0.04 s
# lan: T_link+verify = mean(0.020, 0.030, 0.040) = 0.030 s
#   stop-and-wait: 1.9375 / (0.04 + 0.03) = 27.678571... tok/s; pipelined: 1.9375 / max(0.04, 0.03) = 48.4375
# 4g:  T_link+verify = mean(0.060, 0.080, 0.100) = 0.080 s
#   stop-and-wait: 1.9375 / (0.04 + 0.08) = 16.145833... tok/s; pipelined: 1.9375 / max(0.04, 0.08) = 24.21875
E_L = 31 / 16
MODEL = {("vanilla", "lan"): E_L / 0.07, ("vanilla", "4g"): E_L / 0.12,
         ("pipesd", "lan"): E_L / 0.04, ("pipesd", "4g"): E_L / 0.08}

# (n_tokens, e2e) per request, the tokens evenly spread (TTFT = e2e / n), so the decode rate after
# the first token, sum (n - 1) / sum (e2e - TTFT), equals sum n / sum e2e where a group's n agree:
#   cloud_only: lan 20/2.0 = 10 tok/s, 4g 20/5.0 = 4 tok/s (the baseline)
#   vanilla:    lan 12/0.8 = 15 (the mean of per-request rates would be 16), 4g 12/1.6 = 7.5
#   pipesd:     lan 12/0.6 = 20, 4g 12/1.2 = 10
REQUESTS = {
    "cloud_only": {"lan": [(10, 1.0), (10, 1.0)], "4g": [(10, 2.5), (10, 2.5)]},
    "vanilla": {"lan": [(6, 0.3), (6, 0.5)], "4g": [(6, 0.6), (6, 1.0)]},
    "pipesd": {"lan": [(6, 0.2), (6, 0.4)], "4g": [(6, 0.5), (6, 0.7)]},
}
MEASURED = {("vanilla", "lan"): 15.0, ("vanilla", "4g"): 7.5, ("pipesd", "lan"): 20.0, ("pipesd", "4g"): 10.0}
BASELINE = {"lan": 10.0, "4g": 4.0}
# So the speedups over cloud_only, measured / model:
#   vanilla lan 15/10 = 1.5   / 27.678571/10 = 2.7678571    vanilla 4g 7.5/4 = 1.875 / 16.145833/4 = 4.0364583
#   pipesd  lan 20/10 = 2.0   / 48.4375/10   = 4.84375      pipesd  4g 10/4  = 2.5   / 24.21875/4  = 6.0546875


def _request(prompt: str, system: str, n_tokens: int, e2e: float, rounds=(), error=None) -> RequestRecord:
    times = list(np.linspace(e2e / n_tokens, e2e, n_tokens))
    return RequestRecord(request_id=prompt, system=system, prompt_tokens=3, output_tokens=list(range(n_tokens)),
                         start=0.0, end=e2e, token_times=times, rounds=list(rounds), error=error)


def _rounds(prompt: str, spec) -> list[RoundRecord]:
    out = []
    for i, (drafted, verified, accepted, t_draft, (up, queue, verify, down)) in enumerate(spec):
        out.append(RoundRecord(prompt, i, 0.0, 0.0, drafted=drafted, uploaded=drafted, verified=verified,
                               accepted=accepted, emitted=accepted + (verified > 0), wasted=drafted - accepted,
                               t_draft=t_draft, t_uplink=up, t_queue=queue, t_verify=verify, t_downlink=down))
    return out


def _cloud_rounds(prompt: str, n: int) -> list[RoundRecord]:
    return [RoundRecord(prompt, i, 0.0, 0.0, emitted=1, t_verify=0.015, t_downlink=0.001) for i in range(n)]


def _write_sweep(root) -> None:
    for system, by_net in REQUESTS.items():
        for net, reqs in by_net.items():
            recs = []
            for i, (tokens, e2e) in enumerate(reqs):
                prompt = f"q{i}"
                if system == "cloud_only":
                    rounds = _cloud_rounds(prompt, tokens)
                else:  # q0 holds the first two rounds, q1 the other two
                    rounds = _rounds(prompt, ROUNDS[net][2 * i:2 * i + 2])
                recs.append(_request(prompt, system, tokens, e2e, rounds))
            if (system, net) == ("vanilla", "lan"):  # a failed request: not part of the throughput
                recs.append(_request("q9", system, 50, 0.1, error="engine died"))
            write_run(root / f"{system}-{net}", system, net, recs)
    # edge_only: no rounds at all; adaptive: verified drafts, but no model for it
    write_run(root / "edge_only-lan", "edge_only", "lan", [_request("q0", "edge_only", 10, 0.5)])
    write_run(root / "adaptive-lan", "adaptive", "lan",
              [_request("q0", "adaptive", 6, 0.3, _rounds("q0", ROUNDS["lan"][:3]))])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(requests, rounds) of the synthetic sweep above."""
    root = tmp_path_factory.mktemp("bounds")
    _write_sweep(root)
    return load_runs(root)


# ---- the model --------------------------------------------------------------------------------------


def test_expected_tokens_per_round_by_hand():
    assert B.expected_tokens_per_round(0.5, 4) == pytest.approx(31 / 16)
    assert B.expected_tokens_per_round(0.0, 4) == pytest.approx(1.0)  # the verifier's token only
    assert B.expected_tokens_per_round(1.0, 3) == 4.0  # every draft accepted, plus the bonus token
    assert B.expected_tokens_per_round(1 - 1e-9, 3) == pytest.approx(4.0, rel=1e-6)  # continuous at 1
    assert math.isnan(B.expected_tokens_per_round(math.nan, 3))


@pytest.mark.parametrize("network,link", [("lan", 0.030), ("4g", 0.080)])
def test_round_model_inputs_are_estimated_from_the_rounds(sweep, network, link):
    _, rounds = sweep
    for system in ("vanilla", "pipesd"):
        mine = rounds[(rounds.system == system) & (rounds.network == network)]
        got = B.round_model_inputs(mine)
        assert set(got) == {"alpha", "n", "t_d", "t_link_verify"}
        assert got["alpha"] == pytest.approx(0.5)  # accepted over verified, not drafted (1/3)
        assert got["n"] == pytest.approx(4.0)  # the discarded round is not a round of 0 tokens (3)
        assert got["t_d"] == pytest.approx(0.01)  # per drafted token (0.015 per verified one)
        assert got["t_link_verify"] == pytest.approx(link)  # the discarded round's link time left out


def test_round_model_inputs_are_nan_where_undefined(sweep):
    _, rounds = sweep
    got = B.round_model_inputs(rounds[rounds.system == "cloud_only"])  # drafts nothing, verifies nothing
    assert all(math.isnan(v) for v in got.values())
    # a round with no phase recorded is left out of T_link+verify, a null phase counts zero
    frame = pd.DataFrame({"drafted": [2, 2], "verified": [2, 2], "accepted": [1, 1], "t_draft": [0.02, 0.02],
                          "t_uplink": [0.01, np.nan], "t_queue": [np.nan, np.nan], "t_verify": [0.02, np.nan],
                          "t_downlink": [0.01, np.nan]})
    assert B.round_model_inputs(frame)["t_link_verify"] == pytest.approx(0.04)


def test_both_models_by_hand():
    lan = {"alpha": 0.5, "n": 4.0, "t_d": 0.01, "t_link_verify": 0.03}
    assert B.model_throughput(lan, B.STOP_AND_WAIT) == pytest.approx(1.9375 / 0.07)  # 27.678571
    assert B.model_throughput(lan, B.PIPELINED) == pytest.approx(1.9375 / 0.04)  # 48.4375: drafting dominates
    wan = {**lan, "t_link_verify": 0.08}
    assert B.model_throughput(wan, B.STOP_AND_WAIT) == pytest.approx(1.9375 / 0.12)  # 16.145833
    assert B.model_throughput(wan, B.PIPELINED) == pytest.approx(1.9375 / 0.08)  # 24.21875: the link dominates
    assert math.isnan(B.model_throughput({**lan, "t_d": math.nan}, B.PIPELINED))
    with pytest.raises(ValueError, match="no model 'batched'"):
        B.model_throughput(lan, "batched")


def test_alpha_one_edge_case():
    # every draft accepted: E[L] = n + 1 = 4; n*t_d = 3 * 0.01 = 0.03, T_link+verify = 0.05
    #   stop-and-wait (hsl): 4 / 0.08 = 50 tok/s; pipelined (picospec): 4 / max(0.03, 0.05) = 80 tok/s
    rounds = pd.DataFrame({"system": ["hsl", "hsl", "picospec", "picospec"], "network": ["lan"] * 4,
                           "drafted": [3] * 4, "verified": [3] * 4, "accepted": [3] * 4, "t_draft": [0.03] * 4,
                           "t_uplink": [0.02] * 4, "t_queue": [0.0] * 4, "t_verify": [0.02] * 4,
                           "t_downlink": [0.01] * 4})
    requests = pd.DataFrame({"system": ["cloud_only", "hsl", "picospec"], "network": ["lan"] * 3,
                             "n_tokens": [10, 8, 9], "e2e": [1.0, 0.4, 0.3], "ttft": [0.1, 0.05, 0.3 / 9],
                             "clock": ["wall"] * 3})
    inputs = B.round_model_inputs(rounds[rounds.system == "hsl"])
    assert inputs == pytest.approx({"alpha": 1.0, "n": 3.0, "t_d": 0.01, "t_link_verify": 0.05})
    table = B.bounds_table(requests, rounds).set_index("system")
    assert table.loc["hsl", "model"] == B.STOP_AND_WAIT and table.loc["picospec", "model"] == B.PIPELINED
    assert table["expected_tokens"].tolist() == pytest.approx([4.0, 4.0])
    assert table.loc["hsl", "model_throughput"] == pytest.approx(50.0)
    assert table.loc["picospec", "model_throughput"] == pytest.approx(80.0)
    # after the first token: baseline 9/0.9 = 10 tok/s; hsl 7/0.35 = 20, picospec 8/(0.3 - 0.3/9) = 30
    assert table.loc["hsl", "measured_speedup"] == pytest.approx(2.0)
    assert table.loc["hsl", "model_speedup"] == pytest.approx(5.0)
    assert table.loc["picospec", "model_over_measured"] == pytest.approx(80 / 30)
    assert set(table["provenance"]) == {"measured"}  # wall clock


# ---- the table --------------------------------------------------------------------------------------


def test_bounds_table_by_hand(sweep):
    requests, rounds = sweep
    table = B.bounds_table(requests, rounds)
    assert list(table.columns) == B.BOUNDS_COLUMNS
    got = table.set_index(["system", "network"])
    assert set(got.index) == set(MODEL)  # cloud_only, edge_only (no drafts) and adaptive (no model) absent
    for (system, network), model in MODEL.items():
        row = got.loc[(system, network)]
        base = BASELINE[network]
        assert row["model"] == B.MODEL_KINDS[system]
        assert row["alpha"] == pytest.approx(0.5) and row["n"] == pytest.approx(4.0)
        assert row["expected_tokens"] == pytest.approx(E_L)
        assert row["rounds"] == 3
        assert row["measured_throughput"] == pytest.approx(MEASURED[(system, network)])  # the failed request left out
        assert row["model_throughput"] == pytest.approx(model)
        assert row["baseline"] == "cloud_only" and row["baseline_throughput"] == pytest.approx(base)
        assert row["measured_speedup"] == pytest.approx(MEASURED[(system, network)] / base)
        assert row["model_speedup"] == pytest.approx(model / base)
        assert row["model_over_measured"] == pytest.approx(model / MEASURED[(system, network)])
        assert row["provenance"] == "modelled"  # virtual clock
    assert got.loc[("pipesd", "4g"), "model_speedup"] == pytest.approx(6.0546875)
    assert got.loc[("vanilla", "lan"), "model_speedup"] == pytest.approx(2.7678571, rel=1e-6)
    assert B.unmodelled_systems(requests, rounds, "cloud_only") == {
        "adaptive": "no analytical model for it", "edge_only": "no round verified a draft token"}


def test_bounds_table_baseline_is_configurable_and_required(sweep):
    requests, rounds = sweep
    got = B.bounds_table(requests, rounds, baseline="vanilla").set_index(["system", "network"])
    assert got.loc[("vanilla", "lan"), "measured_speedup"] == pytest.approx(1.0)
    assert got.loc[("pipesd", "lan"), "measured_speedup"] == pytest.approx(20 / 15)
    assert got.loc[("pipesd", "4g"), "model_speedup"] == pytest.approx(24.21875 / 7.5)
    with pytest.raises(ValueError, match="no baseline system 'hsl'"):
        B.bounds_table(requests, rounds, baseline="hsl")


# ---- the figure and the registry --------------------------------------------------------------------


def test_figure_pairs_measured_and_model_bars_per_network(sweep):
    requests, rounds = sweep
    fig = B.measured_vs_bound(requests, rounds)
    ax = fig.axes[0]
    patches = {p.get_gid(): p for c in ax.containers for p in c.patches}
    assert len(patches) == 2 * len(MODEL)  # one measured and one model bar per (system, network)
    for (system, network), model in MODEL.items():
        measured, modelled = patches[f"measured:{system}:{network}"], patches[f"model:{system}:{network}"]
        assert measured.get_height() == pytest.approx(MEASURED[(system, network)] / BASELINE[network])
        assert modelled.get_height() == pytest.approx(model / BASELINE[network])
        assert modelled.get_hatch() == B.MODEL_HATCH and not measured.get_hatch()
        assert modelled.get_x() == pytest.approx(measured.get_x() + measured.get_width())  # side by side
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lan", "4g"]  # by RTT, not by name
    assert "cloud_only" in ax.get_ylabel() and "modelled" in ax.get_title()
    caption = F.figure_caption(fig)
    for text in ("E[L] = (1 − α^(n+1)) / (1 − α)", "E[L] / (n·t_d + T_link+verify)",
                 "E[L] / max(n·t_d, T_link+verify)", "estimated from the same run's rounds",
                 "α = Σ accepted / Σ verified", "Times are modelled",
                 "Left out: adaptive (no analytical model for it); edge_only (no round verified a draft token)"):
        assert text in caption, text


def test_registry_draws_the_figure_or_says_why_not(sweep):
    requests, rounds = sweep
    (spec,) = [s for s in F.FIGURES if s.name == "measured_vs_bound"]
    assert spec.check(requests, rounds) is None
    drawn, left_out = F.draw_figures(requests, rounds, [spec])
    assert set(drawn) == {"measured_vs_bound"} and not left_out
    no_baseline = requests[~requests.system.isin(["cloud_only", "vanilla"])]
    assert spec.check(no_baseline, rounds) == "no baseline system (cloud_only or vanilla) in the rows"
    _, left_out = F.draw_figures(no_baseline, rounds, [spec])
    assert left_out["measured_vs_bound"].startswith("no baseline system (cloud_only or vanilla)")
    assert spec.check(requests, rounds[rounds.system == "cloud_only"]) == \
        "no round verified a draft token (no speculative system)"
    assert "no analytical model" in spec.check(requests, rounds[rounds.system.isin(["cloud_only", "adaptive"])])
    assert spec.check(requests, rounds.iloc[0:0]) == "no round records"
    lan_base = requests[(requests.system != "cloud_only") | (requests.network == "lan")]
    four_g = rounds[rounds.network == "4g"]
    assert "ran on none of the networks" in spec.check(lan_base, four_g)


def test_measured_throughput_is_the_decode_rate_after_the_first_token():
    """A slow first token (the prefills, the first verdict) is outside the models' steady state:
    5 tokens, the first at 1.0 s, then one every 0.1 s to 1.4 s: 4 tokens in 0.4 s = 10 tok/s
    (not 5 / 1.4); a one-token request has no decode and is left out."""
    from analysis.bounds import measured_throughputs

    requests = pd.DataFrame({"system": ["vanilla"] * 3, "network": ["lan"] * 3, "n_tokens": [5, 5, 1],
                             "e2e": [1.4, 0.6, 3.0], "ttft": [1.0, 0.2, 3.0], "error": [None] * 3})
    # (4 + 4) tokens over (0.4 + 0.4) s
    assert measured_throughputs(requests) == {("vanilla", "lan"): pytest.approx(10.0)}
