"""analysis/: loading run folders, paired ratios with bootstrap CIs, per-group summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from analysis.load import RunFolderError, flatten_config, load_runs
from analysis.stats import (
    PairedRatio,
    PairingError,
    Verdict,
    paired_ratio,
    paired_ratios,
    summarise,
)
from harness.results import RunWriter, build_manifest
from systems.records import RequestRecord, RoundRecord

Z95 = norm.ppf(0.975)


def _frame(candidate, baseline, *, seeds=None, metric="tpot", names=("cand", "base")) -> pd.DataFrame:
    """A requests-like frame: prompt i's candidate and baseline rows hold candidate[i], baseline[i]."""
    n = len(candidate)
    seeds = [0] * n if seeds is None else list(seeds)
    prompts = [f"p{i}" for i in range(n)]
    rows = []
    for name, values in zip(names, (candidate, baseline)):
        rows.append(pd.DataFrame({
            "system": name, "prompt_id": prompts, "request_id": prompts,
            "seed": pd.array(seeds, dtype="Int64"), metric: np.asarray(values, dtype=float),
            "error": pd.Series([None] * n, dtype=object), "network": "lan",
        }))
    return pd.concat(rows, ignore_index=True)


def _same(a: PairedRatio, b: PairedRatio) -> bool:
    return (a.estimate, a.low, a.high, a.n_pairs, a.verdict) == (b.estimate, b.low, b.high, b.n_pairs, b.verdict)


# ---- (a) intervals that are known analytically ---------------------------------------------------
#
# Tolerances: with B = 9999 resamples the Monte Carlo standard deviation of a bootstrap 2.5%
# quantile is about sqrt(0.025 * 0.975 / B) / phi(1.96) = 0.027 standard errors (se); BCa's
# bias and acceleration corrections are O(1/sqrt(n)) in se units for these near-symmetric
# data (n = 2000: ~0.02 se), and the bootstrap's plug-in variance is (n-1)/n of the unbiased
# one (0.03% of the width). So each endpoint must be within 0.15 se of the normal-theory
# interval (~4 Monte Carlo sd's), and the width within 5%. An unpaired bootstrap would be
# more than twice as wide here and fail.


def test_ci_matches_normal_theory_with_known_sd():
    # The candidate takes 2 s on every prompt; the baseline ~ N(3, 0.3): the ratio
    # mean(b) / 2 is exactly normal with sd 0.3 / (2 sqrt(n)).
    rng = np.random.default_rng(11)
    n, sd = 2000, 0.3
    base = rng.normal(3.0, sd, n)
    r = paired_ratio(_frame(np.full(n, 2.0), base), "tpot", "cand", "base")
    se = sd / (2.0 * math.sqrt(n))
    est = base.mean() / 2.0
    assert r.estimate == pytest.approx(est, rel=1e-12)
    assert r.low == pytest.approx(est - Z95 * se, abs=0.15 * se)
    assert r.high == pytest.approx(est + Z95 * se, abs=0.15 * se)
    assert (r.high - r.low) == pytest.approx(2 * Z95 * se, rel=0.05)
    assert r.method == "BCa" and r.n_pairs == n and r.confidence_level == 0.95


def test_ci_matches_delta_method_when_pairs_share_prompt_effects():
    # Both systems vary from prompt to prompt (sd 1); the baseline is 1.2x the candidate plus
    # a paired difference of sd 0.5. Delta method: se = sd(b - R c) / (mean(c) sqrt(n)).
    rng = np.random.default_rng(12)
    n = 2000
    cand = rng.normal(10.0, 1.0, n)
    base = 1.2 * cand + rng.normal(0.0, 0.5, n)
    r = paired_ratio(_frame(cand, base), "tpot", "cand", "base")
    est = base.mean() / cand.mean()
    se = np.std(base - est * cand, ddof=1) / (cand.mean() * math.sqrt(n))
    assert r.estimate == pytest.approx(est, rel=1e-12)
    assert r.low == pytest.approx(est - Z95 * se, abs=0.15 * se)
    assert r.high == pytest.approx(est + Z95 * se, abs=0.15 * se)
    assert r.verdict is Verdict.CANDIDATE_LOWER and r.distinguishable


