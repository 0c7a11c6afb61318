"""WISP's verification-time estimator: a batch's time from its size, new tokens and cached context.

WISP (papers.md §3) has the server predict a verification batch's completion time before it
admits a request; the paper does not publish the estimator's form. WISP-like: a linear
model ``t = c0 + c1 * members + c2 * new_tokens + c3 * cached_context`` (sums over the
batch's members), fitted by least squares (with a small ridge, so few batches give a stable
fit) on the batches the server has already run. A prediction for a batch is made before it
runs, from the batches before it only, so its error is out of sample. Until ``min_batches``
batches are seen it predicts from the mean time per member so far (None before the first).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class BatchTimeEstimator:
    """Online least-squares estimate of a verification pass's seconds (see the module doc)."""

    def __init__(self, min_batches: int = 8, ridge: float = 1e-6, window: int = 512):
        self.min_batches, self.ridge, self.window = min_batches, ridge, window
        self._x: list[list[float]] = []
        self._y: list[float] = []
        self._coef: np.ndarray | None = None

    @staticmethod
    def features(members: Sequence[tuple[int, int]]) -> list[float]:
        """[1, members, new tokens, cached context] of a batch of ``(new tokens, context)`` members."""
        return [1.0, float(len(members)), float(sum(n for n, _ in members)), float(sum(c for _, c in members))]

    def observe(self, members: Sequence[tuple[int, int]], seconds: float) -> None:
        """Add a batch that ran, and refit."""
        self._x.append(self.features(members))
        self._y.append(float(seconds))
        if len(self._y) > self.window:
            self._x.pop(0)
            self._y.pop(0)
        if len(self._y) >= self.min_batches:
            x, y = np.asarray(self._x), np.asarray(self._y)
            scale = np.maximum(np.abs(x).max(axis=0), 1.0)  # columns of very different size
            xs = x / scale
            coef = np.linalg.solve(xs.T @ xs + self.ridge * np.eye(xs.shape[1]), xs.T @ y)
            self._coef = coef / scale

    @property
    def fitted(self) -> bool:
        return self._coef is not None

    def predict(self, members: Sequence[tuple[int, int]]) -> float | None:
        """Seconds the batch is expected to take; None before any batch was seen."""
        if not members:
            return 0.0
        if self._coef is not None:
            return max(0.0, float(np.dot(self._coef, self.features(members))))
        if not self._y:
            return None
        per_member = sum(self._y) / sum(x[1] for x in self._x)
        return per_member * len(members)

    def describe(self) -> dict:
        """The fitted coefficients (None before the fit) and how many batches they rest on."""
        coef = None if self._coef is None else dict(zip(("intercept_s", "per_member_s", "per_new_token_s",
                                                          "per_context_token_s"), map(float, self._coef)))
        return {"form": "linear in members, new tokens, cached context", "coefficients": coef,
                "batches": len(self._y)}
