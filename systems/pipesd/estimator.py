"""PipeSD's environment monitor: online estimates of α, β, γ and the window N̂ (paper §3.3, App. D).

- γ: mean per-token generation time over the last ``history`` drafted tokens (draft
  compute only; network waits excluded).
- α, β: a least-squares line through the per-batch-size mean upload times over the last
  ``history`` uploads (non-verifying uploads and probes only). Until ``min_sizes``
  distinct sizes have been seen, the policy sends probe batches of the missing sizes.
- N̂: the rounded mean of the last ``history`` verification-window lengths.

The plan is re-computed when N̂ changes or γ, α or β moves by more than ``gate``
(relative) from the values the current plan was made with.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostEstimate:
    """The cost model's parameters at one moment (seconds)."""

    alpha: float
    beta: float
    gamma: float
    n_hat: int


class EnvironmentMonitor:
    """Keeps PipeSD's online estimates; starts from given initial values."""

    def __init__(self, alpha: float, beta: float, gamma: float, n_hat: int, history: int, min_sizes: int):
        self.initial = CostEstimate(alpha, beta, gamma, n_hat)
        self.min_sizes = min_sizes
        self._gen: deque[float] = deque(maxlen=history)
        self._uploads: deque[tuple[int, float]] = deque(maxlen=history)
        self._windows: deque[int] = deque(maxlen=history)

    def add_generation(self, seconds: float) -> None:
        self._gen.append(seconds)

    def add_upload(self, n_tokens: int, seconds: float) -> None:
        self._uploads.append((n_tokens, seconds))

    def add_window(self, n_tokens: int) -> None:
        self._windows.append(n_tokens)

    def sizes_seen(self) -> set[int]:
        return {n for n, _ in self._uploads}

    def missing_probe_sizes(self) -> list[int]:
        """Batch sizes 1..min_sizes still needed before the line fit is trusted."""
        seen = self.sizes_seen()
        if len(seen) >= self.min_sizes:
            return []
        return [n for n in range(1, self.min_sizes + 1) if n not in seen]

    def link(self) -> tuple[float, float]:
        """(α, β) from the per-size means; the initial values until two sizes are known."""
        by_size: dict[int, list[float]] = {}
        for n, t in self._uploads:
            by_size.setdefault(n, []).append(t)
        if len(by_size) < 2:
            return self.initial.alpha, self.initial.beta
        x = np.array(sorted(by_size), dtype=float)
        y = np.array([np.mean(by_size[int(n)]) for n in x])
        beta, alpha = np.polyfit(x, y, 1)
        return max(0.0, float(alpha)), max(0.0, float(beta))

    def estimate(self) -> CostEstimate:
        alpha, beta = self.link()
        gamma = float(np.mean(self._gen)) if self._gen else self.initial.gamma
        n_hat = max(1, round(float(np.mean(self._windows)))) if self._windows else self.initial.n_hat
        return CostEstimate(alpha, beta, gamma, n_hat)


def moved(old: CostEstimate, new: CostEstimate, gate: float) -> list[str]:
    """What calls for a new plan: "n_hat" if N̂ changed, and each of "alpha", "beta",
    "gamma" that moved by more than ``gate`` relative to ``old`` (empty: keep the plan)."""
    out = ["n_hat"] if new.n_hat != old.n_hat else []
    for name in ("alpha", "beta", "gamma"):
        a, b = getattr(old, name), getattr(new, name)
        if abs(b - a) > gate * max(abs(a), 1e-12):
            out.append(name)
    return out
