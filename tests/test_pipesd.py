"""PipeSD: the DP's golden cases and optimality, and its signatures in a real run's rounds.parquet."""

from __future__ import annotations

import itertools
import json
import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from harness.results import RunWriter, build_manifest, load_run
from systems.api import GenerationRequest
from systems.engines import create_engine
from systems.pipesd.estimator import EnvironmentMonitor, moved
from systems.pipesd.plan import makespan, plan_batches
from systems.pipesd.tuner import GRID, ThresholdTuner, tune
from systems.sampling import SamplingParams
from tests.support import greedy_decode


# ---- the DP ------------------------------------------------------------------------------
@pytest.mark.parametrize("n_hat,gamma,alpha,beta,sizes,finish", [
    # the example: a float DP returns [1,1,5,13]; the paper's rule returns [1,1,4,14]
    (20, 0.036, 0.025, 0.116, (1, 1, 4, 14), 2.456),
    (20, 0.036, 0.05, 0.029, (1, 2, 3, 4, 5, 5), 0.93),
    (14, 0.036, 0.025, 0.116, (1, 3, 10), 1.735),
])
def test_plan_golden(n_hat, gamma, alpha, beta, sizes, finish):
    plan = plan_batches(n_hat, gamma, alpha, beta)
    assert plan.sizes == sizes
    assert plan.makespan_s == pytest.approx(finish, abs=1e-9)
    assert makespan(sizes, gamma, alpha, beta) == pytest.approx(finish, abs=1e-9)


def _compositions(n):
    for cuts in itertools.product((False, True), repeat=n - 1):
        sizes, run = [], 1
        for cut in cuts:
            if cut:
                sizes.append(run)
                run = 1
            else:
                run += 1
        yield sizes + [run]


@settings(max_examples=60, deadline=None)
@given(n_hat=st.integers(1, 10), gamma=st.integers(0, 200), alpha=st.integers(0, 200), beta=st.integers(0, 200))
def test_plan_is_optimal_and_beats_every_fixed_size(n_hat, gamma, alpha, beta):
    g, a, b = gamma / 1000, alpha / 1000, beta / 1000
    plan = plan_batches(n_hat, g, a, b)
    assert sum(plan.sizes) == n_hat
    best = min(makespan(s, g, a, b) for s in _compositions(n_hat))
    assert plan.makespan_s == pytest.approx(best, abs=1e-9)
    for size in range(1, n_hat + 1):
        fixed = [size] * (n_hat // size) + ([n_hat % size] if n_hat % size else [])
        assert plan.makespan_s <= makespan(fixed, g, a, b) + 1e-9


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="N̂ must be >= 1"):
        plan_batches(0, 0.036, 0.025, 0.116)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        plan_batches(5, 0.036, 0.025, -1.0)


def test_replan_gate():
    """The DP re-runs when γ, α or β moves by more than 20% or N̂ changes, not otherwise."""
    m = EnvironmentMonitor(0.025, 0.116, 0.036, 20)
    base = m.estimate()
    for n in range(1, 9):
        m.add_upload(n, 0.020 + 0.050 * n)
    fitted = m.estimate()
    assert fitted.alpha == pytest.approx(0.020) and fitted.beta == pytest.approx(0.050)
    assert moved(base, fitted, 0.2) == ["alpha", "beta"]
    small = EnvironmentMonitor(0.025, 0.116, 0.036, 20)
    for n in range(1, 9):
        small.add_upload(n, 1.1 * (0.020 + 0.050 * n))  # a 10% slower link
    assert moved(fitted, small.estimate(), 0.2) == []
    assert moved(fitted, EnvironmentMonitor(0.020, 0.050, 0.036, 21).estimate(), 0.2) == ["n_hat"]


# ---- the tuner -----------------------------------------------------------------------------
def test_tuner_methods():
    def tpt(r1, r2):
        return 0.1 + (r1 - 0.7) ** 2 + (r2 - 0.3) ** 2

    grid = tune(tpt, "grid")
    assert sorted((a, b) for a, b, _ in grid.trials) == sorted(itertools.product(GRID, GRID))
    bo = tune(tpt, "bo", seed=1)
    rnd = tune(tpt, "random", seed=1)
    assert len(bo.trials) == len(rnd.trials) == 16
    assert all(0 < a < 1 and 0 < b < 1 for a, b, _ in bo.trials + rnd.trials)
    print(f"\ntuner on a bowl with minimum 0.1 at (0.7, 0.3): bo {bo.tpt:.4f} at ({bo.r1:.2f}, {bo.r2:.2f}), "
          f"grid {grid.tpt:.4f}, random {rnd.tpt:.4f}")
    assert bo.tpt <= grid.tpt  # the GP homes in; the grid cannot reach (0.7, 0.3)
    tuner = ThresholdTuner("bo")
    tuner.ask()
    with pytest.raises(RuntimeError, match="tell"):
        tuner.ask()
    with pytest.raises(ValueError, match="valid: bo, grid, random"):
        ThresholdTuner("anneal")


