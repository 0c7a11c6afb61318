"""PipeSD's threshold autotuner (paper §3.3, App. C.1-C.2, Table 3).

Searches (R1, R2) in (0, 1)² to minimise time per accepted token (TPT), each candidate
scored over a trial of 20 accepted tokens, 16 evaluations in all:

- ``bo``: Bayesian optimisation, a Gaussian-process surrogate (Matérn kernel) with an
  expected-improvement acquisition and one random initial point -- Optuna's ``GPSampler``
  (its acquisition is log-EI; the paper's EI offset ξ = 0.1 has no counterpart there);
- ``grid``: the 4 x 4 uniform grid of Table 3 (0.2, 0.4, 0.6, 0.8 on each axis);
- ``random``: 16 uniform points (Table 3's other comparator).

The tuner is ask/tell, so it serves both offline tuning (the harness scores each candidate
with a run) and online tuning inside a run (the edge policy scores each candidate over the
next 20 accepted tokens it serves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Callable

import optuna

METHODS = ("bo", "grid", "random")
GRID = (0.2, 0.4, 0.6, 0.8)
LOW, HIGH = 1e-3, 1.0 - 1e-3  # the open box (0, 1)²


@dataclass
class TuneResult:
    """The best thresholds found and every trial's (R1, R2, TPT)."""

    r1: float
    r2: float
    tpt: float
    trials: list[tuple[float, float, float]] = field(default_factory=list)


class ThresholdTuner:
    """Ask/tell search over (R1, R2) with one of :data:`METHODS`."""

    def __init__(self, method: str, trials: int, seed: int):
        if method not in METHODS:
            raise ValueError(f"tuner: unknown method {method!r}; valid: {', '.join(METHODS)}")
        if trials < 1:
            raise ValueError(f"tuner: trials must be >= 1, got {trials}")
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        if method == "bo":
            sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=1)
        else:
            sampler = optuna.samplers.RandomSampler(seed=seed)
        self.budget = min(trials, len(GRID) ** 2) if method == "grid" else trials
        self._study = optuna.create_study(direction="minimize", sampler=sampler)
        if method == "grid":  # the grid's points, queued in order (ask/tell has no grid stop)
            for r1 in GRID:
                for r2 in GRID:
                    self._study.enqueue_trial({"r1": r1, "r2": r2})
        self._trial: optuna.Trial | None = None
        self.history: list[tuple[float, float, float]] = []

    @property
    def done(self) -> bool:
        return len(self.history) >= self.budget

    def ask(self) -> tuple[float, float]:
        """The next candidate (R1, R2); ask again only after :meth:`tell`."""
        if self._trial is not None:
            raise RuntimeError("tuner: tell() the pending candidate's score before asking again")
        if self.done:
            raise RuntimeError(f"tuner: all {self.budget} evaluations are spent")
        self._trial = self._study.ask()
        return self._trial.suggest_float("r1", LOW, HIGH), self._trial.suggest_float("r2", LOW, HIGH)

    def tell(self, tpt: float) -> None:
        """Score the pending candidate by its time per accepted token (seconds)."""
        if self._trial is None:
            raise RuntimeError("tuner: no candidate is pending; ask() first")
        p = self._trial.params
        self._study.tell(self._trial, tpt)
        self.history.append((p["r1"], p["r2"], tpt))
        self._trial = None

    def best(self) -> TuneResult:
        if not self.history:
            raise RuntimeError("tuner: nothing evaluated yet")
        r1, r2, tpt = min(self.history, key=lambda h: h[2])
        return TuneResult(r1, r2, tpt, list(self.history))


@cache
def warm_up(method: str) -> bool:
    """Pay the GP sampler's one-time start-up (importing its tensor library, the first fit)
    on a throwaway study, once per process (cached), so that a live tuner's first ask does not;
    True if ``method`` has such a start-up (``bo``) and it was paid."""
    if method != "bo":
        return False
    tuner = ThresholdTuner("bo", 2, 0)
    while not tuner.done:
        r1, r2 = tuner.ask()
        tuner.tell(r1 + r2)
    return True


def tune(objective: Callable[[float, float], float], method: str = "bo", trials: int = 16,
         seed: int = 0, progress: Callable[[int, float, float, float], None] | None = None) -> TuneResult:
    """Minimise ``objective(r1, r2)`` (a TPT in seconds) with the chosen method."""
    tuner = ThresholdTuner(method, trials, seed)
    while not tuner.done:
        r1, r2 = tuner.ask()
        tpt = objective(r1, r2)
        tuner.tell(tpt)
        if progress is not None:
            progress(len(tuner.history), r1, r2, tpt)
    return tuner.best()
