"""PipeSD: the DP's golden cases and optimality, and its signatures in a real run's rounds.parquet."""

from __future__ import annotations

import itertools
import json
import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from harness.results import RunWriter, build_manifest, load_run
from systems.api import GenerationRequest, SystemSpec
from systems.engines import create_engine
from systems.pipesd.estimator import CostEstimate, EnvironmentMonitor, moved
from systems.pipesd.policy import PipeSDCloud, PipeSDConfig, PipeSDEdge
from systems.pipesd.plan import makespan, plan_batches
from systems.pipesd.tuner import GRID, ThresholdTuner, tune
from systems.protocol import SpeculativeEdge
from systems.sampling import SamplingParams
from tests.support import greedy_decode, shared_scope


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
    assert plan.makespan_s == pytest.approx(finish, abs=1e-12)  # whole nanoseconds
    assert makespan(sizes, gamma, alpha, beta) == pytest.approx(finish, abs=1e-12)


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


def _simulated_finish_ms(sizes, gamma, alpha, beta) -> int:
    """The test's own model of one window, in whole milliseconds: token i is drafted at
    i*gamma; a batch leaves once its last token is drafted and the link is free, and holds
    the link for alpha + beta*size. Returns when the last batch has arrived."""
    link_free, drafted = 0, 0
    for size in sizes:
        drafted += size
        leaves = max(link_free, drafted * gamma)
        link_free = leaves + alpha + beta * size
    return link_free


@settings(max_examples=60, deadline=None)
@given(n_hat=st.integers(1, 10), gamma=st.integers(0, 200), alpha=st.integers(0, 200), beta=st.integers(0, 200))
def test_plan_is_optimal_and_beats_every_fixed_size(n_hat, gamma, alpha, beta):
    """Against every way of cutting the window into batches (exhaustive, simulated by the
    test's own model), the plan's batches finish first, and its stated makespan is theirs."""
    plan = plan_batches(n_hat, gamma / 1000, alpha / 1000, beta / 1000)
    assert sum(plan.sizes) == n_hat and all(s >= 1 for s in plan.sizes)
    finish = _simulated_finish_ms(plan.sizes, gamma, alpha, beta)
    assert plan.makespan_s == pytest.approx(finish / 1000, abs=1e-9)
    assert finish == min(_simulated_finish_ms(s, gamma, alpha, beta) for s in _compositions(n_hat))
    for size in range(1, n_hat + 1):
        fixed = [size] * (n_hat // size) + ([n_hat % size] if n_hat % size else [])
        assert finish <= _simulated_finish_ms(fixed, gamma, alpha, beta)


def test_makespan_when_drafting_is_free():
    """γ = 0: every token is ready at once, so the batches only queue on the link."""
    assert makespan((2, 3), 0.0, 0.01, 0.002) == pytest.approx(0.01 + 0.004 + 0.01 + 0.006, abs=1e-12)
    assert plan_batches(5, 0.0, 0.01, 0.002).sizes == (5,)


def test_plan_is_used_cyclically():
    """A window that outgrows its plan starts the plan over (the batch after the last one
    planned has the first one's size)."""
    plan = plan_batches(20, 0.036, 0.025, 0.116)
    assert plan.sizes == (1, 1, 4, 14)
    assert [plan.size_at(k) for k in range(10)] == [1, 1, 4, 14, 1, 1, 4, 14, 1, 1]


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="N̂ must be >= 1"):
        plan_batches(0, 0.036, 0.025, 0.116)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        plan_batches(5, 0.036, 0.025, -1.0)
    for i, name in enumerate(("gamma", "alpha", "beta")):
        costs = [0.036, 0.025, 0.116]
        costs[i] = -0.001
        for fn, args in ((plan_batches, (5, *costs)), (makespan, ((1, 4), *costs))):
            with pytest.raises(ValueError) as err:
                fn(*args)
            assert str(err.value) == f"plan: {name} must be >= 0 seconds, got -0.001"


def test_replan_gate():
    """The DP re-runs when γ, α or β moves by more than 20% or N̂ changes, not otherwise."""
    m = EnvironmentMonitor(0.025, 0.116, 0.036, 20, 100, 8)
    base = m.estimate()
    for n in range(1, 9):
        m.add_upload(n, 0.020 + 0.050 * n)
    fitted = m.estimate()
    assert fitted.alpha == pytest.approx(0.020) and fitted.beta == pytest.approx(0.050)
    assert moved(base, fitted, 0.2) == ["alpha", "beta"]
    small = EnvironmentMonitor(0.025, 0.116, 0.036, 20, 100, 8)
    for n in range(1, 9):
        small.add_upload(n, 1.1 * (0.020 + 0.050 * n))  # a 10% slower link
    assert moved(fitted, small.estimate(), 0.2) == []
    assert moved(fitted, EnvironmentMonitor(0.020, 0.050, 0.036, 21, 100, 8).estimate(), 0.2) == ["n_hat"]