# ---- signatures in a run ---------------------------------------------------------------------
VOCAB = 512
# Uplink at 0.2 Mbit/s carries one fp16 row of 512 entries (~1 kB) in ~41 ms: the link costs
# about as much per token as drafting one (36 ms), PipeSD's regime.
LINK = LinkProfile("slow-up", rtt_s=0.02, up_bps=2e5, down_bps=2e7, overhead_bytes=66)
R1, R2 = 0.05, 0.1


@pytest.fixture(scope="module")
def pipesd_run(tmp_path_factory):
    kw = dict(vocab_size=VOCAB, seed=1, sharpness=6.0)
    draft = create_engine("toy", role="draft", agreement=0.9, **kw)
    target = create_engine("toy", role="target", **kw)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 80, SamplingParams(), seed=i) for i in range(6)]
    recs = run_system("pipesd", draft, target, reqs, {"r1": R1, "r2": R2},
                      RunOptions(link=LINK, edge_cost=lambda op: 0.036, cloud_cost=lambda op: 0.015 + 0.002 * op.tokens))
    for req, rec in zip(reqs, recs):
        assert rec.output_tokens == greedy_decode(target, req.prompt, 80)[0]
    run_dir = tmp_path_factory.mktemp("pipesd") / "run"
    with RunWriter(run_dir, build_manifest({"system": "pipesd"}, {"clock": "virtual"})) as w:
        for req, rec in zip(reqs, recs):
            w.append(rec, {"system": "pipesd", "prompt_id": req.request_id})
    _, _, rounds = load_run(run_dir)
    rounds["extra"] = rounds["extra"].map(json.loads)
    return rounds


def _live(rounds):
    return [r for r in rounds.to_dict("records") if not r["extra"].get("discarded")]


def test_windows_go_up_in_planned_batches(pipesd_run):
    multi = 0
    for r in _live(pipesd_run):
        batches = r["extra"].get("batches")
        if not batches or "restarted_from" in r["extra"]:
            continue
        for size, cap in batches[:-1]:
            assert size == cap, f"window {r['round']}: a batch of {size} where the plan said {cap}"
        assert 0 <= batches[-1][0] <= batches[-1][1], "the flush at the trigger exceeds the plan's batch"
        lead = int(r["extra"].get("lead_implied", False))  # a first token sent as an id, outside the plan
        assert sum(s for s, _ in batches) + lead == r["uploaded"]
        if len(batches) > 1:
            multi += 1
            assert r["extra"]["upload_sizes"] == [s + (lead if i == 0 else 0) for i, (s, _) in enumerate(batches)]
    assert multi >= 5, f"only {multi} windows went up in several batches"


def test_uploads_overlap_drafting(pipesd_run):
    """The first batch of a window leaves before the window's last token is drafted."""
    overlapped = [r for r in _live(pipesd_run) if "t_first_upload" in r["extra"]
                  and r["extra"]["t_first_upload"] < r["extra"]["t_last_draft"]]
    assert len(overlapped) >= 5


def test_trigger_points(pipesd_run):
    """Every window closed at the first point where C <= R1 or P <= R2 (or a stop / the limit)."""
    checked = 0
    for r in pipesd_run.to_dict("records"):
        trig = r["extra"].get("trigger")
        if not trig:
            continue
        conf = trig["confidences"]
        for k in range(1, len(conf)):  # no earlier point met either threshold
            assert math.prod(conf[:k]) > R1 and conf[k - 1] > R2, f"window {r['round']} should have closed at {k}"
        fired = bool(conf) and (math.prod(conf) <= R1 or conf[-1] <= R2)  # none: a lead token at the limit
        assert fired == (trig["reason"] in ("r1", "r2")), trig
        if not r["extra"].get("discarded") and "restarted_from" not in r["extra"]:
            # The trigger counts exactly the drafts the cloud verifies: not a first token sent
            # as an id only (the previous verdict settled it).
            assert len(conf) == r["verified"], (r["round"], len(conf), r["verified"])
        checked += fired
    assert checked >= 10