def test_confidence_level_widens_the_interval():
    rng = np.random.default_rng(13)
    cand = rng.lognormal(0, 0.3, 200)
    frame = _frame(cand, cand * rng.lognormal(0, 0.2, 200))
    r90 = paired_ratio(frame, "tpot", "cand", "base", confidence_level=0.90)
    r99 = paired_ratio(frame, "tpot", "cand", "base", confidence_level=0.99)
    assert r99.low < r90.low <= r90.estimate <= r90.high < r99.high
    assert r90.confidence_level == 0.90


@settings(max_examples=25, deadline=None)
@given(
    cand=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=30),
    k=st.sampled_from([0.25, 0.5, 0.9, 1.0, 1.1, 1.7, 3.0]),
)
def test_identical_ratios_collapse_the_interval(cand, k):
    r = paired_ratio(_frame(cand, [k * c for c in cand]), "tpot", "cand", "base", n_resamples=199)
    assert r.estimate == pytest.approx(k, rel=1e-12)
    assert r.low == r.high == r.estimate and r.method == "degenerate"
    expected = (Verdict.INDISTINGUISHABLE if k == 1.0
                else Verdict.CANDIDATE_LOWER if k > 1 else Verdict.CANDIDATE_HIGHER)
    assert r.verdict is expected


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), power=st.integers(-20, 20))
def test_units_do_not_matter(seed, power):
    # Seconds or milliseconds (any power of two: exact in floating point) give the same ratio.
    rng = np.random.default_rng(seed)
    cand = rng.lognormal(0, 0.5, 25)
    base = cand * rng.lognormal(0.1, 0.3, 25)
    a = paired_ratio(_frame(cand, base), "tpot", "cand", "base", n_resamples=499)
    b = paired_ratio(_frame(cand * 2.0 ** power, base * 2.0 ** power), "tpot", "cand", "base", n_resamples=499)
    assert _same(a, b)


# ---- (b) indistinguishable and distinguishable -----------------------------------------------------


def _prompt_effects(rng, n):
    return rng.lognormal(0.0, 1.0, n)  # prompts differ a lot (a factor ~e between typical ones)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 100.0), st.floats(0.01, 100.0)), min_size=1, max_size=30))
def test_exchangeable_systems_are_indistinguishable(draws):
    # Same distribution, made exact: each prompt is run twice (seeds 0 and 1) and the two
    # systems get the same two figures the other way round, so the ratio of means is 1 and
    # no interval may exclude it, whatever the figures (a fixed-seed random draw would be
    # "distinguishable" 5% of the time by design; the rate is checked below).
    cand = [v for x, y in draws for v in (x, y)]
    base = [v for x, y in draws for v in (y, x)]
    prompts = [f"p{i}" for i in range(len(draws)) for _ in (0, 1)]
    frame = _frame(cand, base, seeds=[0, 1] * len(draws))
    frame["prompt_id"] = frame["request_id"] = prompts * 2
    r = paired_ratio(frame, "tpot", "cand", "base", n_resamples=199)
    assert r.n_pairs == 2 * len(draws) and r.estimate == pytest.approx(1.0, rel=1e-12)
    assert r.verdict is Verdict.INDISTINGUISHABLE and not r.distinguishable
    assert r.low <= 1 <= r.high


def test_clear_difference_is_distinguishable_with_the_right_sign():
    rng = np.random.default_rng(22)
    effect = _prompt_effects(rng, 60)
    fast, slow = effect * 0.7 * rng.lognormal(0, 0.1, 60), effect * rng.lognormal(0, 0.1, 60)
    frame = _frame(fast, slow)
    r = paired_ratio(frame, "tpot", "cand", "base")
    assert r.verdict is Verdict.CANDIDATE_LOWER and r.low > 1 and r.low <= 1 / 0.7 <= r.high
    swapped = paired_ratio(frame, "tpot", "base", "cand")
    assert swapped.verdict is Verdict.CANDIDATE_HIGHER and swapped.high < 1
    assert swapped.estimate == pytest.approx(1 / r.estimate, rel=1e-12)


