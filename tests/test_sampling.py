"""The acceptance rules on synthetic distributions, checked against exact probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from systems.sampling import (
    SamplingParams,
    probabilities,
    resample_sparse,
    verify_greedy,
    verify_rejection,
    verify_sparse,
)

N = 40_000


def _dists(seed, vocab=8, support=None):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(vocab) * 0.7)
    q = rng.dirichlet(np.ones(vocab) * 0.7)
    if support is not None:  # the target puts all its mass on `support` tokens
        p[np.argsort(-p)[support:]] = 0.0
        p /= p.sum()
    return p, q


def _first_token(rule, p, q, k, n=N, seed=0):
    """Empirical distribution of the first output token of one-token speculation."""
    rng = np.random.default_rng(seed)
    p_rows = np.stack([p, p])  # p_1, and p_2 for the bonus (unused by the first-token marginal)
    counts = np.zeros(p.size)
    for _ in range(n):
        x = int(rng.choice(p.size, p=q))
        if rule == "rejection":
            out = verify_rejection(p_rows, q[None, :], [x], rng)
            tok = x if out.n_accepted == 1 else out.token
        else:
            out = verify_sparse(p_rows, [q[x]], [x], rng, k)
            tok = x if out.n_accepted == 1 else resample_sparse(out.topk_ids, out.topk_probs, q, rng)
        counts[tok] += 1
    return counts


def _sparse_prediction(p, q, k):
    """The exact first-token distribution the sparse split produces (biased when k < support)."""
    top = np.argsort(-p)[:k]
    p_hat = np.zeros_like(p)
    p_hat[top] = p[top]
    residual = np.maximum(p_hat - q, 0.0)
    residual = residual / residual.sum() if residual.sum() > 0 else p_hat / p_hat.sum()
    reject = 1.0 - np.minimum(p, q).sum()
    return np.minimum(p, q) + reject * residual


def _chi2(counts, probs):
    mask = probs * counts.sum() >= 5
    obs = np.append(counts[mask], counts[~mask].sum())
    exp = np.append(probs[mask], probs[~mask].sum()) * counts.sum()
    keep = exp > 0
    return chisquare(obs[keep], exp[keep]).pvalue


@pytest.mark.parametrize("seed", [0, 1])
def test_rejection_sampling_is_exact(seed):
    p, q = _dists(seed)
    assert _chi2(_first_token("rejection", p, q, 0, seed=seed), p) > 1e-3


def test_sparse_split_is_exact_when_support_fits_k():
    p, q = _dists(2, vocab=8, support=3)
    assert _chi2(_first_token("sparse", p, q, k=3), p) > 1e-3


def test_sparse_split_gap_is_measured_when_support_exceeds_k():
    p, q = _dists(3, vocab=8)
    k = 2
    predicted = _sparse_prediction(p, q, k)
    tv_gap = 0.5 * np.abs(predicted - p).sum()
    counts = _first_token("sparse", p, q, k=k)
    # The implementation produces exactly the predicted (biased) distribution ...
    assert _chi2(counts, predicted) > 1e-3
    # ... which measurably differs from the target's: the gap is real and reported.
    assert tv_gap > 0.01
    assert _chi2(counts, p) < 1e-6
    print(f"sparse split, K={k}, V=8: total-variation gap to the target = {tv_gap:.4f}")


def test_greedy_rule():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert verify_greedy(logits, [1, 0]).n_accepted == 2 and verify_greedy(logits, [1, 0]).token == 2
    out = verify_greedy(logits, [1, 2])
    assert (out.n_accepted, out.token) == (1, 0)


def test_processing_top_k_top_p_and_errors():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.count_nonzero(probabilities(logits, SamplingParams(1.0, top_k=2))) == 2
    assert np.count_nonzero(probabilities(logits, SamplingParams(1.0, top_p=0.8))) == 2
    assert probabilities(logits, SamplingParams())[0] == 1.0
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="q\\(x\\) = 0"):
        verify_rejection(np.ones((2, 2)) / 2, np.array([[1.0, 0.0]]), [1], np.random.default_rng(0))


@pytest.mark.parametrize("vocab", [5, 12, 40, 5000])
def test_sparse_verdict_carries_the_k_largest_in_descending_order(vocab):
    """On a rejection the downlink carries exactly TopK(p) at the rejected position, most
    probable first, with p's own values (checked against a full sort; a vocabulary in the
    thousands too, where a partial partition's leftovers are no longer in order)."""
    rng = np.random.default_rng(vocab)
    for trial in range(30):
        p = rng.dirichlet(np.ones(vocab) * 0.5)
        x = int(np.argmin(p))
        p[x] = 0.0  # the draft token is one the target never emits: certain rejection
        p /= p.sum()
        p_rows = np.stack([p, p])
        for k in sorted({1, 2, 3, vocab - 1, vocab, vocab + 5}):
            out = verify_sparse(p_rows, [0.5], [x], rng, k)
            kk = min(k, vocab)
            expected = [int(t) for t in np.argsort(-p, kind="stable")[:kk]]
            assert (out.n_accepted, out.token) == (0, None)
            assert list(out.topk_ids) == expected, (trial, k)
            assert list(out.topk_probs) == [float(p[t]) for t in expected]