def test_proactive_tokens_kept_only_under_the_rule(pipesd_run):
    kept = dropped = 0
    for r in _live(pipesd_run):
        pro = r["extra"].get("proactive")
        if pro is None:
            continue
        rule = r["accepted"] == r["verified"] and pro["first"] == pro["verdict_token"]
        assert pro["kept"] == rule
        kept += rule
        dropped += not rule
    assert kept > 0 and dropped > 0, f"promoted {kept}, discarded {dropped}: both paths must run"


@pytest.mark.parametrize("factor,replans", [(2.0, True), (1.1, False)])
def test_plan_follows_a_bandwidth_step_over_20_percent_only(tmp_path, factor, replans):
    """The uplink's rate steps at 15 s; α/β are re-estimated from the uploads, and the plan is
    re-made for β only when the step moves it by more than 20%."""
    from netem.profile import RateStep, Trace

    step_at = 15.0
    trace = Trace((RateStep(0.0, 2e5, 2e7), RateStep(step_at, 2e5 * factor, 2e7)))
    link = LinkProfile("step", rtt_s=0.02, overhead_bytes=66, trace=trace)
    kw = dict(vocab_size=VOCAB, seed=1, sharpness=6.0)
    draft = create_engine("toy", role="draft", agreement=0.9, **kw)
    target = create_engine("toy", role="target", **kw)
    req = GenerationRequest("long", [1, 2, 3], 500, SamplingParams(), seed=0)
    (rec,) = run_system("pipesd", draft, target, [req], {"r1": R1, "r2": R2},
                        RunOptions(link=link, edge_cost=lambda op: 0.036, cloud_cost=lambda op: 0.015))
    assert rec.e2e > 2 * step_at, "the run must last well past the step"
    run_dir = tmp_path / "run"
    with RunWriter(run_dir, build_manifest({"system": "pipesd"}, {"clock": "virtual"})) as w:
        w.append(rec, {"system": "pipesd", "prompt_id": "long"})
    _, _, rounds = load_run(run_dir)
    events = [e for x in rounds["extra"].map(json.loads) for e in x.get("replans", [])]
    link_replans_after = [e for e in events if e["t"] > step_at and {"alpha", "beta"} & set(e["why"])]
    print(f"\nuplink x{factor} at {step_at:.0f} s: re-plans for the link after the step: "
          f"{[(round(e['t'], 1), e['why'], e['plan']) for e in link_replans_after]}")
    assert bool(link_replans_after) == replans


def test_online_tuning_picks_candidates_off_the_event_loop(monkeypatch):
    """With tuner=online the GP's picks run in a background thread, never on the edge's
    event loop, and each pick becomes the trigger's thresholds from the next verdict on."""
    asks = []
    real_ask = ThresholdTuner.ask

    def ask(self):
        r1, r2 = real_ask(self)
        if self.budget == params["tuner_trials"]:  # not the sampler's warm-up study
            asks.append((threading.current_thread().name, r1, r2))
        return r1, r2

    params = {"tuner": "online", "tuner_trials": 5, "tuner_tokens": 8}
    monkeypatch.setattr(ThresholdTuner, "ask", ask)
    kw = dict(vocab_size=VOCAB, seed=1, sharpness=6.0)
    draft = create_engine("toy", role="draft", agreement=0.9, **kw)
    target = create_engine("toy", role="target", **kw)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 80, SamplingParams(), seed=i) for i in range(4)]
    recs = run_system("pipesd", draft, target, reqs, params,
                      RunOptions(link=LINK, edge_cost=lambda op: 0.036, cloud_cost=lambda op: 0.015))
    for req, rec in zip(reqs, recs):
        assert rec.output_tokens == greedy_decode(target, req.prompt, 80)[0]
    live = [(a[1], a[2]) for a in asks if not a[0].startswith("pipesd-tuner")]
    picked = [(a[1], a[2]) for a in asks if a[0].startswith("pipesd-tuner")]
    assert len(live) == 1, f"only a round's first, random point is asked on the loop: {asks}"
    assert len(picked) >= 4, f"the tuner made {len(picked)} background picks; the run should finish the round"
    used = {(t["r1"], t["r2"]) for rec in recs for r in rec.rounds if (t := r.extra.get("trigger"))}
    assert set(picked) <= used, "a candidate picked in the background was never used by the trigger"