def test_probe_sizes_until_enough_distinct_sizes_are_seen():
    """Probing stops once min_sizes distinct batch sizes went up, whichever they were; until
    then it asks for the sizes 1..min_sizes not yet seen. Only the last ``history`` uploads count."""
    m = EnvironmentMonitor(0.025, 0.116, 0.036, 20, 100, 8)
    assert m.missing_probe_sizes() == list(range(1, 9))
    for n in (1, 2, 3, 4, 5, 6, 7):
        m.add_upload(n, 0.1)
    assert m.missing_probe_sizes() == [8]
    m.add_upload(12, 0.1)  # an eighth distinct size, outside 1..8: enough
    assert m.missing_probe_sizes() == []
    short = EnvironmentMonitor(0.025, 0.116, 0.036, 20, 3, 2)
    for n in (1, 2, 3, 3):
        short.add_upload(n, 0.1)
    assert short.sizes_seen() == {2, 3}


def test_estimates_are_means_over_the_last_history_samples():
    """γ is the mean of the last ``history`` generation times, N̂ the rounded mean of the last
    ``history`` window sizes (at least 1), α and β the line through the per-size means of the
    last ``history`` uploads; the initial values stand until samples arrive."""
    m = EnvironmentMonitor(0.025, 0.116, 0.036, 20, 3, 2)
    assert m.estimate() == CostEstimate(0.025, 0.116, 0.036, 20)
    for t in (1.0, 0.030, 0.040, 0.050):  # the first falls out of a 3-sample history
        m.add_generation(t)
    for n in (100, 4, 5, 7):
        m.add_window(n)
    for n, t in ((9, 5.0), (1, 0.3), (2, 0.5), (2, 0.7)):  # (9, 5.0) falls out
        m.add_upload(n, t)
    e = m.estimate()
    assert e.gamma == pytest.approx(0.040) and e.n_hat == 5  # round(16 / 3)
    assert (e.alpha, e.beta) == (pytest.approx(0.0), pytest.approx(0.3))  # through (1, 0.3) and (2, 0.6)
    tiny = EnvironmentMonitor(0.025, 0.116, 0.036, 20, 3, 2)
    tiny.add_window(0)
    assert tiny.estimate().n_hat == 1


def test_plan_with_free_drafting_starts_from_time_zero():
    """With γ = 0 the first batch can leave at once: the plan's makespan is exactly the
    simulated one (the DP starts from f(0) = 0, to the nanosecond)."""
    for n_hat in (1, 3, 6):
        plan = plan_batches(n_hat, 0.0, 0.010, 0.002)
        assert plan.makespan_s == makespan(plan.sizes, 0.0, 0.010, 0.002)
        assert plan.sizes == (n_hat,)  # nothing to overlap: one batch saves every α but one


def test_replan_gate_is_strictly_more_than_the_gate():
    """A parameter that moves by exactly the gate keeps the plan; a hair more re-plans."""
    old = CostEstimate(1.0, 1.0, 1.0, 4)
    assert moved(old, CostEstimate(1.25, 1.0, 1.0, 4), 0.25) == []
    assert moved(old, CostEstimate(1.25 + 2 ** -40, 1.0, 0.75 - 2 ** -40, 4), 0.25) == ["alpha", "gamma"]


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
    tuner = ThresholdTuner("bo", 16, 0)
    tuner.ask()
    with pytest.raises(RuntimeError, match="tell"):
        tuner.ask()
    with pytest.raises(ValueError, match="valid: bo, grid, random"):
        ThresholdTuner("anneal", 16, 0)


def test_tune_is_seeded_and_reports_each_trial():
    def tpt(r1, r2):
        return 0.1 + (r1 - 0.7) ** 2 + (r2 - 0.3) ** 2

    seen = []
    a = tune(tpt, "random", trials=5, seed=3, progress=lambda *x: seen.append(x))
    assert tune(tpt, "random", trials=5, seed=3).trials == a.trials  # the same seed, the same candidates
    assert tune(tpt, "random", trials=5).trials == tune(tpt, "random", trials=5, seed=0).trials != a.trials
    assert seen == [(k + 1, r1, r2, t) for k, (r1, r2, t) in enumerate(a.trials)]
    assert a.tpt == min(t for *_, t in a.trials)
    assert tune(tpt, trials=3).trials == tune(tpt, "bo", trials=3, seed=0).trials  # BO by default


# ---- signatures in a run ---------------------------------------------------------------------
VOCAB = 512
# Uplink at 0.2 Mbit/s carries one fp16 row of 512 entries (~1 kB) in ~41 ms: the link costs
# about as much per token as drafting one (36 ms), PipeSD's regime.
LINK = LinkProfile("slow-up", rtt_s=0.02, up_bps=2e5, down_bps=2e7, overhead_bytes=66)
R1, R2 = 0.05, 0.1
FAR = LinkProfile("far", rtt_s=0.5, up_bps=2e6, down_bps=2e7, overhead_bytes=66)  # verdicts stay pending


TARGET = create_engine("toy", role="target", vocab_size=VOCAB, seed=1, sharpness=6.0)


