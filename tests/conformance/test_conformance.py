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

from collections import Counter

import pytest

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from systems.api import GenerationRequest, get_system, system_names
from systems.engines import create_engine
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


def _pair(seed: int, agreement: float, vocab: int = 8, sharpness: float = 2.0):
    kw = dict(vocab_size=vocab, seed=seed, sharpness=sharpness)
    return (create_engine("toy", role="draft", agreement=agreement, **kw),
            create_engine("toy", role="target", **kw))


def _reference(spec, draft, target):
    return draft if spec.reference == "draft" else target


def _check_rounds(record):
    emitted = 0
    for r in record.rounds:
        assert r.edge_digest == r.cloud_digest or not r.cloud_digest, f"prefix disagreement in round {r.round}"
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
        for seed in range(6):
            for agreement in (0.0, 0.4, 0.8, 0.95, 1.0):
                draft, target = _pair(seed, agreement)
                ref = _reference(spec, draft, target)
                reqs = [GenerationRequest(f"s{seed}-p{i}", p, 20 + 3 * i, SamplingParams(), seed=seed)
                        for i, p in enumerate(PROMPTS)]
                records = run_system(spec, draft, target, reqs, overrides,
                                     RunOptions(link=link, edge_cost=edge_cost, cloud_cost=cloud_cost, clients=2))
                for req, rec in zip(reqs, records):
                    expected, _ = greedy_decode(ref, req.prompt, req.max_new_tokens)
                    assert rec.output_tokens == expected, (
                        f"{system} {overrides} seed={seed} agreement={agreement} link={link.name}: "
                        f"{rec.output_tokens} != reference {expected}")
                    _check_rounds(rec)
                    checked += 1
    assert checked == len(LINKS) * 6 * 5 * len(PROMPTS)


@pytest.mark.parametrize("system,overrides,params", SAMPLING_CASES)
def test_sampling_preserves_distribution(system, overrides, params):
    spec = get_system(system)
    draft, target = _pair(seed=3, agreement=0.6, vocab=4, sharpness=1.0)
    prompt, length, n = [1, 2], 3, 10_000
    reqs = [GenerationRequest(f"r{i}", prompt, length, params, seed=i) for i in range(n)]
    records = run_system(spec, draft, target, reqs, overrides)
    counts = Counter(tuple(r.output_tokens) for r in records)
    for r in records[:200]:
        _check_rounds(r)
    expected = exact_sequence_probs(_reference(spec, draft, target), prompt, length, params)
    pvalue = chi2_against(counts, expected, n)
    assert pvalue > 1e-3, f"{system} {overrides}: output distribution differs from the reference (p={pvalue:.2e})"


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