def test_pairing_sees_a_small_difference_hidden_by_prompt_spread():
    # 5% faster on every prompt, prompts spread by a factor ~e: pairing removes the spread.
    rng = np.random.default_rng(23)
    effect = _prompt_effects(rng, 80)
    frame = _frame(effect * 0.95 * rng.lognormal(0, 0.02, 80), effect * rng.lognormal(0, 0.02, 80))
    r = paired_ratio(frame, "tpot", "cand", "base")
    assert r.verdict is Verdict.CANDIDATE_LOWER
    assert r.high - r.low < 0.03  # an unpaired interval would be ~0.6 wide


@pytest.mark.statistical
def test_same_distribution_false_positive_rate_near_the_level():
    # 200 comparisons of one distribution with itself at 95%: about 5% are "distinguishable".
    # Bootstrap intervals under-cover a little at this size (measured: 6-7% here; 8-10% with
    # 40 pairs and prompts spread lognormal(0, 1), where a few long prompts dominate the means).
    # Binomial(200, 0.065): P(X > 22) < 1%, P(X < 2) < 0.1%; an interval that ignored the
    # pairing would be far too wide (almost no hits), a too-narrow one gives many.
    rng = np.random.default_rng(24)
    hits = 0
    for _ in range(200):
        effect = rng.lognormal(0.0, 0.5, 100)
        frame = _frame(effect * rng.lognormal(0, 0.2, 100), effect * rng.lognormal(0, 0.2, 100))
        hits += paired_ratio(frame, "tpot", "cand", "base", n_resamples=999).distinguishable
    assert 2 <= hits <= 22, hits


# ---- (c) pairing ------------------------------------------------------------------------------------


def _repeats_frame(n_prompts=12, seeds=(0, 1, 2), factor=2.0, noise=0.0):
    rng = np.random.default_rng(31)
    rows = []
    for p in range(n_prompts):
        for s in seeds:
            base = rng.lognormal(0, 1.0)
            cand = base / factor * (rng.lognormal(0, noise) if noise else 1.0)
            for system, v in (("cand", cand), ("base", base)):
                rows.append({"system": system, "prompt_id": f"p{p}", "request_id": f"p{p}", "seed": s,
                             "tpot": v, "error": None, "network": "lan"})
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


@settings(max_examples=20, deadline=None)
@given(st.randoms(use_true_random=False))
def test_row_order_does_not_matter(random):
    frame = _repeats_frame(noise=0.3)
    order = list(range(len(frame)))
    random.shuffle(order)
    a = paired_ratio(frame, "tpot", "cand", "base", n_resamples=499)
    b = paired_ratio(frame.iloc[order], "tpot", "cand", "base", n_resamples=499)
    assert _same(a, b)


def test_pairs_are_matched_on_prompt_and_repeat():
    # Each (prompt, seed) has its own value and the candidate is exactly half of it: only
    # a true pairing (by prompt and seed, whatever the order) makes every ratio 2.
    frame = _repeats_frame(factor=2.0).sample(frac=1.0, random_state=3)
    r = paired_ratio(frame, "tpot", "cand", "base", n_resamples=199)
    assert r.n_pairs == 36 and r.method == "degenerate" and r.estimate == pytest.approx(2.0, rel=1e-12)


def test_unpaired_rows_are_left_out_and_counted():
    frame = _repeats_frame(noise=0.3)
    full = paired_ratio(frame, "tpot", "cand", "base", n_resamples=499)
    lone_base = (frame.system == "base") & (frame.prompt_id == "p3") & (frame.seed == 1)
    extra = pd.DataFrame([{"system": "cand", "prompt_id": "p99", "request_id": "p99", "seed": 0, "tpot": 50.0,
                           "error": None, "network": "lan"}])
    other = pd.DataFrame([{"system": "other", "prompt_id": "p0", "request_id": "p0", "seed": 0, "tpot": 1e6,
                           "error": None, "network": "lan"}])
    broken = pd.concat([frame[~lone_base], extra, other], ignore_index=True)
    r = paired_ratio(broken, "tpot", "cand", "base", n_resamples=499)
    assert r.n_unpaired == 2 and r.n_pairs == full.n_pairs - 1 and r.n_excluded == 0
    lone_cand = (frame.system == "cand") & (frame.prompt_id == "p3") & (frame.seed == 1)
    expected = paired_ratio(frame[~lone_base & ~lone_cand], "tpot", "cand", "base", n_resamples=499)
    assert _same(r, expected)