@pytest.fixture(scope=shared_scope)
def pipesd_run(tmp_path_factory):
    kw = dict(vocab_size=VOCAB, seed=1, sharpness=6.0)
    draft = create_engine("toy", role="draft", agreement=0.9, **kw)
    target = TARGET
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
    """The uploads the edge really sent (sizes booked by the protocol) follow the plan the
    window started with, used cyclically, the last one a flush at the trigger of at most
    the plan's next size. Windows whose plan changed while they were open are skipped."""
    multi = outgrown = 0
    for r in _live(pipesd_run):
        x = r["extra"]
        if "upload_sizes" not in x or "restarted_from" in x or "plan" not in x:
            continue
        if any(e["t"] > r["start"] for e in x.get("replans", [])):
            continue
        plan = x["plan"]
        lead = int(x.get("lead_implied", False))  # a first token sent as an id, outside the plan
        sizes = list(x["upload_sizes"])
        sizes[0] -= lead
        multi += 1
        outgrown += len(sizes) > len(plan)
        for k, size in enumerate(sizes[:-1]):
            assert size == plan[k % len(plan)], f"window {r['round']}: sent {sizes} under the plan {plan}"
        assert 0 <= sizes[-1] <= plan[(len(sizes) - 1) % len(plan)], f"window {r['round']}: {sizes} vs {plan}"
        assert sum(sizes) + lead == r["uploaded"]
        # the policy's own note: each batch's size as sent and the plan's size at that point
        assert x["batches"] == [[size, plan[k % len(plan)]] for k, size in enumerate(sizes)], r["round"]
    assert multi >= 5, f"only {multi} windows went up in several batches"
    assert outgrown >= 1, "no window outgrew its plan: the cyclic use went untested"


def test_uploads_overlap_drafting(pipesd_run):
    """The first batch of a window leaves before the window's last token is drafted."""
    overlapped = [r for r in _live(pipesd_run) if "t_first_upload" in r["extra"]
                  and r["extra"]["t_first_upload"] < r["extra"]["t_last_draft"]]
    assert len(overlapped) >= 5


def _check_triggers(rounds: list[dict], r1: float, r2: float, lead_row: bool = False) -> int:
    """Every window closed at the first point where C <= r1 or P <= r2 (or a stop / the
    limit), counting only the drafts the cloud verifies (with ``lead_row`` also a first token
    that a pending verdict settled); returns how many closed on a threshold. ``rounds``:
    (round, verified, extra) dicts."""
    checked = 0
    for r in rounds:
        trig = r["extra"].get("trigger")
        if not trig:
            continue
        conf = trig["confidences"]
        assert (trig["r1"], trig["r2"]) == (r1, r2)
        if conf:
            assert trig["product"] == pytest.approx(math.prod(conf))
            assert trig["p"] == conf[-1]  # the token that closed it is the window's last
            if trig["reason"] == "r2":
                assert trig["p"] <= r2
        for k in range(1, len(conf)):  # no earlier point met either threshold
            assert math.prod(conf[:k]) > r1 and conf[k - 1] > r2, f"window {r['round']} should have closed at {k}"
        fired = bool(conf) and (math.prod(conf) <= r1 or conf[-1] <= r2)  # none: a lead token at the limit
        assert fired == (trig["reason"] in ("r1", "r2")), trig
        if not r["extra"].get("discarded"):
            # The trigger counts exactly the drafts the cloud verifies: not a first token sent
            # as an id only (the previous verdict settled it), nor, in a window restarted after
            # a discard, the discarded drafts.
            settled = len(conf) - r["verified"]
            assert settled in ((0, 1) if lead_row else (0,)), (r["round"], len(conf), r["verified"])
        checked += fired
    return checked


def test_trigger_points(pipesd_run):
    """Every window closed at the first point where C <= R1 or P <= R2 (or a stop / the limit)."""
    assert _check_triggers(pipesd_run.to_dict("records"), R1, R2) >= 10


def test_proactive_tokens_kept_only_under_the_rule(pipesd_run):
    """What the edge did with the tokens drafted on top of a pending window, seen in the
    records: kept, they go on as the next window (its id is verified live); dropped, that
    window is restarted under a new id or answered as unused. It keeps them exactly when
    the verdict accepted the whole window and its token (the output's token at that
    position) is the first proactive token."""
    kept = dropped = 0
    live = _live(pipesd_run)
    by_request: dict[str, dict[int, dict]] = {}
    for r in live:
        by_request.setdefault(r["request_id"], {})[r["round"]] = r
    for rid, rounds in by_request.items():
        i = int(rid[1:])
        output, _ = greedy_decode(TARGET, [i + 1, 2, 3], 80)
        last = max(rounds)
        for k, r in rounds.items():
            pro = r["extra"].get("proactive")
            if pro is None or k == last:
                continue
            verdict_token = output[r["committed"] - 3 - 1]
            rule = r["accepted"] == r["verified"] and pro["first"] == verdict_token
            assert (k + 1 in rounds) == rule, f"{rid} window {k}: rule says kept={rule}"
            assert pro["kept"] == rule  # and the note says what happened
            assert pro["verdict_token"] == verdict_token and pro["tokens"] >= 1
            if rule:  # the kept tokens open the next window
                assert pro["tokens"] <= rounds[k + 1]["drafted"]
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
    # Every plan a verdict found in force is on record: the first window's (made after the
    # probes) or one a noted re-plan made, restarted windows included.
    extras = list(rounds["extra"].map(json.loads))
    made = {tuple(e["plan"]) for e in events} | {tuple(extras[0]["plan"])}
    found = {tuple(x["estimate"]["plan"]) for x in extras if "estimate" in x}
    assert len(found) > 1 and found <= made, found - made


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


