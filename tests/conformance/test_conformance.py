"""Conformance suite: every registered system, every declared variant, enters automatically.

With the deterministic toy engines (exact, seeded distributions):
- greedy decoding is token-identical to the reference model's own greedy decode, over many
  seeds, draft/target agreement levels, links and device speeds, with several edges
  sharing the cloud;
- after every verdict edge and cloud hold the same committed prefix, and nothing that was
  not verified is emitted;
- with temperature > 0 a χ² test over >= 10⁴ samples finds the output distribution of the
  first tokens equal to the reference model's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections import Counter

import pytest

from harness.inprocess import EdgeSpec, RunOptions, check_engines, run_system
from harness.link import LinkProfile
from systems.api import GenerationRequest, get_system, system_names
from systems.edgellm.policy import R1_UPDATES
from systems.engines import create_engine
from systems.pipesd.policy import TUNERS
from systems.pipesd.tuner import METHODS
from systems.protocol import UPLINK_Q, VERIFICATION, VerifyingCloud
from systems.sampling import SamplingParams
from tests.support import chi2_against, exact_sequence_probs, greedy_decode


def _cases():
    for name in system_names():
        spec = get_system(name)
        yield pytest.param(name, {}, id=f"{name}")
        for variant, overrides in spec.variants.items():
            yield pytest.param(name, overrides, id=f"{name}-{variant}")


CASES = list(_cases())
T1 = SamplingParams(temperature=1.0)
NUCLEUS = SamplingParams(temperature=0.7, top_p=0.9)
# Every case at T = 1; the default configuration of each system also with top-p processing.
SAMPLING_CASES = [pytest.param(*c.values, T1, id=f"{c.id}-T1") for c in CASES] + [
    pytest.param(*c.values, NUCLEUS, id=f"{c.id}-T0.7-topp0.9") for c in CASES if not c.values[1]]
LINKS = [
    (LinkProfile(), None, None),
    (LinkProfile("wan", rtt_s=0.08, up_bps=2e6, down_bps=2e7, overhead_bytes=40), lambda op: 0.03 * op.tokens,
     lambda op: 0.01 + 0.002 * op.tokens * op.batch),
    (LinkProfile("lossy", rtt_s=0.06, up_bps=5e6, down_bps=2e7, jitter_s=0.01, loss=0.05, seed=7),
     lambda op: 0.02, lambda op: 0.005 * op.tokens),
]
PROMPTS = [[1, 2, 3], [5], [7, 7, 2, 4, 1, 3, 6]]
# Seeds of the greedy grid. `make mutate QUICK=1` (a mutation run's first pass) runs two of
# them: a mutant that fails them is killed all the same, and its survivors are run again on
# the whole grid before they are judged (benchmarks/mutation_score.py --rerun).
GREEDY_SEEDS = range(2) if os.environ.get("SPECWAN_MUTATION_QUICK") == "1" else range(6)


def _pair(seed: int, agreement: float, vocab: int = 8, sharpness: float = 2.0):
    kw = dict(vocab_size=vocab, seed=seed, sharpness=sharpness)
    return (create_engine("toy", role="draft", agreement=agreement, **kw),
            create_engine("toy", role="target", **kw))


def _reference(spec, draft, target):
    return draft if spec.reference == "draft" else target


def _check_rounds(record, spec):
    emitted = 0
    verifying = spec.cloud_cls is not None and issubclass(spec.cloud_cls, VerifyingCloud)
    for r in record.rounds:
        assert r.request_id == record.request_id, f"round {r.round} recorded under another request"
        if r.extra.get("discarded"):  # an unused answer: nothing to agree on, nothing verified
            assert r.cloud_digest == "" and r.verified == 0 and r.accepted == 0 and r.emitted == 0, r
        else:
            assert r.edge_digest == r.cloud_digest, f"prefix disagreement in round {r.round}"
            assert bool(r.cloud_digest) == verifying, f"round {r.round}: a verdict without the cloud's digest"
        assert r.emitted <= r.accepted + 1, "a round emitted more than accepted + 1 tokens"
        assert r.accepted <= r.verified <= r.uploaded, f"round {r.round}: accepted/verified/uploaded out of order"
        emitted += r.emitted
    if record.rounds:
        assert emitted == record.n_tokens, "emitted tokens not accounted for by verdicts"


@pytest.mark.parametrize("system,overrides", CASES)
def test_greedy_is_lossless(system, overrides):
    spec = get_system(system)
    checked = 0
    for link, edge_cost, cloud_cost in LINKS:
        for seed in GREEDY_SEEDS:
            for agreement in (0.0, 0.4, 0.8, 0.95, 1.0):
                draft, target = _pair(seed, agreement)
                ref = _reference(spec, draft, target)
                reqs = [GenerationRequest(f"s{seed}-p{i}", p, 20 + 3 * i, SamplingParams(), seed=seed)
                        for i, p in enumerate(PROMPTS)]
                reqs.append(GenerationRequest(f"s{seed}-one", PROMPTS[seed % 3], 1, SamplingParams(), seed=seed))
                records = run_system(spec, draft, target, reqs, overrides,
                                     RunOptions(link=link, edge_cost=edge_cost, cloud_cost=cloud_cost, clients=2))
                for req, rec in zip(reqs, records):
                    expected, _ = greedy_decode(ref, req.prompt, req.max_new_tokens)
                    assert rec.output_tokens == expected, (
                        f"{system} {overrides} seed={seed} agreement={agreement} link={link.name}: "
                        f"{rec.output_tokens} != reference {expected}")
                    _check_rounds(rec, spec)
                    checked += 1
    assert checked == len(LINKS) * len(GREEDY_SEEDS) * 5 * (len(PROMPTS) + 1)


EDGES = [EdgeSpec("fast", LinkProfile("lan", rtt_s=0.002, up_bps=1e8, down_bps=1e8), lambda op: 0.005, "fast"),
         EdgeSpec("slow", LINKS[1][0], lambda op: 0.03 * op.tokens, "slow"),
         EdgeSpec("lossy", LINKS[2][0], lambda op: 0.02, "lossy")]


@pytest.mark.parametrize("system,overrides", CASES)
def test_many_heterogeneous_edges_on_one_batching_cloud_are_lossless(system, overrides):
    """Three unlike edges (devices, links) with overlapping open-loop arrivals and SLOs, one
    cloud whose passes cost more per member: every edge of every batch decodes losslessly."""
    spec = get_system(system)
    for seed, agreement in ((0, 0.4), (1, 0.9)):
        draft, target = _pair(seed, agreement)
        ref = _reference(spec, draft, target)
        reqs = [GenerationRequest(f"s{seed}-r{i}", PROMPTS[i % 3] + [i % 5 + 1], 16 + 2 * i, SamplingParams(), seed=i,
                                  slo_ttft_s=0.2, slo_tpot_s=0.05, arrival=0.03 * i) for i in range(9)]
        records = run_system(spec, draft, target, reqs, overrides, RunOptions(
            edges=EDGES, cloud_cost=lambda op: 0.01 + 0.002 * op.tokens + 0.004 * (op.batch - 1)))
        for req, rec in zip(reqs, records):
            expected, _ = greedy_decode(ref, req.prompt, req.max_new_tokens)
            assert rec.output_tokens == expected, f"{system} {overrides} seed={seed}: {req.request_id} not lossless"
            assert rec.start == pytest.approx(req.arrival) or rec.start < req.arrival
            _check_rounds(rec, spec)


@pytest.mark.statistical
@pytest.mark.parametrize("system,overrides,params", SAMPLING_CASES)
def test_sampling_preserves_distribution(system, overrides, params):
    spec = get_system(system)
    draft, target = _pair(seed=3, agreement=0.6, vocab=4, sharpness=1.0)
    prompt, length, n = [1, 2], 3, 10_000
    reqs = [GenerationRequest(f"r{i}", prompt, length, params, seed=i) for i in range(n)]
    records = run_system(spec, draft, target, reqs, overrides)
    counts = Counter(tuple(r.output_tokens) for r in records)
    for r in records[:200]:
        _check_rounds(r, spec)
    expected = exact_sequence_probs(_reference(spec, draft, target), prompt, length, params)
    pvalue = chi2_against(counts, expected, n)
    assert pvalue > 1e-3, f"{system} {overrides}: output distribution differs from the reference (p={pvalue:.2e})"


# ---- a fitted pair (systems/engines/fitted.py): the fleet simulator's models ----------------------
FITTED_LEVELS = [i / 10 for i in range(11)]
FITTED_CATEGORY = {
    "agree": [0.3, 0.7, 0.9], "conf_agree": [round(0.5 + 0.5 * x, 3) for x in FITTED_LEVELS],
    "conf_disagree": [round(0.1 + 0.6 * x, 3) for x in FITTED_LEVELS],
    "entropy_agree": [round(0.05 + 1.2 * x, 3) for x in FITTED_LEVELS],
    "entropy_disagree": [round(0.8 + 2 * x, 3) for x in FITTED_LEVELS],
    "target_conf": [round(0.3 + 0.6 * x, 3) for x in FITTED_LEVELS], "target_tail": 2, "eos_rate": 0.02}


def _fitted_pair(vocab: int, seed: int = 0):
    opts = dict(categories={"default": FITTED_CATEGORY}, vocab_size=vocab, wire_vocab_size=4 * vocab, seed=seed)
    return create_engine("fitted", role="draft", **opts), create_engine("fitted", role="target", **opts)


def _refuses_fitted(spec, overrides, draft, target) -> bool:
    """True when the system cannot run on a fitted pair (split inference needs model layers)
    and says so in one line at config time."""
    try:
        check_engines(spec, spec.make_config(overrides), draft, target)
    except ValueError as exc:
        assert "\n" not in str(exc) and spec.name in str(exc), str(exc)
        return True
    return False


@pytest.mark.parametrize("system,overrides", CASES)
def test_greedy_is_lossless_on_a_fitted_pair(system, overrides):
    """The fleet simulator's pairs: every system and variant decodes the fitted target's own
    greedy output, on a slow and a lossy link, with two edges sharing the cloud."""
    spec = get_system(system)
    for seed in range(3):
        draft, target = _fitted_pair(vocab=64, seed=seed)
        if _refuses_fitted(spec, overrides, draft, target):
            assert spec.edge_model == "target", f"{system} refuses a fitted pair"
            return
        ref = _reference(spec, draft, target)
        for link, edge_cost, cloud_cost in LINKS[1:]:
            reqs = [GenerationRequest(f"f{seed}-p{i}", p, 30, SamplingParams(), seed=seed)
                    for i, p in enumerate(PROMPTS)]
            records = run_system(spec, draft, target, reqs, overrides,
                                 RunOptions(link=link, edge_cost=edge_cost, cloud_cost=cloud_cost, clients=2))
            for req, rec in zip(reqs, records):
                expected, _ = greedy_decode(ref, req.prompt, req.max_new_tokens)
                assert rec.output_tokens == expected, f"{system} {overrides} seed={seed} link={link.name}"
                _check_rounds(rec, spec)


@pytest.mark.statistical
@pytest.mark.parametrize("system,overrides", [c for c in CASES if not c.values[1]])
def test_sampling_preserves_distribution_on_a_fitted_pair(system, overrides):
    spec = get_system(system)
    draft, target = _fitted_pair(vocab=4, seed=5)
    if _refuses_fitted(spec, overrides, draft, target):
        assert spec.edge_model == "target", f"{system} refuses a fitted pair"
        return
    prompt, length, n = [1, 2], 3, 6_000
    reqs = [GenerationRequest(f"r{i}", prompt, length, T1, seed=i) for i in range(n)]
    records = run_system(spec, draft, target, reqs, overrides)
    counts = Counter(tuple(r.output_tokens) for r in records)
    expected = exact_sequence_probs(_reference(spec, draft, target), prompt, length, T1)
    pvalue = chi2_against(counts, expected, n)
    assert pvalue > 1e-3, f"{system}: output distribution differs from the fitted reference (p={pvalue:.2e})"


def test_unknown_system_lists_valid_ones():
    with pytest.raises(KeyError) as err:
        get_system("no-such-system")
    for name in system_names():
        assert name in str(err.value)


def test_config_errors_name_the_key():
    spec = get_system("vanilla")
    with pytest.raises(ValueError, match="gamma"):
        spec.make_config({"gamma": "four"})
    with pytest.raises(ValueError, match="gammma"):
        spec.make_config({"gammma": 4})
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        spec.make_config({"gamma": 0})


# ---- every combination a system's options allow --------------------------------------------
# The values of each enumerated option; bool options take both values. A system's option
# that is a string must be listed here or under FREE, so a new option is never left out.
CHOICES = {"verification": VERIFICATION, "uplink_q": UPLINK_Q, "tuner": TUNERS, "tuner_method": METHODS,
           "r1_update": R1_UPDATES}
FREE = {"q_dtype": "a dtype name, not a mode", "hidden_dtype": "a dtype name, not a mode"}
# Options that matter only under another's value, and settings that keep such runs short.
ONLY_WITH = {"tuner_method": ("tuner", "online")}
ALSO = {("tuner", "online"): {"tuner_trials": 3, "tuner_tokens": 4, "retune_window": 8}}


def _options(spec) -> dict[str, tuple]:
    out = {}
    for f in dataclasses.fields(spec.config_cls):
        default = getattr(spec.make_config(), f.name)
        if isinstance(default, bool):
            out[f.name] = (False, True)
        elif f.name in CHOICES:
            out[f.name] = tuple(CHOICES[f.name])
        elif isinstance(default, str) or f.type in ("str", str):
            assert f.name in FREE, f"{spec.name}: option {f.name!r} is neither enumerated nor free-form here"
    return out


def _combinations():
    for name in system_names():
        spec = get_system(name)
        options = _options(spec)
        keys = sorted(options)
        for values in itertools.product(*(options[k] for k in keys)):
            combo = dict(zip(keys, values))
            defaults = spec.make_config()
            if any(combo[k] != getattr(defaults, k) and combo.get(dep) != val
                   for k, (dep, val) in ONLY_WITH.items() if k in combo):
                continue
            overrides = dict(combo)
            for (k, v), extra in ALSO.items():
                if combo.get(k) == v:
                    overrides.update(extra)
            label = ",".join(f"{k}={v}" for k, v in combo.items() if v != getattr(defaults, k)) or "defaults"
            yield pytest.param(name, overrides, id=f"{name}[{label}]")


COMBINATIONS = list(_combinations())


def test_combinations_cover_sparse_verification():
    for name in system_names():
        if "verification" in _options(get_system(name)):
            assert any(c.values[0] == name and c.values[1]["verification"] == "sparse" for c in COMBINATIONS)


@pytest.mark.parametrize("system,overrides", COMBINATIONS)
def test_every_option_combination_is_lossless(system, overrides):
    """Each combination runs greedy on a jittery, lossy link with two edges: lossless, every
    round accounted for."""
    spec = get_system(system)
    link, edge_cost, cloud_cost = LINKS[2]
    opts = RunOptions(link=link, edge_cost=edge_cost, cloud_cost=cloud_cost, clients=2)
    for seed in range(2):
        draft, target = _pair(seed, 0.6)
        ref = _reference(spec, draft, target)
        reqs = [GenerationRequest(f"g{seed}-{i}", p, 16, SamplingParams(), seed=seed) for i, p in enumerate(PROMPTS)]
        for req, rec in zip(reqs, run_system(spec, draft, target, reqs, overrides, opts)):
            assert rec.output_tokens == greedy_decode(ref, req.prompt, req.max_new_tokens)[0]
            _check_rounds(rec, spec)


@pytest.mark.statistical
@pytest.mark.parametrize("system,overrides", COMBINATIONS)
def test_every_option_combination_keeps_the_distribution(system, overrides):
    """Each combination at T = 1 keeps the target's distribution (on fewer samples than the
    registered variants get)."""
    spec = get_system(system)
    draft, target = _pair(seed=3, agreement=0.6, vocab=4, sharpness=1.0)
    prompt, length, n = [1, 2], 3, 1500
    reqs = [GenerationRequest(f"r{i}", prompt, length, T1, seed=i) for i in range(n)]
    records = run_system(spec, draft, target, reqs, overrides, RunOptions(clients=2))
    for r in records:
        _check_rounds(r, spec)
    expected = exact_sequence_probs(_reference(spec, draft, target), prompt, length, T1)
    pvalue = chi2_against(Counter(tuple(r.output_tokens) for r in records), expected, n)
    assert pvalue > 1e-4, f"{system} {overrides}: output distribution differs from the reference (p={pvalue:.2e})"


@pytest.mark.parametrize("system", [n for n in system_names() if "verification" in _options(get_system(n))])
def test_unknown_verification_refused_at_config_time(system):
    with pytest.raises(ValueError, match=f"^{system}: verification must be one of full, sparse, got 'topk'$"):
        get_system(system).make_config({"verification": "topk"})