def test_failed_and_unmeasured_pairs_are_excluded_and_counted():
    frame = _repeats_frame(noise=0.3)
    hit = lambda s, p, seed: (frame.system == s) & (frame.prompt_id == p) & (frame.seed == seed)  # noqa: E731
    damaged = frame.copy()
    damaged.loc[hit("cand", "p1", 0), "error"] = "timeout"
    damaged.loc[hit("base", "p2", 2), "tpot"] = np.nan  # fewer than two tokens: no TPOT
    r = paired_ratio(damaged, "tpot", "cand", "base", n_resamples=499)
    assert r.n_excluded == 2 and r.n_unpaired == 0 and r.n_pairs == 34
    keep = ~((frame.prompt_id == "p1") & (frame.seed == 0)) & ~((frame.prompt_id == "p2") & (frame.seed == 2))
    assert _same(r, paired_ratio(frame[keep], "tpot", "cand", "base", n_resamples=499))
    with_errors = paired_ratio(damaged, "tpot", "cand", "base", n_resamples=499, include_errors=True)
    assert with_errors.n_excluded == 1


def test_clustering_resamples_prompts():
    frame = _repeats_frame(noise=0.3)
    pooled = paired_ratio(frame, "tpot", "cand", "base")
    clustered = paired_ratio(frame, "tpot", "cand", "base", cluster="prompt_id")
    assert clustered.n_units == 12 and clustered.n_pairs == 36 and pooled.n_units == 36
    cand = frame[frame.system == "cand"].groupby("prompt_id").tpot.mean()
    base = frame[frame.system == "base"].groupby("prompt_id").tpot.mean()
    assert clustered.estimate == pytest.approx(base.mean() / cand.mean(), rel=1e-12)
    with pytest.raises(PairingError, match="pairing keys"):
        paired_ratio(frame, "tpot", "cand", "base", cluster="network")


def test_rows_from_several_conditions_are_refused_naming_the_column():
    frame = _repeats_frame(noise=0.3)
    both = pd.concat([frame, frame.assign(network="wan", tpot=frame.tpot * 3)], ignore_index=True)
    with pytest.raises(PairingError, match="differ in network"):
        paired_ratio(both, "tpot", "cand", "base")
    table = paired_ratios(both, "tpot", "cand", "base", by=["network"], n_resamples=499)
    assert list(table.network) == ["lan", "wan"] and set(table.n_pairs) == {36}
    lan = paired_ratio(frame, "tpot", "cand", "base", n_resamples=499)
    assert table.iloc[0].estimate == lan.estimate and table.iloc[0].low == lan.low
    assert table.iloc[0].verdict == lan.verdict.value and bool(table.iloc[0].distinguishable)


def test_a_group_without_one_system_gets_an_empty_row():
    frame = _repeats_frame(noise=0.3)
    extra = frame[frame.system == "cand"].assign(network="wan")
    table = paired_ratios(pd.concat([frame, extra]), "tpot", "cand", "base", by=["network"], n_resamples=199)
    wan = table[table.network == "wan"].iloc[0]
    assert wan.n_pairs == 0 and math.isnan(wan.estimate) and "base" in wan.note and not wan.distinguishable