def _observed_run(monkeypatch, params, reqs, link):
    """Run PipeSD with its real policies, keeping hold of each edge policy (to read its
    monitor) and of every upload the edges sent. Greedy requests are checked against the
    target's own decode."""
    policies, sent = [], []

    class ObservedEdge(PipeSDEdge):
        def __init__(self, config):
            super().__init__(config)
            policies.append(self)
            self.fed = []
            add = self.monitor.add_upload
            self.monitor.add_upload = lambda n, seconds: (self.fed.append(n), add(n, seconds))[1]

    real_send = SpeculativeEdge.send

    async def send(self, msg):
        sent.append((msg.verify, len(msg.tokens) - msg.n_fixed - msg.lead_implied))
        return await real_send(self, msg)

    monkeypatch.setattr(SpeculativeEdge, "send", send)
    kw = dict(vocab_size=VOCAB, seed=1, sharpness=6.0)
    draft = create_engine("toy", role="draft", agreement=0.9, **kw)
    spec = SystemSpec("pipesd-observed", PipeSDConfig, ObservedEdge, PipeSDCloud, "test only")
    recs = run_system(spec, draft, TARGET, reqs, params,
                      RunOptions(link=link, edge_cost=lambda op: 0.036, cloud_cost=lambda op: 0.015))
    for req, rec in zip(reqs, recs):
        if req.sampling.temperature == 0:
            assert rec.output_tokens == greedy_decode(TARGET, req.prompt, req.max_new_tokens, req.stop_ids)[0]
    return recs, policies, sent


@pytest.mark.parametrize("verification,temperature", [("full", 0.0), ("sparse", 1.0)])
def test_only_probes_and_non_verifying_uploads_feed_the_link_estimate(monkeypatch, verification, temperature):
    """α and β come from the probes and the batches sent ahead of a verification (App. D),
    each sized by the draft tokens whose data it carried; an upload that asks for verification
    is timed by the verdict's wait, not fed. Under the sparse split at T > 0 the edge
    resamples a rejected token itself and sends it, decided, ahead of the next drafts: it is
    not a draft and does not count."""
    fixed = []
    real_send = SpeculativeEdge.send

    async def send(self, msg):
        fixed.append(msg.n_fixed and not msg.verify)
        return await real_send(self, msg)

    monkeypatch.setattr(SpeculativeEdge, "send", send)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 60, SamplingParams(temperature=temperature), seed=i)
            for i in range(2)]
    params = {"r1": R1, "r2": R2, "history": 10_000, "verification": verification}
    _, (policy,), sent = _observed_run(monkeypatch, params, reqs, LINK)
    ahead = [rows for verify, rows in sent if not verify]
    assert any(verify for verify, _ in sent) and len(ahead) >= 5 and min(ahead) >= 1
    assert policy.fed == list(range(1, 9)) + ahead
    if verification == "sparse":
        assert any(fixed), "no batch carried a resampled token ahead of its drafts"


@pytest.mark.parametrize("max_windows", [1, 2, 3])
def test_windows_in_flight_never_exceed_max_windows(monkeypatch, max_windows):
    """A slow round trip keeps verdicts pending while the edge drafts on: the number of
    windows awaiting their verdict reaches max_windows and never goes past it."""
    depth = []
    real_prepare = SpeculativeEdge.prepare

    def prepare(self, *a, **kw):
        msg = real_prepare(self, *a, **kw)
        depth.append(len(self.awaiting))
        return msg

    monkeypatch.setattr(SpeculativeEdge, "prepare", prepare)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 60, SamplingParams(), seed=i) for i in range(2)]
    _observed_run(monkeypatch, {"r1": 0.5, "r2": 0.3, "max_windows": max_windows}, reqs, FAR)
    assert max(depth) == max_windows


