"""Many edges sharing one cloud: SLO attainment, goodput, capacity, wasted drafting, and what the
cloud's recorded batches say about its scheduler, from the records only.

    requests, rounds = load_runs("results/wisp_capacity")
    table = sweep_table(requests, slo=SLO.parse("ttft:500,tpot:100"))   # one row per system and N
    caps = capacities(table)                                             # largest N meeting 90%
    ratios = paper_ratios(table, caps, clock_kind(requests))             # WISP/centralized, WISP/SLED
    batches = load_batches("results/wisp_capacity")
    estimator_error(batches); non_fcfs_summary(batches); refused_admissions(batches)

**Whose SLO.** A request that carries its own objectives (``slo_ttft_s`` / ``slo_tpot_s``, set
by the workload) is judged by its recorded ``slo_met``. A request without one is judged against
the ``slo`` passed here (``--slo``), with :func:`analysis.metrics.slo_met`'s rule (TTFT within the
limit, TPOT within its limit when the request has one; a failed request misses), which is the
harness's rule for requests that finished. A request with neither is left out of attainment.

**Serving period.** The requests of one run, system and network share one clock: the period
runs from the first request's arrival (its start under a closed loop) to the last request's
end (the *makespan*). Goodput = output tokens of the requests that met their SLO / makespan;
throughput = output tokens of all requests / makespan (tokens per second). A row pooling
several periods (one system at one N over several runs) divides by the sum of their makespans.
Per edge device, the tokens are that device's and the time is the whole period's, so the
devices' goodputs add up to the run's.

**Capacity** of a system = the largest number of edges N whose attainment is at least the
threshold (0.9 by default) with every smaller N tested meeting it too; None ("none") when the
smallest N tested already misses.

Times follow the records' clock: *modelled* in virtual time, *measured* on the wall clock.
Nothing is re-run; of ``harness`` only the records' readers are used.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import metrics as M
from analysis.load import labelled_runs
from harness.results import load_batches as _load_run_batches
from systems.records import BatchRecord

DEFAULT_THRESHOLD = 0.9
WISP, CENTRALIZED, SLED = "wisp", "centralized", "sled"
#: requests sharing one clock: one serving period (those columns present are used)
PERIOD_KEYS = ("run", "system", "network")
RUN_KEYS = ("run", "system", "network", "n_edges")
SWEEP_KEYS = ("system", "n_edges")
ALL_DEVICES = "all"
SLO_COLUMNS = ("slo_ttft_s", "slo_tpot_s")
#: WISP's published ratios (papers.md §3 (f), [P]): WISP over each baseline
PAPER_RATIOS: dict[str, dict[str, float]] = {"goodput": {CENTRALIZED: 1.94, SLED: 3.7},
                                             "capacity": {CENTRALIZED: 2.1, SLED: 4.1}}
PAPER_SOURCE = ("WISP (Li et al., POMACS/SIGMETRICS 2026, arXiv 2601.11652), abstract and body: "
                "Qwen3-32B on an A100 80 GB")
METRIC_COLUMNS = ("requests", "with_slo", "met", "attainment", "tokens", "good_tokens", "makespan_s", "goodput",
                  "throughput", "wasted_tokens_per_request", "wasted_j_per_request", "wasted_j_kind")


# ---- which records ------------------------------------------------------------------------------


def has_many_edges(requests: pd.DataFrame) -> bool:
    """Whether the rows come from runs of several edges (``n_edges`` > 1) or carry an SLO of
    their own: the records this module is for."""
    if "n_edges" in requests.columns and (pd.to_numeric(requests["n_edges"], errors="coerce") > 1).any():
        return True
    return any(c in requests.columns and requests[c].notna().any() for c in SLO_COLUMNS)


def clock_kind(requests: pd.DataFrame, manifests: Mapping[str, Mapping] | None = None) -> str:
    """``"modelled"`` (virtual clock), ``"measured"`` (wall clock), ``"measured and modelled"``
    or ``"unknown"``: from the rows' ``clock`` column, else from the manifests' ``clock``."""
    from analysis.figures import time_provenance  # figures imports this module: no import cycle

    kind = time_provenance(requests)
    if kind == "unknown" and manifests:
        kind = time_provenance(pd.DataFrame({"clock": [m.get("clock") for m in manifests.values()]}))
    return kind


# ---- per request --------------------------------------------------------------------------------


def request_slo_met(requests: pd.DataFrame, slo: M.SLO | None = None) -> pd.Series:
    """Per request (aligned with ``requests``, nullable boolean): whether it met its SLO; the
    recorded ``slo_met`` where the request carries objectives, else judged against ``slo``
    (:func:`analysis.metrics.slo_met`), else NA (no SLO: left out of attainment)."""
    out = pd.Series(pd.NA, index=requests.index, dtype="boolean")
    own = pd.Series(False, index=requests.index)
    for column in SLO_COLUMNS:
        if column in requests.columns:
            own |= requests[column].notna()
    if own.any():
        recorded = requests["slo_met"].astype("boolean") if "slo_met" in requests.columns \
            else pd.Series(pd.NA, index=requests.index, dtype="boolean")
        missing = own & recorded.isna()
        if missing.any():  # objectives without a verdict: judged by the request's own limits
            recorded = recorded.mask(missing, _own_verdict(requests.loc[missing]))
        out[own] = recorded[own].astype("boolean")
    if slo is not None and (~own).any():
        out[~own] = M.slo_met(requests.loc[~own], slo).astype("boolean")
    return out


def _own_verdict(requests: pd.DataFrame) -> pd.Series:
    """The harness's rule against each request's own limits: a first token within
    ``slo_ttft_s`` and, where the request has a TPOT, TPOT within ``slo_tpot_s``."""
    def column(name: str) -> pd.Series:
        return pd.to_numeric(requests[name], errors="coerce") if name in requests.columns \
            else pd.Series(np.nan, index=requests.index)

    ttft, tpot = column("ttft"), column("tpot")
    ttft_limit, tpot_limit = column("slo_ttft_s"), column("slo_tpot_s")
    ok = ttft.notna() & (ttft_limit.isna() | (ttft <= ttft_limit))
    ok &= tpot_limit.isna() | tpot.isna() | (tpot <= tpot_limit)
    return ok.astype("boolean")


def _prepared(requests: pd.DataFrame, slo: M.SLO | None) -> pd.DataFrame:
    frame = requests.copy()
    frame["_met"] = request_slo_met(requests, slo)
    frame["_tokens"] = pd.to_numeric(frame["n_tokens"], errors="coerce").fillna(0)
    start = pd.to_numeric(frame["start"], errors="coerce")
    arrival = pd.to_numeric(frame["arrival"], errors="coerce") if "arrival" in frame.columns else start
    frame["_begin"] = arrival.where(arrival.notna(), start)
    frame["_end"] = pd.to_numeric(frame["end"], errors="coerce")
    drafted = pd.to_numeric(frame.get("drafted", 0), errors="coerce")
    accepted = pd.to_numeric(frame.get("accepted", 0), errors="coerce")
    frame["_wasted"] = drafted - accepted
    frame["_wasted_j"] = pd.to_numeric(frame["energy_wasted_j"], errors="coerce") \
        if "energy_wasted_j" in frame.columns else np.nan
    frame["_wasted_kind"] = frame["energy_edge_kind"] if "energy_edge_kind" in frame.columns else None
    period = [k for k in PERIOD_KEYS if k in frame.columns]
    frame["_period"] = frame.groupby(period, dropna=False, sort=False).ngroup() if period else 0
    span = frame.groupby("_period")["_end"].transform("max") - frame.groupby("_period")["_begin"].transform("min")
    frame["_makespan"] = span
    if "edge_device" not in frame.columns:
        frame["edge_device"] = None
    return frame


def _figures(rows: pd.DataFrame) -> dict:
    """The metrics of one group of prepared rows (see the module's rules)."""
    makespan = float(rows.drop_duplicates("_period")["_makespan"].sum())
    judged = rows["_met"].notna()
    with_slo = int(judged.sum())
    met_rows = rows["_met"].fillna(False).astype(bool)
    met = int(met_rows.sum())
    tokens = float(rows["_tokens"].sum())
    good = float(rows.loc[met_rows, "_tokens"].sum())
    per_second = makespan > 0
    wasted_j = rows.loc[rows["_wasted_j"].notna()]
    kinds = sorted({k for k in wasted_j["_wasted_kind"] if isinstance(k, str)})
    if len(kinds) > 1:  # measured and estimated joules are never pooled
        mean_j, kind = float("nan"), " and ".join(kinds) + " (not pooled)"
    else:
        mean_j = float(wasted_j["_wasted_j"].mean()) if len(wasted_j) else float("nan")
        kind = kinds[0] if kinds else ("unknown" if len(wasted_j) else "none")
    wasted = rows["_wasted"].dropna()
    return {"requests": len(rows), "with_slo": with_slo, "met": met,
            "attainment": met / with_slo if with_slo else float("nan"),
            "tokens": tokens, "good_tokens": good, "makespan_s": makespan,
            "goodput": good / makespan if per_second and with_slo else float("nan"),
            "throughput": tokens / makespan if per_second else float("nan"),
            "wasted_tokens_per_request": float(wasted.mean()) if len(wasted) else float("nan"),
            "wasted_j_per_request": mean_j, "wasted_j_kind": kind}


def metrics_table(requests: pd.DataFrame, slo: M.SLO | None = None, *, by: Sequence[str] = RUN_KEYS,
                  per_device: bool = True) -> pd.DataFrame:
    """One row per group of ``by`` (those columns present) with ``edge_device`` = ``"all"``, then
    (``per_device``) one row per edge device profile in it: ``requests``, ``with_slo`` (requests
    judged against an SLO), ``met``, ``attainment`` (met / with_slo), ``tokens``, ``good_tokens``
    (output tokens of requests that met their SLO), ``makespan_s``, ``goodput`` and
    ``throughput`` (tokens/s), ``wasted_tokens_per_request`` (mean drafted - accepted),
    ``wasted_j_per_request`` (mean ``energy_wasted_j`` of the requests that have one) with
    ``wasted_j_kind`` (estimated / measured; two kinds are not pooled: NaN); and ``clock``."""
    frame = _prepared(requests, slo)
    by = [c for c in by if c in frame.columns]
    rows = []
    groups = frame.groupby(by, dropna=False, sort=True) if by else [((), frame)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        ident = dict(zip(by, key))
        clock = clock_kind(group)
        rows.append({**ident, "edge_device": ALL_DEVICES, **_figures(group), "clock": clock})
        if per_device:
            for device, mine in group.groupby("edge_device", dropna=False, sort=True):
                rows.append({**ident, "edge_device": device, **_figures(mine), "clock": clock})
    return pd.DataFrame(rows, columns=[*by, "edge_device", *METRIC_COLUMNS, "clock"])


def run_metrics(requests: pd.DataFrame, slo: M.SLO | None = None, *, per_device: bool = True) -> pd.DataFrame:
    """Per run (one system at one N on one network): :func:`metrics_table` by :data:`RUN_KEYS`,
    overall and per edge device profile."""
    return metrics_table(requests, slo, by=RUN_KEYS, per_device=per_device)


def sweep_table(requests: pd.DataFrame, slo: M.SLO | None = None, *, by: Sequence[str] = SWEEP_KEYS) -> pd.DataFrame:
    """Across a sweep: one row per system and number of edges (``by``), all edge devices
    together (:func:`metrics_table`; several runs at one point pool their tokens over the sum
    of their makespans), sorted by system then N."""
    table = metrics_table(requests, slo, by=by, per_device=False)
    return table.sort_values([c for c in by if c in table.columns], kind="stable").reset_index(drop=True)


# ---- capacity and the papers' ratios ------------------------------------------------------------


def capacity_label(value: object, attainment_known: bool = True, held_at_every_n: bool = False) -> str:
    """A capacity in words: the number (``">= N"`` when every N tested held, so the true
    capacity may be larger), ``"none"`` (the smallest N tested misses), or ``"n/a (no SLO)"``."""
    if not attainment_known:
        return "n/a (no SLO)"
    if value is None or pd.isna(value):
        return "none"
    return f">= {int(value)}" if held_at_every_n else str(int(value))


def capacities(table: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Per system of a :func:`sweep_table`: ``capacity`` = the largest N whose attainment is
    >= ``threshold`` with every smaller N tested meeting it too (NA when the smallest misses:
    ``capacity_label`` "none"; NA with "n/a (no SLO)" when no N has an attainment);
    ``first_miss`` (the smallest N below the threshold, NA if none) and ``tested`` (the Ns)."""
    rows = []
    for system, mine in table.groupby("system", sort=True):
        mine = mine.sort_values("n_edges", kind="stable")
        known = bool(mine["attainment"].notna().any())
        capacity, first_miss = None, None
        for n, att in zip(mine["n_edges"], mine["attainment"]):
            if pd.notna(att) and att >= threshold:
                capacity = int(n)
            else:  # a miss (or no SLO judged at this N) ends the run of Ns that hold
                first_miss = int(n)
                break
        rows.append({"system": system, "capacity": capacity, "first_miss": first_miss,
                     "tested": ", ".join(str(int(n)) for n in mine["n_edges"]),
                     "capacity_label": capacity_label(capacity, known, capacity is not None and first_miss is None),
                     "threshold": threshold})
    out = pd.DataFrame(rows, columns=["system", "capacity", "first_miss", "tested", "capacity_label", "threshold"])
    for column in ("capacity", "first_miss"):
        out[column] = out[column].astype("Int64")
    return out


def capacity_table(requests: pd.DataFrame, slo: M.SLO | None = None,
                   threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """The :func:`sweep_table` with each system's ``capacity`` (its label: a number, "none" or
    "n/a (no SLO)") and the ``threshold``: what the report writes as ``capacity.csv``."""
    table = sweep_table(requests, slo)
    caps = capacities(table, threshold).set_index("system")
    return table.assign(capacity=[caps.loc[s, "capacity_label"] for s in table["system"]], threshold=threshold)


def _at(table: pd.DataFrame, system: str, n: int) -> float:
    rows = table[(table["system"] == system) & (table["n_edges"] == n)]
    return float(rows["goodput"].iloc[0]) if len(rows) else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if pd.notna(a) and pd.notna(b) and b > 0 else float("nan")


def _capacity_of(caps: pd.DataFrame, system: str) -> tuple[float, str]:
    """(capacity as a number, NaN for none; its label) of ``system`` in :func:`capacities` by system."""
    if system not in caps.index:
        return float("nan"), "n/a"
    value = caps.loc[system, "capacity"]
    return (float(value) if pd.notna(value) else float("nan")), caps.loc[system, "capacity_label"]


def paper_ratios(table: pd.DataFrame, caps: pd.DataFrame, clock: str, *, wisp: str = WISP,
                 baselines: Sequence[str] = (CENTRALIZED, SLED)) -> pd.DataFrame:
    """WISP over each baseline present, beside the paper's ratio (:data:`PAPER_RATIOS`): goodput
    at the N where WISP's goodput peaks (both systems at that same N), goodput each at its own
    peak, and capacity. Columns ``metric``, ``versus``, ``ours``, ``basis`` (which N), ``paper``
    and ``ours_are`` (``clock``: modelled or measured). Empty when WISP did not run."""
    columns = ["metric", "versus", "ours", "basis", "paper", "ours_are"]
    present = set(table["system"])
    if wisp not in present:
        return pd.DataFrame(columns=columns)
    caps = caps.set_index("system")
    mine = table[(table["system"] == wisp) & table["goodput"].notna()]
    peak_n = int(mine.loc[mine["goodput"].idxmax(), "n_edges"]) if len(mine) else None
    rows = []
    for other in (b for b in baselines if b in present):
        theirs = table[(table["system"] == other) & table["goodput"].notna()]
        paper = PAPER_RATIOS["goodput"].get(other, float("nan"))
        if peak_n is None:
            rows.append({"metric": "goodput", "versus": other, "ours": float("nan"),
                         "basis": f"no {wisp} goodput (no SLO judged)", "paper": paper, "ours_are": clock})
        else:
            basis = f"at N={peak_n} (WISP's goodput peak), both at equal N"
            if pd.isna(_at(table, other, peak_n)):
                basis += f" (no {other} goodput at N={peak_n})"
            rows.append({"metric": "goodput", "versus": other, "basis": basis, "paper": paper, "ours_are": clock,
                         "ours": _ratio(_at(table, wisp, peak_n), _at(table, other, peak_n))})
            if len(theirs):
                other_n = int(theirs.loc[theirs["goodput"].idxmax(), "n_edges"])
                rows.append({"metric": "goodput", "versus": other,
                             "ours": _ratio(float(mine["goodput"].max()), float(theirs["goodput"].max())),
                             "basis": f"each at its own peak (WISP N={peak_n}, {other} N={other_n})",
                             "paper": paper, "ours_are": clock})
        (a, la), (b, lb) = _capacity_of(caps, wisp), _capacity_of(caps, other)
        threshold = caps.loc[wisp, "threshold"] if wisp in caps.index else DEFAULT_THRESHOLD
        rows.append({"metric": "capacity", "versus": other, "ours": _ratio(a, b),
                     "basis": f"capacities: WISP {la}, {other} {lb} (edges at attainment >= {threshold:g})"
                              + ("; a capacity marked >= held at every N tested, so this ratio is a bound"
                                 if la.startswith(">=") or lb.startswith(">=") else ""),
                     "paper": PAPER_RATIOS["capacity"].get(other, float("nan")), "ours_are": clock})
    return pd.DataFrame(rows, columns=columns)


# ---- the cloud's batches ------------------------------------------------------------------------


#: the passes per run the report's scheduler analyses read (a fleet's thousands of edges record
#: hundreds of megabytes of passes; the first ones show the scheduler as well)
MAX_PASSES_PER_RUN = 20_000


def load_batches(paths: str | os.PathLike | Iterable[str | os.PathLike],
                 max_per_run: int | None = None) -> pd.DataFrame:
    """The recorded batches (``batches.jsonl``) of every run found at ``paths`` (run folders or
    sweeps, as :func:`analysis.load.load_runs` finds them), one after another, each row with
    its ``run`` label; empty (with the record's columns and ``run``) when none recorded any.
    ``max_per_run``: only each run's first passes; ``frame.attrs["capped"]`` then lists the
    runs cut short as ``{label: (kept, total)}``."""
    frames, capped = [], {}
    for run_dir, label in labelled_runs(paths).items():
        frame = _load_run_batches(run_dir, max_rows=max_per_run)
        total = frame.attrs.get("passes_total")
        if total is not None and total > len(frame):
            capped[label] = (len(frame), total)
        if len(frame):
            frames.append(frame.assign(run=label))
    if not frames:
        out = pd.DataFrame(columns=[*(f.name for f in dataclasses.fields(BatchRecord)), "run"])
    else:
        out = pd.concat(frames, ignore_index=True, sort=False)
    out.attrs["capped"] = capped
    return out


def _extra(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def estimator_errors(batches: pd.DataFrame, *, held_out: bool = True, min_index: int | None = None) -> pd.DataFrame:
    """The batches the policy predicted (``predicted_s`` not null, ``actual_s`` > 0), each with
    ``error`` = |predicted - actual| / actual. ``held_out``: leave out the batches the estimator
    was fitted on (``extra["fitted"]`` true); ``min_index``: keep only batches of that index or
    later (a threshold for records that do not mark the fitted ones)."""
    if batches.empty or "predicted_s" not in batches.columns:
        return batches.assign(error=pd.Series(dtype=float))
    predicted = pd.to_numeric(batches["predicted_s"], errors="coerce")
    actual = pd.to_numeric(batches["actual_s"], errors="coerce")
    keep = predicted.notna() & (actual > 0)
    if held_out and "extra" in batches.columns:
        keep &= ~batches["extra"].map(lambda e: bool(_extra(e).get("fitted", False))).astype(bool)
    if min_index is not None:
        keep &= pd.to_numeric(batches["index"], errors="coerce") >= min_index
    rows = batches[keep]
    return rows.assign(error=((predicted[keep] - actual[keep]).abs() / actual[keep]).astype(float))


def estimator_error(batches: pd.DataFrame, *, held_out: bool = True, min_index: int | None = None,
                    by: Sequence[str] = ("system",)) -> pd.DataFrame:
    """Per group of ``by``: ``count`` of predicted batches (:func:`estimator_errors`' choice),
    and the ``median`` and ``p90`` (90th percentile, linear interpolation) of the relative error
    |predicted - actual| / actual; ``fitted_excluded``: batches left out as fitted on."""
    errors = estimator_errors(batches, held_out=held_out, min_index=min_index)
    by = [c for c in by if c in errors.columns]
    fitted = batches["extra"].map(lambda e: bool(_extra(e).get("fitted", False))) \
        if held_out and "extra" in batches.columns and len(batches) else pd.Series(False, index=batches.index)
    rows = []
    for key, group in (errors.groupby(by, dropna=False, sort=True) if by else [((), errors)]):
        key = key if isinstance(key, tuple) else (key,)
        mask = pd.Series(True, index=batches.index)
        for column, value in zip(by, key):
            mask &= batches[column] == value
        e = group["error"].to_numpy(dtype=float)
        rows.append({**dict(zip(by, key)), "count": len(e),
                     "median": float(np.median(e)) if len(e) else float("nan"),
                     "p90": float(np.percentile(e, 90)) if len(e) else float("nan"),
                     "fitted_excluded": int((fitted & mask).sum())})
    return pd.DataFrame(rows, columns=[*by, "count", "median", "p90", "fitted_excluded"])


def _members(batches: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per batch member (``group``: the run's keys, ``batch``, ``start``, ``session``,
    ``round``, ``arrived``) and the names of the keys in ``group``."""
    rows = []
    group_keys = [c for c in ("run", "system", "network") if c in batches.columns]
    for rec in batches.to_dict("records"):
        group = tuple(rec[k] for k in group_keys)
        rounds = rec.get("rounds") or [None] * len(rec["sessions"])
        for session, rnd, arrived in zip(rec["sessions"], rounds, rec["arrived"]):
            rows.append({"group": group, "batch": int(rec["index"]), "start": float(rec["start"]),
                         "session": session, "round": rnd, "arrived": arrived})
    return pd.DataFrame(rows, columns=["group", "batch", "start", "session", "round", "arrived"]), group_keys


def _taken_up(mine: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """One group's pieces of work (session, round, arrived), each with the batch that first
    held it (``served``), and each batch's start."""
    work = mine.groupby(["session", "round", "arrived"], dropna=False, sort=False)["batch"].min().reset_index()
    return work.rename(columns={"batch": "served"}), mine.groupby("batch")["start"].first().sort_index()


def _overtaken(arrived: np.ndarray, served: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """For each piece of work i: how many pieces j were served in a later batch although they
    arrived before ``limit[i]`` (i's arrival, or its batch's start where that is earlier).
    Batches are taken latest first, counting in a Fenwick tree over the arrivals' ranks the
    work served after them, so the cost is (work) x log(work), not (batches) x (work)."""
    values = np.unique(arrived)
    rank = np.searchsorted(values, arrived) + 1  # 1-based positions in the tree
    bound = np.searchsorted(values, limit, side="left")  # how many distinct arrivals lie below the limit
    tree = np.zeros(len(values) + 1, dtype=np.int64)
    counts = np.zeros(len(arrived), dtype=np.int64)
    order = np.argsort(-served, kind="stable")
    edges = np.flatnonzero(np.diff(served[order])) + 1
    for group in np.split(order, edges):
        for i in group:
            k, total = int(bound[i]), 0
            while k > 0:
                total += tree[k]
                k -= k & -k
            counts[i] = total
        for i in group:
            k = int(rank[i])
            while k < len(tree):
                tree[k] += 1
                k += k & -k
    return counts


def non_fcfs_summary(batches: pd.DataFrame) -> pd.DataFrame:
    """Evidence that a scheduler is not first-come first-served, counted without listing every
    pair (a saturated verifier's queue makes millions): per run (``run``/``system``/``network``,
    those recorded), the batches that took work ahead of earlier-arrived work still waiting,
    the number of such (later, waiting) pairs (:func:`non_fcfs_pairs` lists them), and the first
    pair as :func:`non_fcfs_pairs` gives it (``example``: None when there is none)."""
    members, group_keys = _members(batches)
    members = members[pd.to_numeric(members["arrived"], errors="coerce").notna()]
    rows = []
    for group, mine in members.groupby("group", sort=False):
        work, starts = _taken_up(mine)
        arrived, served = work["arrived"].to_numpy(dtype=float), work["served"].to_numpy()
        start = starts.reindex(served).to_numpy(dtype=float)
        limit = np.minimum(arrived, np.nextafter(start, np.inf))  # arrived before i and before i's batch began
        counts = _overtaken(arrived, served, limit)
        example = None
        if counts.any():
            first = int(served[counts > 0].min())
            i, j = next(_pairs_in(first, starts[first], arrived, served))
            example = _pair_row(work, arrived, served, first, i, j)
        rows.append({**dict(zip(group_keys, group)), "batches": int(len(np.unique(served[counts > 0]))),
                     "pairs": int(counts.sum()), "example": example})
    return pd.DataFrame(rows, columns=[*group_keys, "batches", "pairs", "example"])


def _pairs_in(batch: int, start: float, arrived: np.ndarray, served: np.ndarray):
    """The (later, waiting) pairs of one batch, as indices into the work, in the work's order."""
    new = np.flatnonzero(served == batch)
    waiting = np.flatnonzero((served > batch) & (arrived <= start))
    if len(new) and len(waiting):
        for i in new:
            for j in waiting[arrived[waiting] < arrived[i]]:
                yield int(i), int(j)


def _pair_row(work: pd.DataFrame, arrived: np.ndarray, served: np.ndarray, batch: int, i: int, j: int) -> dict:
    return {"batch": int(batch), "later": work.at[i, "session"], "later_arrived": float(arrived[i]),
            "waiting": work.at[j, "session"], "waiting_arrived": float(arrived[j]), "waiting_batch": int(served[j])}


def non_fcfs_pairs(batches: pd.DataFrame, max_pairs: int | None = None) -> pd.DataFrame:
    """Evidence that a scheduler is not first-come first-served: each ``(later, waiting, batch)``
    where batch ``batch`` took up work of session ``later`` that reached the cloud after work of
    session ``waiting`` which had arrived before the batch started and was served only in a
    later batch (``waiting_batch``). A piece of work is (session, round, arrived), taken up in
    the first batch holding it (a decode stream stays in later batches without counting again).
    Columns: the run's ``run``/``system``/``network`` (those recorded), ``batch``, ``later``,
    ``later_arrived``, ``waiting``, ``waiting_arrived``, ``waiting_batch``; at most ``max_pairs``.
    The pairs grow with the square of a queue's length:
    :func:`non_fcfs_summary` counts them."""
    members, group_keys = _members(batches)
    columns = [*group_keys, "batch", "later", "later_arrived", "waiting", "waiting_arrived", "waiting_batch"]
    members = members[pd.to_numeric(members["arrived"], errors="coerce").notna()]
    out = []
    for group, mine in members.groupby("group", sort=False):
        work, starts = _taken_up(mine)
        arrived = work["arrived"].to_numpy(dtype=float)
        served = work["served"].to_numpy()
        for batch, start in starts.items():
            for i, j in _pairs_in(batch, start, arrived, served):
                out.append({**dict(zip(group_keys, group)), **_pair_row(work, arrived, served, batch, i, j)})
                if max_pairs is not None and len(out) >= max_pairs:
                    return pd.DataFrame(out, columns=columns)
    return pd.DataFrame(out, columns=columns)


def refused_admissions(batches: pd.DataFrame) -> pd.DataFrame:
    """One row per session the policy refused to admit to a batch (``extra["refused"]``, the
    estimator said admitting it would make an admitted member miss its deadline): the run's
    ``run``/``system``/``network`` (those recorded), ``batch`` and ``session``."""
    keys = [c for c in ("run", "system", "network") if c in batches.columns]
    rows = []
    if "extra" in batches.columns:
        for rec in batches.to_dict("records"):
            for session in _extra(rec["extra"]).get("refused") or []:
                rows.append({**{k: rec[k] for k in keys}, "batch": int(rec["index"]), "session": session})
    return pd.DataFrame(rows, columns=[*keys, "batch", "session"])


__all__ = [
    "ALL_DEVICES", "CENTRALIZED", "DEFAULT_THRESHOLD", "PAPER_RATIOS", "PAPER_SOURCE", "SLED", "WISP",
    "capacities", "capacity_label", "capacity_table", "clock_kind", "estimator_error", "estimator_errors",
    "has_many_edges", "load_batches", "metrics_table", "non_fcfs_pairs", "non_fcfs_summary", "paper_ratios",
    "refused_admissions", "request_slo_met", "run_metrics", "sweep_table",
]
