"""PipeSD's token-batch plan: the DP of its Algorithm 1 (paper §3.2, Appendix D.2/E).

Tokens 1..N̂ of a window become ready at i·γ; uploading a batch of b tokens costs α + β·b
on one serial link, and a batch starts once its last token is drafted and the previous
batch has arrived. F(i), the earliest time the upload of tokens 1..i completes, is

    F(0) = 0,   F(i) = min over 1 <= j <= i of  max(F(j-1), i·γ) + α + β·(i - j + 1)

and the argmin j backtracks into batch sizes. Algorithm 1 scans the previous boundary in
ascending order and updates only on a strict improvement, so ties go to the earliest
boundary. Once the link is the bottleneck many plans tie exactly, and in floating point
the winner would then depend on rounding; times are therefore rounded to whole
nanoseconds and compared as integers, which keeps the paper's tie-break exact.
"""

from __future__ import annotations

from dataclasses import dataclass

NS = 1_000_000_000  # the DP's time unit: integers of nanoseconds


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes for one scheduling window and the makespan the cost model predicts."""

    sizes: tuple[int, ...]
    makespan_s: float

    def size_at(self, k: int) -> int:
        """Size of the k-th batch, counting across windows: the plan is used cyclically."""
        return self.sizes[k % len(self.sizes)]


def _ns(seconds: float, name: str) -> int:
    if seconds < 0:
        raise ValueError(f"plan: {name} must be >= 0 seconds, got {seconds!r}")
    return round(seconds * NS)


def plan_batches(n_hat: int, gamma: float, alpha: float, beta: float) -> BatchPlan:
    """The optimal batching of ``n_hat`` tokens (seconds per token γ, link α + β·b)."""
    if n_hat < 1:
        raise ValueError(f"plan: the window N̂ must be >= 1 token, got {n_hat!r}")
    g, a, b = _ns(gamma, "gamma"), _ns(alpha, "alpha"), _ns(beta, "beta")
    f = [0] * (n_hat + 1)
    prev = [0] * (n_hat + 1)
    for i in range(1, n_hat + 1):
        best, arg = None, 0
        for j in range(1, i + 1):  # ascending previous boundary; strict < keeps the earliest
            t = max(f[j - 1], i * g) + a + b * (i - j + 1)
            if best is None or t < best:
                best, arg = t, j
        f[i], prev[i] = best, arg
    sizes, i = [], n_hat
    while i > 0:
        sizes.append(i - prev[i] + 1)
        i = prev[i] - 1
    return BatchPlan(tuple(reversed(sizes)), f[n_hat] / NS)


def makespan(sizes: tuple[int, ...] | list[int], gamma: float, alpha: float, beta: float) -> float:
    """Completion time of a given batching under the same cost model (for comparisons)."""
    g, a, b = _ns(gamma, "gamma"), _ns(alpha, "alpha"), _ns(beta, "beta")
    done, last = 0, 0
    for size in sizes:
        last += size
        done = max(done, last * g) + a + b * size
    return done / NS