def test_tuner_budgets_and_refusals():
    """The grid is Table 3's 4 x 4 points in order, whatever budget is asked; BO and random
    spend exactly the trials asked; no trials is refused by name."""
    from systems.pipesd.tuner import GRID, ThresholdTuner

    grid = ThresholdTuner("grid", 100, 0)
    assert grid.budget == len(GRID) ** 2 == 16
    seen = []
    while not grid.done:
        seen.append(grid.ask())
        grid.tell(sum(seen[-1]))
    assert seen == [(r1, r2) for r1 in GRID for r2 in GRID]
    assert ThresholdTuner("grid", 5, 0).budget == 5
    assert ThresholdTuner("bo", 100, 0).budget == 100
    one = ThresholdTuner("random", 1, 0)
    assert one.budget == 1 and not one.done
    one.ask()
    one.tell(0.5)
    assert one.done and one.best().tpt == 0.5
    with pytest.raises(ValueError, match="^tuner: trials must be >= 1, got 0$"):
        ThresholdTuner("random", 0, 0)


def test_bo_fits_its_model_from_the_second_candidate():
    """One random initial point (App. C.1), then the Gaussian process: BO's first candidate is
    the seeded random sampler's, its second is not."""
    from systems.pipesd.tuner import ThresholdTuner

    for seed in (0, 7):
        bo, rnd = ThresholdTuner("bo", 4, seed), ThresholdTuner("random", 4, seed)
        first = bo.ask()
        assert first == rnd.ask()
        bo.tell(0.1)
        rnd.tell(0.1)
        assert bo.ask() != rnd.ask()


def test_tuner_refuses_calls_out_of_order_by_name():
    from systems.pipesd.tuner import ThresholdTuner

    tuner = ThresholdTuner("random", 1, 0)
    with pytest.raises(RuntimeError, match="^tuner: nothing evaluated yet$"):
        tuner.best()
    with pytest.raises(RuntimeError, match=r"^tuner: no candidate is pending; ask\(\) first$"):
        tuner.tell(0.1)
    tuner.ask()
    with pytest.raises(RuntimeError, match=r"^tuner: tell\(\) the pending candidate's score before asking again$"):
        tuner.ask()
    tuner.tell(0.1)
    with pytest.raises(RuntimeError, match="^tuner: all 1 evaluations are spent$"):
        tuner.ask()


def test_online_tuning_scores_each_candidate_over_its_own_tokens():
    """PipeSD's online re-tuning by hand: random search, 2 candidates of 10 accepted tokens,
    seed 5. Round k's tuner is seeded seed + k; a candidate's score is the time over the tokens
    of the verdicts served under it (never under the one before); a round ends on the best;
    a full TPT window sets the reference, and a move beyond the gate starts round 2."""
    from systems.pipesd.policy import PipeSDConfig, _OnlineTuning
    from systems.pipesd.tuner import ThresholdTuner

    cfg = PipeSDConfig(tuner="online", tuner_method="random", tuner_trials=2, tuner_tokens=10,
                       retune_window=20, retune_gate=0.2, seed=5)
    tuning, current = _OnlineTuning(cfg), (0.9, 0.3)
    oracle = ThresholdTuner("random", 2, 6)  # round 1: seed 5 + 1
    first = tuning.start()
    assert first == oracle.ask()
    assert tuning.observe(0.3, 4, current) == first
    assert tuning.observe(0.5, 6, current) == first  # 10 tokens in 0.8 s: scored 0.08 s/token
    tuner = tuning.tuner
    assert tuner.history == [(*first, pytest.approx(0.08))]
    oracle.tell(0.08)
    second = oracle.ask()
    assert tuning.observe(9.0, 9, current) == second  # served under `first`: it scores nothing
    assert tuning.observe(0.2, 5, current) == second
    assert tuning.observe(0.3, 5, current) == second  # 10 tokens in 0.5 s: 0.05, the better; the round ends
    assert tuner.history[1] == (*second, pytest.approx(0.05)) and tuning.tuner is None
    # re-tuning: the first full window of 20 tokens (0.1 s/token) is the reference ...
    assert tuning.observe(1.0, 10, second) == second and tuning.reference is None
    assert tuning.observe(1.0, 10, second) == second and tuning.reference == pytest.approx(0.1)
    # ... and the window's TPT moving to 0.2 (> 20% off) starts round 2, seeded 5 + 2
    restarted = tuning.observe(3.0, 10, second)
    assert restarted == ThresholdTuner("random", 2, 7).ask() != first and tuning.rounds == 2


def test_online_retuning_window_and_gate_at_their_boundaries():
    """The TPT window is the latest verdicts holding at least ``retune_window`` tokens (older
    ones dropped while the rest still holds that many), and re-tuning starts only when the
    TPT moves by strictly more than ``retune_gate`` of the reference. Times and tokens chosen
    so each comparison lands exactly on its boundary (binary fractions: no rounding)."""
    from systems.pipesd.policy import PipeSDConfig, _OnlineTuning

    current = (0.9, 0.3)
    # window: 10 tokens; reference 2 s / 10 = 0.2. The third verdict leaves exactly 10 tokens
    # after the oldest, so the oldest goes: TPT = (1 + 3) / 10 = 0.4, off by 0.2 > 0.8 x 0.2
    # (keeping it would give 5 / 15 = 0.33, off by 0.13: no re-tuning)
    cfg = PipeSDConfig(tuner="online", tuner_method="random", tuner_trials=2, retune_window=10, retune_gate=0.8)
    tuning = _OnlineTuning(cfg)
    assert tuning.observe(1.0, 5, current) == current and tuning.reference is None
    assert tuning.observe(1.0, 5, current) == current and tuning.reference == 0.2
    assert tuning.observe(3.0, 5, current) != current and tuning.rounds == 1
    # gate: reference 1 s / 4 = 0.25; then 1.5 s / 4 = 0.375, off by exactly 0.5 x 0.25: no re-tuning
    cfg = PipeSDConfig(tuner="online", tuner_method="random", tuner_trials=2, retune_window=4, retune_gate=0.5)
    tuning = _OnlineTuning(cfg)
    assert tuning.observe(1.0, 4, current) == current and tuning.reference == 0.25
    assert tuning.observe(1.5, 4, current) == current and tuning.rounds == 0 and tuning.tuner is None
    assert tuning.observe(1.5 + 2 ** -10, 4, current) != current and tuning.rounds == 1  # just beyond: re-tunes