def test_pairing_errors_are_clear():
    frame = _repeats_frame()
    with pytest.raises(PairingError, match="present: base, cand"):
        paired_ratio(frame, "tpot", "nope", "base")
    with pytest.raises(PairingError, match="no column"):
        paired_ratio(frame, "ttft", "cand", "base")
    with pytest.raises(PairingError, match="both"):
        paired_ratio(frame, "tpot", "base", "base")
    with pytest.raises(PairingError, match="recorded twice"):
        paired_ratio(pd.concat([frame, frame]), "tpot", "cand", "base")
    assert issubclass(PairingError, ValueError)


def test_too_few_pairs_give_no_interval():
    r = paired_ratio(_frame([1.0], [2.0]), "tpot", "cand", "base")
    assert r.estimate == 2.0 and math.isnan(r.low) and math.isnan(r.high)
    assert r.verdict is Verdict.INDISTINGUISHABLE and "1 observation" in r.note


# ---- summaries ---------------------------------------------------------------------------------------


def test_summary_per_group():
    rng = np.random.default_rng(41)
    x = rng.normal(5.0, 1.0, 1000)
    frame = pd.DataFrame({"system": ["a"] * 1000 + ["b"] * 3 + ["c", "d"],
                          "tpot": np.concatenate([x, [2.0, 2.0, 9.0], [7.0, 1.0]]),
                          "error": [None] * 1002 + ["boom", None, "boom"]})
    frame.loc[0, "tpot"] = np.nan
    mean = summarise(frame, "tpot", stat="mean").set_index("system")
    a = mean.loc["a"]
    se = np.std(x[1:], ddof=1) / math.sqrt(999)
    # Same tolerance argument as the paired intervals above.
    assert a.estimate == pytest.approx(x[1:].mean()) and a.n == 999 and a.n_excluded == 1
    assert a.low == pytest.approx(a.estimate - Z95 * se, abs=0.15 * se)
    assert a.high == pytest.approx(a.estimate + Z95 * se, abs=0.15 * se)
    assert a.method == "BCa"
    b = mean.loc["b"]
    assert b.estimate == b.low == b.high == 2.0 and b.method == "degenerate" and b.n_excluded == 1
    c, d = mean.loc["c"], mean.loc["d"]
    assert c.n == 1 and c.estimate == 7.0 and math.isnan(c.low) and "1 observation" in c.note
    assert d.n == 0 and d.n_excluded == 1 and math.isnan(d.estimate)
    median = summarise(frame, "tpot", by=["system"]).set_index("system")
    assert median.loc["a"].estimate == pytest.approx(np.median(x[1:])) and median.loc["a"].method == "percentile"
    assert median.loc["a"].low < median.loc["a"].estimate < median.loc["a"].high
    overall = summarise(frame, "tpot", by=[], stat="median")
    assert len(overall) == 1 and overall.iloc[0].n == 1002 and overall.iloc[0].n_excluded == 3
    with pytest.raises(ValueError, match="stat"):
        summarise(frame, "tpot", stat="mode")


# ---- (d) loading run folders -------------------------------------------------------------------------


def _record(system: str, prompt: str, e2e: float) -> RequestRecord:
    rnd = RoundRecord(prompt, 0, 0.0, e2e, drafted=4, uploaded=4, verified=4, accepted=3, emitted=4)
    return RequestRecord(request_id=prompt, system=system, prompt_tokens=5, output_tokens=[1, 2, 3, 4],
                         start=0.0, end=e2e, token_times=[e2e * (i + 1) / 4 for i in range(4)], rounds=[rnd])


def _write_run(run_dir, config: dict, system: str, e2e: dict[str, float], seed: int = 0) -> None:
    manifest = build_manifest(config, {"clock": "virtual", "link": "model (in-process)"})
    with RunWriter(run_dir, manifest) as w:
        for prompt, value in e2e.items():
            w.append(_record(system, prompt, value), {"pair": "toy", "network": config["network"]["name"],
                                                      "workload": "smoke", "prompt_id": prompt, "seed": seed})


PROMPTS = {f"q{i}": 1.0 + 0.5 * i for i in range(6)}


