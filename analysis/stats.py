"""Statistics over request records: paired ratios between two systems, and per-group summaries,
each with a bootstrap confidence interval (:func:`scipy.stats.bootstrap`, fixed seed).

The comparison is paired: a candidate's request is set against the baseline's request for the
same prompt (same ``prompt_id`` and ``request_id``, i.e. the same turn, and the same ``seed``,
the repeat), so the spread between prompts, which is often far larger than the difference
between systems, does not blur the comparison.

    r = paired_ratio(requests, "tpot", candidate="pipesd", baseline="vanilla")
    r.estimate, r.low, r.high, r.verdict     # mean(vanilla tpot) / mean(pipesd tpot): the speedup

Rows whose ``error`` is set, and rows whose metric is null (a figure that could not be
measured), are left out and counted, never read as zero.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

# The columns that say which prompt (and turn) a request answered, and which repeat it was.
DEFAULT_PAIR_KEYS: tuple[str, ...] = ("prompt_id", "request_id", "seed")
# Columns named when rows cannot be paired because a condition varies within the frame.
_CONDITION_HINTS = ("run", "pair", "network", "workload", "clock", "config_hash", "scenario", "dataset",
                    "method", "category", "attempt")
#: above this many observations the BCa interval is replaced by the percentile interval
BCA_MAX_N = 2000
_BATCH_ELEMENTS = 2_000_000  # bounds the bootstrap's memory: resamples (and jackknife rows) x sample size
_DEGENERATE_RTOL = 1e-12  # a bootstrap distribution narrower than this (relative) has no spread


class PairingError(ValueError):
    """The rows cannot be paired as asked (a missing column or system, or keys that are not unique)."""


class Verdict(str, enum.Enum):
    """Whether the confidence interval of ``mean(baseline) / mean(candidate)`` excludes 1, and on which side."""

    CANDIDATE_LOWER = "candidate lower"  # the whole interval is above 1: e.g. the candidate is faster
    CANDIDATE_HIGHER = "candidate higher"  # the whole interval is below 1
    INDISTINGUISHABLE = "indistinguishable"  # the interval holds 1 (or there is none)


@dataclass(frozen=True)
class PairedRatio:
    """A paired comparison of one metric between a candidate and a baseline system.

    ``estimate`` is ``mean(baseline) / mean(candidate)`` over the pairs: for a time or cost
    metric (``tpot``, ``e2e``, ``ttft``, joules, bytes) it is the candidate's speedup (or
    saving) factor, above 1 when the candidate is lower; for a rate (``tokens_per_s``) it is
    the inverse of the candidate's gain. ``low``/``high``: the bootstrap confidence interval at
    ``confidence_level`` (NaN when there is none: see ``note``). ``n_pairs``: pairs used;
    ``n_units``: what was resampled (pairs, or clusters of pairs); ``n_unpaired``: rows of
    either system without a partner; ``n_excluded``: pairs left out because either side
    failed (``error``) or has no figure. ``method``: ``"BCa"``, ``"percentile"``, or
    ``"degenerate"`` (every resample gave the same value: the interval is that value).
    """

    metric: str
    candidate: str
    baseline: str
    estimate: float
    low: float
    high: float
    confidence_level: float
    n_pairs: int
    n_units: int
    n_unpaired: int
    n_excluded: int
    method: str
    verdict: Verdict
    note: str | None = None

    @property
    def distinguishable(self) -> bool:
        """True when the interval excludes 1 (the two systems differ at ``confidence_level``)."""
        return self.verdict is not Verdict.INDISTINGUISHABLE


def ratio_of_means(baseline: np.ndarray, candidate: np.ndarray, axis: int = -1) -> np.ndarray:
    """``mean(baseline) / mean(candidate)`` along ``axis`` (vectorised, as the bootstrap calls it)."""
    return np.mean(baseline, axis=axis) / np.mean(candidate, axis=axis)


def bootstrap_interval(
    data: Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray],
    *,
    paired: bool = False,
    confidence_level: float = 0.95,
    method: str = "BCa",
    n_resamples: int = 9999,
    random_state: int | np.random.Generator = 0,
) -> tuple[float, float, float, str, str | None]:
    """``(estimate, low, high, method used, note)`` of a vectorised ``statistic`` of ``data``.

    A thin layer over :func:`scipy.stats.bootstrap` that handles the cases it leaves as NaN
    with a warning: fewer than two observations (no interval, NaN, with a note); no spread
    at all among the resamples (the interval collapses to the estimate, method
    ``"degenerate"``); and a BCa interval that cannot be computed (e.g. a bootstrap
    distribution with heavy ties), where the percentile interval of the same resamples is
    given instead and the note says so. ``random_state`` seeds the resampling, so the same
    inputs always give the same interval.
    """
    data = tuple(np.asarray(d, dtype=float) for d in data)
    n = len(data[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = float(statistic(*data, axis=-1)) if n else math.nan
    if n < 2:
        return estimate, math.nan, math.nan, method, f"no interval from {n} observation{'s' if n != 1 else ''}"
    if not math.isfinite(estimate):
        return estimate, math.nan, math.nan, method, "the statistic is not finite on the data"
    bca_note = None
    if method.lower() == "bca" and n > BCA_MAX_N:
        # BCa's jackknife evaluates the statistic n times on n - 1 observations: quadratic in
        # n, gigabytes at a fleet's thousands of requests; the percentile interval is not
        method, bca_note = "percentile", f"percentile interval (BCa's jackknife is quadratic; n = {n} > {BCA_MAX_N})"
    kwargs = dict(paired=paired, vectorized=True, confidence_level=confidence_level,
                  batch=max(1, _BATCH_ELEMENTS // n))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's DegenerateDataWarning: handled below
        res = bootstrap(data, statistic, n_resamples=n_resamples, method=method, rng=random_state, **kwargs)
        spread = float(np.ptp(res.bootstrap_distribution))
        if spread <= _DEGENERATE_RTOL * abs(estimate):
            note = "no spread among the resamples: the interval is the estimate"
            return estimate, estimate, estimate, "degenerate", note
        low, high = (float(v) for v in res.confidence_interval)
        if method.lower() == "bca" and not (math.isfinite(low) and math.isfinite(high)):
            res = bootstrap(data, statistic, n_resamples=0, method="percentile", bootstrap_result=res, **kwargs)
            low, high = (float(v) for v in res.confidence_interval)
            note = "BCa undefined on these data: percentile interval of the same resamples"
            return estimate, low, high, "percentile", note
    return estimate, low, high, method, bca_note


def _verdict(low: float, high: float) -> Verdict:
    if low > 1:
        return Verdict.CANDIDATE_LOWER
    if high < 1:
        return Verdict.CANDIDATE_HIGHER
    return Verdict.INDISTINGUISHABLE  # also when either end is NaN


def _require(requests: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in requests.columns]
    if missing:
        raise PairingError(f"no column(s) {missing} in the requests (columns: {', '.join(map(str, requests.columns))})")


def _values(rows: pd.DataFrame, metric: str) -> np.ndarray:
    if not (pd.api.types.is_numeric_dtype(rows[metric]) or pd.api.types.is_bool_dtype(rows[metric])):
        raise PairingError(f"metric {metric!r} is not numeric (dtype {rows[metric].dtype})")
    return rows[metric].to_numpy(dtype=float, na_value=np.nan)


def _usable(rows: pd.DataFrame, include_errors: bool) -> np.ndarray:
    if include_errors or "error" not in rows.columns:
        return np.ones(len(rows), dtype=bool)
    return rows["error"].isna().to_numpy()


def _duplicates_message(rows: pd.DataFrame, keys: list[str], system: str) -> str:
    dup = rows[rows.duplicated(keys, keep=False)]
    hints = [c for c in rows.columns if c in _CONDITION_HINTS or str(c).startswith("config.")]
    varying = [c for c in hints if (dup.groupby(keys, dropna=False)[c].nunique(dropna=False) > 1).any()]
    why = (f"they differ in {', '.join(varying)}: compare within one of those (filter the rows, or "
           f"paired_ratios(..., by=[...]))" if varying else
           "no context column tells them apart: the same request may be recorded twice (a run loaded twice?)")
    example = tuple(dup.iloc[0][keys].tolist())
    return (f"{len(dup)} rows of system {system!r} share pairing keys {tuple(keys)} (e.g. {example}); {why}")


def _pair(requests, metric, candidate, baseline, system_column, keys, include_errors):
    """The pairs as a frame sorted by the keys (``_b``, ``_c``, ``_ok``), and the unpaired count."""
    sides = []
    for system, tag in ((candidate, "c"), (baseline, "b")):
        rows = requests[requests[system_column] == system]
        if rows.empty:
            present = sorted(map(str, requests[system_column].dropna().unique()))
            raise PairingError(f"no rows with {system_column} == {system!r} (present: {', '.join(present)})")
        if rows.duplicated(keys).any():
            raise PairingError(_duplicates_message(rows, keys, system))
        side = rows[keys].copy()
        side[f"_{tag}"] = _values(rows, metric)
        side[f"_{tag}_ok"] = _usable(rows, include_errors)
        sides.append(side)
    merged = sides[0].merge(sides[1], on=keys, how="outer", indicator=True)
    both = merged[merged["_merge"] == "both"]
    n_unpaired = len(merged) - len(both)
    both = both.sort_values(keys, kind="stable", na_position="last").reset_index(drop=True)
    ok = (both["_c_ok"].astype(bool) & both["_b_ok"].astype(bool)
          & np.isfinite(both["_c"].to_numpy(dtype=float)) & np.isfinite(both["_b"].to_numpy(dtype=float)))
    return both, ok.to_numpy(), n_unpaired


def paired_ratio(
    requests: pd.DataFrame,
    metric: str,
    candidate: str,
    baseline: str,
    *,
    system_column: str = "system",
    on: Sequence[str] | None = None,
    cluster: str | None = None,
    confidence_level: float = 0.95,
    method: str = "BCa",
    n_resamples: int = 9999,
    random_state: int | np.random.Generator = 0,
    include_errors: bool = False,
) -> PairedRatio:
    """Paired ratio of means ``mean(baseline) / mean(candidate)`` of ``metric``, with a bootstrap CI.

    Rows are those of ``requests`` whose ``system_column`` (``"system"``; ``"method"`` for a
    grid's variants) is ``candidate`` or ``baseline``; each candidate row is paired with the
    baseline row that has the same values in ``on`` (default: those of ``prompt_id``,
    ``request_id``, ``seed`` that the frame has). Within each system these must be unique:
    rows from several conditions (networks, pairs...) raise :class:`PairingError` naming the
    column that varies; compare within one with :func:`paired_ratios`. Rows with no partner
    are left out and counted (``n_unpaired``); pairs where either side failed (``error``
    set, unless ``include_errors``) or has a null metric are left out and counted
    (``n_excluded``). The result does not depend on the rows' order.

    The interval resamples the pairs (prompts x repeats) with replacement, the two figures of
    a pair together (``paired=True``). With ``cluster`` (a key column, e.g. ``"prompt_id"``)
    the pairs are first averaged within each cluster and the clusters are resampled: use it
    when the repeats of one prompt are too alike to count as independent.

    ``method="BCa"`` (the default): the ratio of two means is a biased estimator whose
    sampling distribution is skewed when the candidate's mean is uncertain; the BCa interval
    corrects for both bias and skew (second-order accurate coverage), where the percentile
    interval is only first-order accurate and keeps the skew's bias. Its jackknife costs
    O(n^2) work (memory is bounded by batching). Where BCa is undefined the percentile
    interval of the same resamples is given (``method`` says which was used).
    """
    keys = list(on) if on is not None else [k for k in DEFAULT_PAIR_KEYS if k in requests.columns]
    if not keys:
        raise PairingError(f"no pairing keys: the requests have none of {DEFAULT_PAIR_KEYS} (pass on=[...])")
    if candidate == baseline:
        raise PairingError(f"candidate and baseline are both {candidate!r}")
    if cluster is not None and cluster not in keys:
        raise PairingError(f"cluster {cluster!r} must be one of the pairing keys {keys}")
    _require(requests, [system_column, metric, *keys])
    pairs, ok, n_unpaired = _pair(requests, metric, candidate, baseline, system_column, keys, include_errors)
    used = pairs[ok]
    n_excluded = int((~ok).sum())
    if cluster is not None:
        used = used.groupby(cluster, sort=True, dropna=False)[["_b", "_c"]].mean()
    b, c = used["_b"].to_numpy(dtype=float), used["_c"].to_numpy(dtype=float)
    if len(c) and np.mean(c) == 0:
        estimate, low, high, used_method = math.nan, math.nan, math.nan, method
        note = "the candidate's mean is 0: no ratio"
    else:
        estimate, low, high, used_method, note = bootstrap_interval(
            (b, c), ratio_of_means, paired=True, confidence_level=confidence_level, method=method,
            n_resamples=n_resamples, random_state=random_state)
    return PairedRatio(
        metric=metric, candidate=candidate, baseline=baseline, estimate=estimate, low=low, high=high,
        confidence_level=confidence_level, n_pairs=int(ok.sum()), n_units=len(c), n_unpaired=n_unpaired,
        n_excluded=n_excluded, method=used_method, verdict=_verdict(low, high), note=note,
    )


def _groups(requests: pd.DataFrame, by: Sequence[str]):
    if not by:
        yield (), requests
        return
    for values, rows in requests.groupby(list(by), sort=True, dropna=False):
        yield (values if isinstance(values, tuple) else (values,)), rows


def paired_ratios(
    requests: pd.DataFrame,
    metric: str,
    candidate: str,
    baseline: str,
    by: Sequence[str],
    *,
    system_column: str = "system",
    **kwargs,
) -> pd.DataFrame:
    """:func:`paired_ratio` within each group of ``by`` (e.g. ``["network"]``), one row per group.

    Columns: the ``by`` columns, then the fields of :class:`PairedRatio` (``verdict`` as its
    text) and ``distinguishable``. A group lacking either system gets a row with no figures
    and a note. Other keyword arguments go to :func:`paired_ratio`.
    """
    by = list(by)
    _require(requests, [system_column, *by])
    rows = []
    for values, group in _groups(requests, by):
        present = set(group[system_column].dropna())
        missing = [s for s in (candidate, baseline) if s not in present]
        if missing:
            result = PairedRatio(metric, candidate, baseline, math.nan, math.nan, math.nan,
                                 kwargs.get("confidence_level", 0.95), 0, 0, 0, 0, "none",
                                 Verdict.INDISTINGUISHABLE, f"no rows of {', '.join(missing)} here")
        else:
            result = paired_ratio(group, metric, candidate, baseline, system_column=system_column, **kwargs)
        record = asdict(result)
        record["verdict"] = result.verdict.value
        record["distinguishable"] = result.distinguishable
        rows.append({**dict(zip(by, values)), **record})
    return pd.DataFrame(rows)


_STATS: dict[str, Callable[..., np.ndarray]] = {"median": np.median, "mean": np.mean}


def summarise(
    requests: pd.DataFrame,
    metric: str,
    by: Sequence[str] = ("system",),
    *,
    stat: str = "median",
    confidence_level: float = 0.95,
    method: str | None = None,
    n_resamples: int = 9999,
    random_state: int | np.random.Generator = 0,
    include_errors: bool = False,
) -> pd.DataFrame:
    """One metric per group for tables: its median (or mean) with a bootstrap CI.

    One row per group of ``by``: the ``by`` columns, ``metric``, ``stat``, ``n`` (rows used),
    ``n_excluded`` (rows left out: failed, unless ``include_errors``, or a null metric),
    ``estimate``, ``low``, ``high``, ``confidence_level``, ``method``, ``note``.

    ``method`` defaults to ``"percentile"`` for the median and ``"BCa"`` for the mean: the
    bootstrap distribution of a median is lumpy (it takes only a few distinct values) and the
    jackknife, which BCa uses for its acceleration, is inconsistent for the median, while
    the mean is smooth and BCa's bias and skew correction helps there.
    """
    if stat not in _STATS:
        raise ValueError(f"stat must be one of {sorted(_STATS)}, got {stat!r}")
    method = method or ("percentile" if stat == "median" else "BCa")
    by = list(by)
    _require(requests, [metric, *by])
    _values(requests.iloc[:0], metric)  # numeric, or a clear error
    rows = []
    for values, group in _groups(requests, by):
        x = _values(group, metric)
        keep = _usable(group, include_errors) & np.isfinite(x)
        estimate, low, high, used, note = bootstrap_interval(
            (x[keep],), _STATS[stat], confidence_level=confidence_level, method=method,
            n_resamples=n_resamples, random_state=random_state)
        rows.append({**dict(zip(by, values)), "metric": metric, "stat": stat, "n": int(keep.sum()),
                     "n_excluded": int((~keep).sum()), "estimate": estimate, "low": low, "high": high,
                     "confidence_level": confidence_level, "method": used, "note": note})
    columns = [*by, "metric", "stat", "n", "n_excluded", "estimate", "low", "high", "confidence_level",
               "method", "note"]
    return pd.DataFrame(rows, columns=columns)


__all__ = [
    "DEFAULT_PAIR_KEYS", "PairedRatio", "PairingError", "Verdict", "bootstrap_interval", "paired_ratio",
    "paired_ratios", "ratio_of_means", "summarise",
]