@pytest.mark.parametrize("method", ["bo", "random"])
def test_online_tuning_warms_its_own_samplers_start_up_when_built(method):
    """Building the online tuner starts paying the BO sampler's one-time start-up in the
    background (a pick would otherwise stall ~2.4 s on 2 cores); a method without one (random
    search) has nothing to warm."""
    from systems.pipesd.policy import PipeSDConfig, _OnlineTuning

    tuning = _OnlineTuning(PipeSDConfig(tuner="online", tuner_method=method, tuner_trials=2))
    assert tuning.warming.result(timeout=120) is (method == "bo")


def test_the_edges_monitor_keeps_the_configured_history():
    """``history`` reaches the edge's own monitor: its γ is the mean of the last ``history``
    generation times, not of every time since the edge started."""
    edge = PipeSDEdge(PipeSDConfig(history=2))
    for seconds in (1.0, 0.030, 0.050):
        edge.monitor.add_generation(seconds)
    assert edge.monitor.estimate().gamma == pytest.approx(0.040)


def test_without_probes_the_first_window_follows_the_plan_of_the_initial_constants(monkeypatch):
    """``probe_sizes=0`` sends no probe, so nothing is measured before the first window: it
    goes up under the DP's plan for the configured α₀, β₀, γ₀ and N̂ (the paper's constants
    give (1, 1, 4, 14), as in ``test_plan_golden``)."""
    reqs = [GenerationRequest("r0", [1, 2, 3], 40, SamplingParams(), seed=0)]
    recs, (policy,), sent = _observed_run(monkeypatch, {"r1": R1, "r2": R2, "probe_sizes": 0}, reqs, LINK)
    assert policy.fed == [rows for verify, rows in sent if not verify and rows > 0], "a probe went up"
    first = next(r for r in recs[0].rounds if not r.extra.get("discarded"))
    assert first.extra["plan"] == [1, 1, 4, 14]


@pytest.mark.parametrize("uplink_q", ["full", "rule"])
def test_probes_carry_what_the_uplink_carries_and_claim_no_round(monkeypatch, uplink_q):
    """One probe of each size 1..probe_sizes before the first request, acknowledged one by one.
    Its payload is what a draft token of that size costs on this uplink: full rows of the
    vocabulary in ``q_dtype`` under ``uplink_q=full``, ids alone under ``rule``. A probe is
    no round (round and start -1), so its ack can never be taken for a round's."""
    from harness.link import EdgeEnd

    probes = []
    real_send = EdgeEnd.send

    async def send(self, msg):
        if getattr(msg, "probe", False):
            probes.append(msg)
        return await real_send(self, msg)

    monkeypatch.setattr(EdgeEnd, "send", send)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 20, SamplingParams(), seed=i) for i in range(2)]
    _, (policy,), _ = _observed_run(monkeypatch, {"r1": R1, "r2": R2, "uplink_q": uplink_q, "probe_sizes": 3},
                                    reqs, LINK)
    assert [len(p.tokens) for p in probes] == [1, 2, 3] and policy.fed[:3] == [1, 2, 3]
    for p in probes:
        assert (p.round, p.start, set(p.tokens)) == (-1, -1, {0})
        if uplink_q == "full":
            assert p.q_rows.shape == (len(p.tokens), VOCAB) and p.q_rows.dtype == np.float16
        else:
            assert p.q_rows is None


def test_a_warm_up_with_nothing_to_probe_leaves_the_plan_alone():
    """Re-plans happen at a window's batch boundaries, where the window's record notes them;
    a warm-up that has no probe to send changes nothing, even when the estimate has moved."""
    import asyncio

    from harness.clock import LoopClock
    from harness.link import CloudEnd
    from systems.api import Drafter, EdgeContext

    edge = PipeSDEdge(PipeSDConfig(probe_sizes=0))
    plan = edge.plan
    for _ in range(10):
        edge.monitor.add_generation(1.0)  # γ 0.036 -> 1.0: far past the re-plan gate

    async def warm():
        link = CloudEnd().new_link(LINK)
        drafter = Drafter(TARGET, SamplingParams(), np.random.default_rng(0))
        await edge.warm_up(EdgeContext("s", LoopClock(), None, link.edge_end("s"), None, drafter,
                                       np.random.default_rng(0)))

    asyncio.run(warm())
    assert edge.plan is plan and edge.monitor.estimate().gamma == 1.0