def test_load_one_run_adds_run_and_config_columns(tmp_path):
    config = {"system": {"name": "vanilla", "k": 4}, "network": {"name": "lan", "rtt_ms": 1.0},
              "systems": ["vanilla", "pipesd"], "seed": 0}
    _write_run(tmp_path / "r1", config, "vanilla", PROMPTS)
    requests, rounds = load_runs(tmp_path / "r1")
    assert len(requests) == 6 and len(rounds) == 6
    for df in (requests, rounds):
        assert set(df["run"]) == {"r1"}
        assert set(df["config.system.name"]) == {"vanilla"} and set(df["config.system.k"]) == {4}
        assert set(df["config.network.rtt_ms"]) == {1.0}
        assert set(df["config.systems"]) == {'["vanilla", "pipesd"]'}
    assert {"system", "prompt_id", "request_id", "seed", "e2e", "tpot", "ttft"} <= set(requests.columns)
    assert sorted(requests.e2e) == sorted(PROMPTS.values())


def test_load_a_sweep_folder_and_compare_across_runs(tmp_path):
    sweep = tmp_path / "sweep"
    lan = {"network": {"name": "lan", "rtt_ms": 1.0}}
    _write_run(sweep / "vanilla", {**lan, "system": "vanilla"}, "vanilla", PROMPTS)
    _write_run(sweep / "fast" / "pipesd", {**lan, "system": "pipesd", "only_here": True}, "pipesd",
               {p: v / 2 for p, v in PROMPTS.items()})
    (sweep / "logs").mkdir()
    (sweep / "logs" / "note.txt").write_text("not a run")
    requests, rounds = load_runs(sweep)
    assert sorted(set(requests.run)) == ["fast/pipesd", "vanilla"] and len(requests) == 12 and len(rounds) == 12
    only = requests.groupby("run")["config.only_here"].apply(lambda s: s.isna().all())
    assert bool(only["vanilla"]) and not bool(only["fast/pipesd"])
    # A run reached twice (the sweep, and the run itself) is read once.
    again, _ = load_runs([sweep, sweep / "vanilla"])
    assert len(again) == 12
    # The loaded records pair across runs: every prompt exactly twice as fast.
    r = paired_ratio(requests, "e2e", "pipesd", "vanilla", n_resamples=199)
    assert r.n_pairs == 6 and r.estimate == pytest.approx(2.0) and r.method == "degenerate"
    assert r.verdict is Verdict.CANDIDATE_LOWER


def test_not_a_run_folder_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "x.txt").write_text("hi")
    with pytest.raises(RunFolderError) as exc:
        load_runs(empty)
    assert str(empty) in str(exc.value) and "\n" not in str(exc.value)
    assert issubclass(RunFolderError, ValueError)
    with pytest.raises(RunFolderError, match="no such folder"):
        load_runs(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(RunFolderError, match="bad"):
        load_runs(bad)


def test_two_runs_with_one_name_are_refused(tmp_path):
    lan = {"network": {"name": "lan", "rtt_ms": 1.0}, "system": "vanilla"}
    _write_run(tmp_path / "a" / "run", lan, "vanilla", PROMPTS)
    _write_run(tmp_path / "b" / "run", lan, "vanilla", PROMPTS)
    with pytest.raises(RunFolderError, match="both named 'run'"):
        load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    requests, _ = load_runs(tmp_path)  # through their common parent they are told apart
    assert sorted(set(requests.run)) == ["a/run", "b/run"]


def test_flatten_config():
    flat = flatten_config({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": {}, "g": None})
    assert flat == {"config.a.b": 1, "config.a.c.d": "x", "config.e": "[1, 2]", "config.f": "{}", "config.g": None}


def test_a_large_sample_gets_the_percentile_interval_with_a_note():
    from analysis.stats import BCA_MAX_N, bootstrap_interval

    rng = np.random.default_rng(0)
    data = rng.normal(10.0, 1.0, BCA_MAX_N + 1)
    est, low, high, method, note = bootstrap_interval([data], np.mean, n_resamples=200)
    assert method == "percentile" and "quadratic" in note and low < est < high
    small = bootstrap_interval([data[:50]], np.mean, n_resamples=200)
    assert small[3] == "BCa" and small[4] is None