def test_sparse_rule_refuses_what_cannot_have_been_sampled():
    p_rows = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="q\\(x\\) = 0"):
        verify_sparse(p_rows, [0.0], [1], np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="top-K size must be >= 1, got 0"):
        verify_sparse(p_rows, [0.5], [1], np.random.default_rng(0), 0)


def test_processed_distribution_by_hand():
    """Temperature divides the logits; top-k keeps the k largest (all of them when k is at
    least the vocabulary); top-p keeps the smallest most-probable set reaching p."""
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    for t in (0.5, 1.0, 2.0):
        e = np.exp(logits / t)
        assert probabilities(logits, SamplingParams(t)) == pytest.approx(e / e.sum(), rel=1e-12)
    e = np.exp(logits)
    full = e / e.sum()
    for k in (4, 10):
        assert probabilities(logits, SamplingParams(1.0, top_k=k)) == pytest.approx(full, rel=1e-12)
    assert probabilities(logits, SamplingParams(1.0, top_k=2)) == pytest.approx(
        np.array([e[0], e[1], 0, 0]) / (e[0] + e[1]), rel=1e-12)
    # full = 0.644, 0.237, 0.087, 0.032 (cumulative 0.644, 0.881, 0.968): 0.9 needs the first
    # three, 0.85 the first two, 0.6 the first alone
    assert probabilities(logits, SamplingParams(1.0, top_p=0.85)) == pytest.approx(
        np.array([e[0], e[1], 0, 0]) / (e[0] + e[1]), rel=1e-12)
    assert probabilities(logits, SamplingParams(1.0, top_p=0.9)) == pytest.approx(
        np.array([e[0], e[1], e[2], 0]) / (e[0] + e[1] + e[2]), rel=1e-12)
    assert probabilities(logits, SamplingParams(1.0, top_p=0.6)) == pytest.approx(np.array([1.0, 0, 0, 0]))


def _top_p_oracle(p: np.ndarray, top_p: float) -> set[int]:
    """The nucleus by a plain loop: most probable first, equal probabilities by lower id."""
    kept, mass = set(), 0.0
    for i in sorted(range(p.size), key=lambda i: (-p[i], i)):
        kept.add(i)
        mass += p[i]
        if mass >= top_p * p.sum() - 1e-12:
            return kept
    return kept


def test_top_k_and_top_p_edges_ties_and_vanishing_tokens():
    """Top-k keeps exactly the k largest; ties at the nucleus' edge keep the lower ids, on every CPU (a stable order; numpy's
    default sort is not stable where it uses SIMD sorting); top-p = 1 keeps a token whose
    probability is below 1e-12; with top-k first, the nucleus is of what top-k left."""
    rng = np.random.default_rng(0)
    for n in (20, 64, 300):
        logits = rng.integers(0, 4, n).astype(float)  # four levels: many ties
        for top_p in (0.1, 0.33, 0.5, 0.8):
            probs = probabilities(logits, SamplingParams(1.0, top_p=top_p))
            assert set(np.flatnonzero(probs)) == _top_p_oracle(probabilities(logits, SamplingParams(1.0)), top_p)
    assert probabilities(np.array([0.0, -40.0]), SamplingParams(1.0, top_p=1.0))[1] > 0
    for n in (10, 50, 2000):  # past a thousand, numpy partitions without sorting the rest
        logits = rng.normal(size=n)
        for k in (1, 2, 3, 7):
            kept = set(np.flatnonzero(probabilities(logits, SamplingParams(1.0, top_k=k))))
            assert kept == {int(i) for i in np.argsort(-logits)[:k]}, (n, k)
    logits = np.array([2.0, 1.0, 0.0, -1.0])  # top-2 leaves 0.731, 0.269 of its mass
    assert probabilities(logits, SamplingParams(1.0, top_k=2, top_p=0.7)) == pytest.approx(np.array([1.0, 0, 0, 0]))
    assert np.count_nonzero(probabilities(logits, SamplingParams(1.0, top_k=2, top_p=0.75))) == 2