def test_a_device_without_a_link_sends_no_probe():
    """No link, nothing to measure: the warm-up returns and the initial α and β stand."""
    import asyncio

    from harness.clock import LoopClock
    from systems.api import Drafter, EdgeContext

    edge = PipeSDEdge(PipeSDConfig())
    drafter = Drafter(TARGET, SamplingParams(), np.random.default_rng(0))
    asyncio.run(edge.warm_up(EdgeContext("s", LoopClock(), None, None, None, drafter, np.random.default_rng(0))))
    assert edge.monitor.missing_probe_sizes() == list(range(1, 9))


@pytest.mark.parametrize("lead_row", [False, True])
def test_the_first_proactive_token_goes_up_as_an_id_unless_lead_row(monkeypatch, lead_row):
    """PipeSD's own code (``lead_row=False``, the default) sends the first token drafted past
    a pending window as an id, the edge's guess of that verdict's token; ``lead_row=True``
    sends its row like any draft's. A slow round trip keeps verdicts pending, so proactive
    drafting happens in both runs."""
    implied = []
    real_send = SpeculativeEdge.send

    async def send(self, msg):
        implied.append(msg.lead_implied)
        return await real_send(self, msg)

    monkeypatch.setattr(SpeculativeEdge, "send", send)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 60, SamplingParams(), seed=i) for i in range(2)]
    recs, _, _ = _observed_run(monkeypatch, {"r1": 0.5, "r2": 0.3, "lead_row": lead_row}, reqs, FAR)
    proactive = [r for rec in recs for r in rec.rounds if "proactive" in r.extra]
    assert proactive, "no verdict found proactive tokens beyond its window"
    assert any(implied) is not lead_row
    # each batch the policy notes is the upload the protocol booked, a lead sent as an id aside
    checked = 0
    for r in (r for rec in recs for r in rec.rounds):
        x = r.extra
        if "batches" in x and not x.get("discarded") and "restarted_from" not in x and not x.get("replans"):
            sizes = list(x.get("upload_sizes", [r.uploaded]))  # recorded where there were several
            sizes[0] -= int(x.get("lead_implied", False))
            assert [size for size, _ in x["batches"]] == sizes, (r.round, x["batches"], sizes)
            checked += bool(x.get("lead_implied"))
    assert checked or lead_row, "no window with a lead token was checked"
    rounds = [{"round": r.round, "verified": r.verified, "extra": r.extra} for rec in recs for r in rec.rounds]
    assert _check_triggers(rounds, 0.5, 0.3, lead_row) >= 5


def test_with_thresholds_that_never_fire_each_window_closes_at_the_token_limit(monkeypatch):
    """r1 = r2 = 0 never fire (a drafted token's confidence is positive), so the edge drafts
    up to the request's token limit and the trigger closes the window there ("limit"): the
    verification goes with that last draft, every window's record says so."""
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 24, SamplingParams(), seed=i) for i in range(2)]
    recs, _, _ = _observed_run(monkeypatch, {"r1": 0.0, "r2": 0.0}, reqs, LINK)
    windows = [r for rec in recs for r in rec.rounds if r.verified and not r.extra.get("discarded")]
    assert windows and all(r.extra.get("trigger", {}).get("reason") in ("limit", "stop") for r in windows), \
        [r.extra.get("trigger") for r in windows]


def test_a_drafted_stop_token_closes_the_window_at_once(monkeypatch):
    """With thresholds that never fire, a window is closed where the draft proposes a stop token
    ("stop"; the target may reject it, as here once) or at the token limit; the last one, whose
    stop the target accepts, ends the output there."""
    prompt = [1, 2, 3]
    full, _ = greedy_decode(TARGET, prompt, 30)
    k = next(i for i in range(6, 30) if full[i] not in full[:i])  # the output's first such token
    reqs = [GenerationRequest("r0", prompt, 30, SamplingParams(), seed=0, stop_ids=(full[k],))]
    recs, _, _ = _observed_run(monkeypatch, {"r1": 0.0, "r2": 0.0}, reqs, LINK)
    assert recs[0].output_tokens == full[: k + 1]
    reasons = [r.extra["trigger"]["reason"] for r in recs[0].rounds if "trigger" in r.extra]
    assert reasons[-1] == "stop" and set(reasons) <= {"limit", "stop"}, reasons


def test_each_verdict_notes_the_estimate_and_the_plan_made_from_it(pipesd_run):
    """The cost model a verdict found in force, and the plan: the DP's for that α, β, γ and N̂."""
    noted = [r["extra"]["estimate"] for r in _live(pipesd_run) if "estimate" in r["extra"]]
    assert len(noted) >= 10
    for e in noted:
        assert tuple(e["plan"]) == plan_batches(e["n_hat"], e["gamma"], e["alpha"], e["beta"]).sizes, e
    assert len({(e["alpha"], e["beta"]) for e in noted}) > 1, "the link estimate never moved"


