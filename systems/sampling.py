"""Acceptance rules for speculative decoding, written once for every plug-in.

- greedy: accept a draft token iff it is the target's argmax; the correction or bonus is
  the target's argmax (token ids suffice on the wire).
- rejection: standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023):
  accept x with probability min(1, p(x)/q(x)); on rejection sample from the residual
  norm(max(0, p - q)); after full acceptance sample a bonus token from p_{n+1}.
  Needs the full draft distributions at the verifier.
- sparse: PicoSpec's split (arXiv 2603.19133, section 3.3). The edge uploads token ids and
  the scalars q(x); the verifier runs the same ratio test and, on rejection at position j,
  returns TopK(p_j); the edge resamples the correction from norm(max(0, p̂_j - q_j)) over
  that support. Exact when p_j has at most K tokens of support, biased otherwise (the
  conformance suite measures the gap).

Both p and q must be the *processed* distributions (same temperature, top-k, top-p), which
:func:`probabilities` produces from raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RULES = ("greedy", "rejection", "sparse")


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings applied identically to draft and target distributions."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax in float64 over the last axis."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The processed sampling distribution for one row of logits (float64)."""
    logits = np.asarray(logits)
    if params.greedy:
        out = np.zeros(logits.shape[-1], dtype=np.float64)
        out[int(np.argmax(logits))] = 1.0
        return out
    probs = softmax(logits / params.temperature)
    if params.top_k and params.top_k < probs.size:
        kth = np.partition(probs, -params.top_k)[-params.top_k]
        probs = np.where(probs >= kth, probs, 0.0)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # the smallest set whose mass reaches top_p (a hair of tolerance for float round-off)
        keep = order[: int(np.searchsorted(cum, params.top_p * cum[-1] - 1e-12)) + 1]
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
    return probs / probs.sum()


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a (not necessarily normalised) non-negative vector."""
    cum = np.cumsum(probs, dtype=np.float64)
    total = cum[-1]
    if not total > 0:
        raise ValueError("cannot sample from a distribution with no mass")
    idx = int(np.searchsorted(cum, rng.random() * total, side="right"))
    return min(idx, probs.size - 1)


def confidence(logits: np.ndarray) -> float:
    """The largest softmax probability at temperature 1 (the draft confidence PipeSD uses)."""
    z = np.asarray(logits, dtype=np.float64)
    return float(1.0 / np.exp(z - z.max()).sum())


def entropy(logits: np.ndarray) -> float:
    """The entropy (nats) of the softmax at temperature 1."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    e = np.exp(z)
    total = e.sum()
    return float(np.log(total) - (e * z).sum() / total)


@dataclass(frozen=True)
class Outcome:
    """The verifier's decision for one block of n draft tokens.

    ``token`` is the correction (on rejection) or bonus (full acceptance) token; it is None
    only under the sparse rule on rejection, where the edge resamples it from ``topk``.
    """

    n_accepted: int
    token: int | None
    topk_ids: tuple[int, ...] = ()
    topk_probs: tuple[float, ...] = ()


def verify_greedy(p_logits: np.ndarray, draft: Sequence[int]) -> Outcome:
    """Greedy rule over ``len(draft) + 1`` rows of target logits."""
    top = np.argmax(p_logits, axis=-1)
    n = 0
    while n < len(draft) and int(top[n]) == int(draft[n]):
        n += 1
    return Outcome(n, int(top[n]))


def verify_rejection(
    p_rows: np.ndarray, q_rows: np.ndarray, draft: Sequence[int], rng: np.random.Generator
) -> Outcome:
    """Standard rejection sampling with residual resampling and the bonus token.

    ``p_rows``: processed target distributions, ``len(draft) + 1`` rows; ``q_rows``: the
    processed draft distributions the tokens were sampled from, ``len(draft)`` rows.
    """
    for i, x in enumerate(draft):
        p, q = p_rows[i], q_rows[i]
        px, qx = float(p[x]), float(q[x])
        if qx <= 0.0:
            raise ValueError(f"draft token {x} at offset {i} has q(x) = 0: it cannot have been sampled from q")
        if rng.random() < min(1.0, px / qx):
            continue
        residual = np.maximum(np.asarray(p, dtype=np.float64) - q, 0.0)
        return Outcome(i, sample(residual, rng))
    return Outcome(len(draft), sample(p_rows[len(draft)], rng))


def verify_sparse(
    p_rows: np.ndarray, q_token: Sequence[float], draft: Sequence[int], rng: np.random.Generator, k: int
) -> Outcome:
    """Cloud half of the sparse split: ratio test on scalars, TopK(p_j) on rejection."""
    if k < 1:
        raise ValueError(f"top-K size must be >= 1, got {k}")
    for i, x in enumerate(draft):
        px, qx = float(p_rows[i][x]), float(q_token[i])
        if qx <= 0.0:
            raise ValueError(f"draft token {x} at offset {i} has q(x) = 0: it cannot have been sampled from q")
        if rng.random() < min(1.0, px / qx):
            continue
        p = p_rows[i]
        kk = min(k, p.size)
        ids = np.argpartition(-p, kk - 1)[:kk]
        ids = ids[np.argsort(-p[ids], kind="stable")]
        return Outcome(i, None, tuple(int(t) for t in ids), tuple(float(p[t]) for t in ids))
    return Outcome(len(draft), sample(p_rows[len(draft)], rng))


def resample_sparse(
    topk_ids: Sequence[int], topk_probs: Sequence[float], q_row: np.ndarray, rng: np.random.Generator
) -> int:
    """Edge half of the sparse split: the correction from norm(max(0, p̂ - q)) on TopK.

    p̂ is the target's top-K probabilities, zero elsewhere, not renormalised (the natural
    reading of PicoSpec's Eq. 4). If the clipped residual has no mass (possible only when
    p puts mass outside the top-K), fall back to p̂ itself.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    p_hat = np.asarray(topk_probs, dtype=np.float64)
    residual = np.maximum(p_hat - np.asarray(q_row, dtype=np.float64)[ids], 0.0)
    weights = residual if residual.sum() > 0 else p_hat
    return int(ids[sample(weights, rng)])