class _Draws:
    """A generator whose uniform draws are given: to put a draw on a boundary exactly."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_sample_sums_float32_probabilities_in_double_precision():
    """Engines hand over float32 rows. Summed in float32, a token of mass 1e-8 between two of
    mass 1 vanishes (1 + 1e-8 rounds to 1) and can never be drawn; summed in float64 it
    keeps its sliver of the cumulative range, and a draw inside that sliver picks it."""
    from systems.sampling import sample

    probs = np.array([1.0, 1e-8, 1.0], dtype=np.float32)
    total = 1.0 + float(probs[1]) + 1.0
    inside = (1.0 + float(probs[1]) / 2) / total  # a draw in the middle of token 1's sliver
    assert sample(probs, _Draws(inside)) == 1
    assert sample(probs, _Draws(0.25)) == 0
    assert sample(probs, _Draws(0.75)) == 2


def test_sample_never_picks_a_token_without_mass():
    """Draws on the cumulative boundaries (0 exactly, a step's exact top) land on a token with
    mass; a vector with no mass is refused."""
    from systems.sampling import sample

    probs = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    assert sample(probs, _Draws(0.0)) == 1
    assert sample(probs, _Draws(0.5)) == 3
    assert sample(probs, _Draws(0.9999999999)) == 3
    for empty in (np.zeros(3), np.array([0.0, -1.0, 0.5])):
        with pytest.raises(ValueError, match="^cannot sample from a distribution with no mass$"):
            sample(empty, _Draws(0.3))


def test_softmax_and_confidence_work_in_double_precision_on_float32_logits():
    """Engines hand over float32 logits. Over a vocabulary the size of the default pair's, a
    float32 softmax is normalised only to ~1e-6 and its largest probability is off in the 7th
    digit; computed in float64 from the same float32 values, both are exact to ~1e-15."""
    from systems.sampling import confidence, softmax

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(151_936) * 3).astype(np.float32)
    exact = np.exp(logits.astype(np.float64) - logits.max())
    exact /= exact.sum()
    p = softmax(logits)
    assert abs(p.sum() - 1.0) < 1e-12
    assert np.max(np.abs(p - exact) / exact) < 1e-12
    assert abs(confidence(logits) - exact.max()) / exact.max() < 1e-12


def test_softmax_normalises_each_row_over_the_last_axis_at_any_scale():
    """The contract is a softmax over the last axis, row by row, that stays finite at logits
    far from zero (1000 would overflow exp). Checked against scipy's implementation on rows of
    very different scales, so a maximum or a sum taken over the wrong axis shows."""
    from scipy.special import softmax as reference

    from systems.sampling import softmax

    rows = np.array([[1000.0, 999.0, 990.0], [0.0, -1.0, -2.0], [-800.0, -805.0, -801.0]])
    assert np.allclose(softmax(rows), reference(rows, axis=-1), rtol=1e-12, atol=0)
    assert np.allclose(softmax(rows[:2, :2]), reference(rows[:2, :2], axis=-1), rtol=1e-12, atol=0)
    for row in rows:
        assert np.allclose(softmax(row), reference(row), rtol=1e-12, atol=0)


def test_entropy_is_the_softmaxs_entropy_in_nats_at_any_scale():
    """Checked against scipy's entropy of scipy's softmax, at logits near zero and far from it
    (exp(1000) overflows unless the largest logit is taken out first), and at the two ends:
    one certain token (0 nats) and a uniform row (log V)."""
    from scipy.special import softmax as reference
    from scipy.stats import entropy as reference_entropy

    from systems.sampling import entropy

    for row in ([0.3, -1.2, 2.0, 0.0], [1000.0, 999.0, 990.0, 998.5], [-700.0, -701.0, -703.0, -700.5]):
        row = np.array(row)
        assert entropy(row) == pytest.approx(reference_entropy(reference(row)), rel=1e-12)
    assert entropy(np.array([0.0, -1e4, -1e4])) == pytest.approx(0.0, abs=1e-12)
    assert entropy(np.full(16, 7.0)) == pytest.approx(np.log(16), rel=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
    ({"top_k": -1}, "top_k must be >= 0 (0 = off), got -1"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.0001}, "top_p must be in (0, 1], got 1.0001"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
])
def test_sampling_params_refuse_each_bad_value_by_name(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message