def test_with_one_window_in_flight_no_verdict_finds_proactive_tokens(monkeypatch):
    """``max_windows=1``: the edge waits for each verdict before drafting on, so no verdict,
    rejecting or not, finds tokens drafted beyond its window."""
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 60, SamplingParams(), seed=i) for i in range(2)]
    recs, _, _ = _observed_run(monkeypatch, {"r1": R1, "r2": R2, "max_windows": 1}, reqs, LINK)
    verdicts = [r for rec in recs for r in rec.rounds if r.verified]
    assert any(r.accepted < r.verified for r in verdicts), "no verdict rejected a draft"
    assert not [r.round for r in verdicts if "proactive" in r.extra]


@pytest.mark.parametrize("override,message", [
    ({"r1": -0.001}, "pipesd: r1 must be in [0, 1], got -0.001"),
    ({"r1": 1.001}, "pipesd: r1 must be in [0, 1], got 1.001"),
    ({"r2": -0.5}, "pipesd: r2 must be in [0, 1], got -0.5"),
    ({"r2": 1.5}, "pipesd: r2 must be in [0, 1], got 1.5"),
    *[({key: 0}, f"pipesd: {key} must be >= 1, got 0")
      for key in ("n_hat", "history", "max_windows", "tuner_trials", "tuner_tokens", "retune_window")],
    ({"probe_sizes": -1}, "pipesd: probe_sizes must be >= 0, got -1"),
    ({"uplink_q": "rows"}, "pipesd: uplink_q must be one of rule, full, got 'rows'"),
    ({"verification": "dense"}, "pipesd: verification must be one of full, sparse, got 'dense'"),
    ({"tuner": "offline"}, "pipesd: tuner must be one of none, online, got 'offline'"),
    ({"tuner_method": "sgd"}, "pipesd: tuner_method must be one of bo, grid, random, got 'sgd'"),
])
def test_config_refuses_each_bad_value_by_name(override, message):
    with pytest.raises(ValueError) as err:
        PipeSDConfig(**override)
    assert str(err.value) == message


def test_config_accepts_the_bounds_and_refuses_an_unknown_dtype():
    for override in ({"r1": 0.0, "r2": 0.0}, {"r1": 1.0, "r2": 1.0}, {"probe_sizes": 0},
                     {key: 1 for key in ("n_hat", "history", "max_windows", "tuner_trials", "tuner_tokens",
                                         "retune_window")}):
        PipeSDConfig(**override)
    with pytest.raises(TypeError):
        PipeSDConfig(q_dtype="float17")


def test_online_tuning_is_told_each_verdicts_time_and_emitted_tokens(monkeypatch):
    """The live re-tuning scores thresholds by time per emitted token: it is told, verdict by
    verdict, the virtual time since the previous one and exactly the tokens that verdict
    emitted, so over a request the tokens add up to its output."""
    from systems.pipesd.policy import _OnlineTuning

    told = []
    real_observe = _OnlineTuning.observe

    def observe(self, seconds, tokens, current):
        told.append((seconds, tokens))
        return real_observe(self, seconds, tokens, current)

    monkeypatch.setattr(_OnlineTuning, "observe", observe)
    reqs = [GenerationRequest("r0", [1, 2, 3], 40, SamplingParams(), seed=0)]
    params = {"tuner": "online", "tuner_method": "random", "tuner_trials": 2, "tuner_tokens": 4}
    recs, _, _ = _observed_run(monkeypatch, params, reqs, LINK)
    assert sum(tokens for _, tokens in told) == len(recs[0].output_tokens)
    assert all(seconds > 0 for seconds, _ in told)
    assert sum(seconds for seconds, _ in told) <= recs[0].e2e


def test_each_verdict_round_records_its_downlink(pipesd_run):
    """A verdict came down the link: its round holds the bytes it took and its one-way time
    (at least half the round trip)."""
    verdicts = [r for r in _live(pipesd_run) if r["verified"]]
    assert len(verdicts) >= 10
    for r in verdicts:
        assert r["bytes_down"] > 0 and r["t_downlink"] >= LINK.rtt_s / 2, (r["round"], r["bytes_down"], r["t_downlink"])


def test_with_only_the_token_threshold_live_windows_close_on_r2(monkeypatch):
    """r1 = 0 never fires, so a window closes where a draft's confidence is <= r2 ("r2"), or
    at a stop or the limit."""
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2, 3], 40, SamplingParams(), seed=i) for i in range(2)]
    recs, _, _ = _observed_run(monkeypatch, {"r1": 0.0, "r2": 0.9}, reqs, LINK)
    reasons = [r.extra["trigger"]["reason"] for rec in recs for r in rec.rounds if "trigger" in r.extra]
    assert "r2" in reasons and set(reasons) <= {"r2", "limit", "stop"}, reasons
