"""Which system to pick where: per network point (RTT x uplink bandwidth), the system that is
best on an objective, and by how much it beats the runner-up.

    requests, rounds = load_runs(["results/sweep"])
    table = decision_table(requests, rounds, "latency")
    fig = decision_map(requests, rounds, "latency")

Objectives (:data:`OBJECTIVES`; lower is better for each):

- ``latency``: time per output token (the requests' ``tpot``, seconds);
- ``cloud_time``: cloud busy time per output token (seconds): the verification compute of
  the request's rounds (``t_verify``), each pass shared equally among the sessions it
  verified together (``/ batch_size``), over the request's output tokens. A request that
  never reached the cloud (no rounds: edge-only) costs 0; a round whose ``t_verify`` is null
  makes the request's figure null. The prompt's prefill is not a round and is not counted;
- ``energy``: joules per output token, edge and cloud together (null unless both are known).

Any other numeric column of the requests may be named as the objective (lower is better).
A system's value at a point is the mean of its requests' per-request values there (failed
requests and null figures left out), the same mean the paired ratios of
:mod:`analysis.stats` compare. Nothing is re-run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis.figures import CAPTION_GID, RTT_COLUMN, UPLINK_COLUMN, energy_provenance, time_provenance
from analysis.stats import DEFAULT_PAIR_KEYS, PairingError, paired_ratio

VALUE_COLUMN = "objective_value"  # the per-request value, as objective_values names it
TIE_SEPARATOR = " = "  # joins the names of systems tied for best
TIE_COLOUR = "#d9d9d9"
# The columns that tell a request (and its rounds) apart across loaded runs.
_ROUND_KEYS = ("run", "system", "pair", "network", "workload", "prompt_id", "seed", "request_id", "attempt")


@dataclass(frozen=True)
class Objective:
    """A quantity to minimise: its ``name``, a ``label`` and ``unit`` (of its values, e.g.
    ``"s/token"``) for tables and figures, what it ``needs`` from the records (in words),
    ``per_request(requests, rounds)``, which returns one value per request row (aligned with
    ``requests.index``; NaN where the records cannot give it), and ``provenance(requests)``,
    which says whether those values are measured, modelled or estimated."""

    name: str
    label: str
    unit: str
    needs: str
    per_request: Callable[[pd.DataFrame, pd.DataFrame | None], pd.Series]
    provenance: Callable[[pd.DataFrame], str] = time_provenance


def _per_token(total: pd.Series, requests: pd.DataFrame) -> pd.Series:
    tokens = requests["n_tokens"].astype(float)
    return (total.astype(float) / tokens).where(tokens > 0)


def _require(frame: pd.DataFrame | None, columns: Sequence[str], what: str) -> None:
    if frame is None:
        raise ValueError(f"no {what} records given (needed: {', '.join(columns)})")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"the {what} records lack column(s) {', '.join(missing)}")


def latency_per_token(requests: pd.DataFrame, rounds: pd.DataFrame | None = None) -> pd.Series:
    """Time per output token of each request: its ``tpot`` (seconds), NaN where not recorded."""
    _require(requests, ["tpot"], "request")
    return requests["tpot"].astype(float)


def cloud_time_per_token(requests: pd.DataFrame, rounds: pd.DataFrame | None) -> pd.Series:
    """Cloud busy seconds per output token of each request: the sum over its rounds of
    ``t_verify / batch_size`` (a batched pass shared equally by the sessions it verified),
    over its ``n_tokens``. 0 for a request with no rounds (it never used the cloud); NaN when
    a round's ``t_verify`` is null, when fewer rounds are on record than the request counts,
    or when it produced no token."""
    _require(requests, ["request_id", "n_tokens", "rounds"], "request")
    _require(rounds, ["request_id", "t_verify", "batch_size"], "round")
    keys = [k for k in _ROUND_KEYS if k in requests.columns and k in rounds.columns]
    busy = rounds[keys].copy()
    busy["_busy"] = rounds["t_verify"].astype(float) / rounds["batch_size"].astype(float).clip(lower=1)
    grouped = busy.groupby(keys, dropna=False, sort=False)["_busy"]
    per = pd.DataFrame({"_sum": grouped.sum(), "_n": grouped.size(), "_null": grouped.apply(lambda s: s.isna().any())})
    merged = requests[keys].merge(per.reset_index(), on=keys, how="left")
    merged.index = requests.index
    n_rounds = requests["rounds"].astype(float)
    total = merged["_sum"].where(~merged["_null"].astype("boolean").fillna(False).astype(bool))
    total = total.where(merged["_n"].fillna(0).to_numpy() == n_rounds.to_numpy())  # all rounds on record
    total = total.where(n_rounds > 0, 0.0)  # no round at all: no cloud time
    return _per_token(total, requests)


def energy_per_token(requests: pd.DataFrame, rounds: pd.DataFrame | None = None) -> pd.Series:
    """Joules per output token of each request, edge and cloud together; NaN unless both
    roles' figures are recorded."""
    _require(requests, ["energy_edge_j", "energy_cloud_j", "n_tokens"], "request")
    total = requests["energy_edge_j"].astype(float) + requests["energy_cloud_j"].astype(float)
    return _per_token(total, requests)


def _energy_kinds(requests: pd.DataFrame) -> str:
    kinds = [k for c in ("energy_edge_kind", "energy_cloud_kind") if c in requests.columns
             for k in requests[c].dropna().unique()]
    return energy_provenance(kinds)


OBJECTIVES: dict[str, Objective] = {
    "latency": Objective("latency", "time per output token", "s/token", "requests with a tpot", latency_per_token),
    "cloud_time": Objective("cloud_time", "cloud busy time per output token", "s/token",
                            "rounds with their verification time (t_verify) and batch size", cloud_time_per_token),
    "energy": Objective("energy", "energy per output token (edge + cloud)", "J/token",
                        "requests with edge and cloud energy figures (energy=auto or estimate)", energy_per_token,
                        _energy_kinds),
}


def get_objective(name: str, requests: pd.DataFrame | None = None) -> Objective:
    """The :class:`Objective` called ``name``: one of :data:`OBJECTIVES`, or a numeric column of
    ``requests`` (its values as they are, lower is better). Raises ValueError otherwise."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    if requests is not None and name in requests.columns and pd.api.types.is_numeric_dtype(requests[name]):
        return Objective(name, name, "", f"a numeric {name} column",
                         lambda req, rnd: req[name].astype(float))
    raise ValueError(f"unknown objective {name!r}: use one of {', '.join(OBJECTIVES)} or a numeric request column")


def objective_values(requests: pd.DataFrame, rounds: pd.DataFrame | None, name: str) -> pd.Series:
    """The objective ``name``'s value for each request row (NaN where it cannot be had; failed
    requests, those whose ``error`` is set, are NaN too), aligned with ``requests.index``."""
    values = get_objective(name, requests).per_request(requests, rounds).astype(float)
    if "error" in requests.columns:
        values = values.where(requests["error"].isna())
    return values.where(np.isfinite(values)).rename(VALUE_COLUMN)


def _varying(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in frame.columns and frame[c].nunique(dropna=True) > 1]


def _check_unique(rows: pd.DataFrame, keys: list[str], point: dict) -> None:
    dup = rows[rows.duplicated(["system", *keys], keep=False)]
    if dup.empty:
        return
    hints = [c for c in dup.columns if str(c).startswith("config.") or c in ("run", "network")]
    varying = [c for c in hints if (dup.groupby(["system", *keys], dropna=False)[c].nunique(dropna=False) > 1).any()]
    raise ValueError(f"at {point} system {dup['system'].iloc[0]!r} answered the same prompt more than once; the "
                     f"runs differ in {', '.join(varying) or 'nothing recorded'}: filter the rows, or pass "
                     f"by=[...] to tell those points apart")


def decision_table(
    requests: pd.DataFrame,
    rounds: pd.DataFrame | None,
    objective: str = "latency",
    *,
    at: Sequence[str] = (RTT_COLUMN, UPLINK_COLUMN),
    by: Sequence[str] | None = None,
    rtol: float = 1e-9,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
) -> pd.DataFrame:
    """The best system on ``objective`` at each point of ``at`` (default: configured RTT and
    uplink rate), with its margin over the runner-up; one row per point, sorted.

    Columns: the ``at`` columns (then ``by``: default ``pair`` and ``workload`` where they
    vary), ``objective``, ``unit``, ``provenance``; ``best`` (the system with the lowest mean
    value there; systems within ``rtol`` of it are tied and all named, sorted and joined by
    ``" = "``), ``tied``, ``value`` (the best mean, in the objective's own units: seconds or
    joules per token); ``runner_up`` (the best system not named in ``best``; null when every
    system there ties) and ``runner_up_value``; ``margin`` = 1 - value / runner_up_value, the
    fraction of the runner-up's cost the best saves (0 to 1; NaN with no runner-up);
    ``ratio`` = runner_up_value / value (inf when the best costs nothing); ``margin_low``,
    ``margin_high`` and ``distinguishable``: the margin's paired bootstrap CI (the ratio's
    from :func:`analysis.stats.paired_ratio`, best against runner-up over the same prompts,
    mapped through 1 - 1/ratio) and whether it excludes 0 (NaN/False with ``n_resamples=0``
    or too few pairs); ``n_systems``; and ``value:<system>`` for every system (NaN where it
    has no usable request at that point).
    """
    spec = get_objective(objective, requests)
    at, by = list(at), (list(by) if by is not None else _varying(requests, ("pair", "workload")))
    _require(requests, ["system", *at, *by], "request")
    keys = [k for k in DEFAULT_PAIR_KEYS if k in requests.columns]
    frame = requests[["system", *at, *by, *keys]].copy()
    frame[VALUE_COLUMN] = objective_values(requests, rounds, objective)
    for c in [c for c in requests.columns if str(c).startswith("config.") or c in ("run", "network", "clock")]:
        if c not in frame.columns:
            frame[c] = requests[c]
    systems = sorted(map(str, frame["system"].dropna().unique()))
    rows = []
    for point, group in frame.groupby([*at, *by], sort=True, dropna=False):
        point = dict(zip([*at, *by], point if isinstance(point, tuple) else (point,)))
        _check_unique(group, keys, point)
        means = group.dropna(subset=[VALUE_COLUMN]).groupby("system")[VALUE_COLUMN].mean().sort_index()
        ranked = sorted(means.items(), key=lambda kv: (kv[1], kv[0]))
        row = {**point, "objective": spec.name, "unit": spec.unit, "provenance": spec.provenance(requests.loc[group.index])}
        row.update(_decide(ranked, rtol))
        row.update(_margin_ci(group, row, keys, confidence_level, n_resamples))
        row["n_systems"] = len(ranked)
        row.update({f"value:{s}": float(means.get(s, math.nan)) for s in systems})
        rows.append(row)
    columns = [*at, *by, "objective", "unit", "provenance", "best", "tied", "value", "runner_up", "runner_up_value",
               "margin", "ratio", "margin_low", "margin_high", "distinguishable", "n_systems",
               *(f"value:{s}" for s in systems)]
    return pd.DataFrame(rows, columns=columns)


def _decide(ranked: list[tuple[str, float]], rtol: float) -> dict:
    if not ranked:
        return {"best": None, "tied": False, "value": math.nan, "runner_up": None, "runner_up_value": math.nan,
                "margin": math.nan, "ratio": math.nan}
    value = ranked[0][1]
    winners = [s for s, v in ranked if math.isclose(v, value, rel_tol=rtol, abs_tol=0.0)]
    rest = [(s, v) for s, v in ranked if s not in winners]
    out = {"best": TIE_SEPARATOR.join(sorted(winners)), "tied": len(winners) > 1, "value": float(value),
           "runner_up": None, "runner_up_value": math.nan, "margin": math.nan, "ratio": math.nan}
    if rest:
        runner, other = rest[0]
        out.update(runner_up=runner, runner_up_value=float(other), margin=1.0 - value / other if other else math.nan,
                   ratio=other / value if value else math.inf)
    return out


def _margin_ci(group: pd.DataFrame, row: dict, keys: list[str], confidence_level: float, n_resamples: int) -> dict:
    none = {"margin_low": math.nan, "margin_high": math.nan, "distinguishable": False}
    if row["runner_up"] is None or n_resamples <= 0 or not keys:
        return none
    best = row["best"].split(TIE_SEPARATOR)[0]
    try:
        r = paired_ratio(group, VALUE_COLUMN, candidate=best, baseline=row["runner_up"], on=keys,
                         confidence_level=confidence_level, n_resamples=n_resamples)
    except PairingError:
        return none
    if not (math.isfinite(r.low) and math.isfinite(r.high)) or r.low <= 0:
        return none
    return {"margin_low": 1.0 - 1.0 / r.low, "margin_high": 1.0 - 1.0 / r.high, "distinguishable": r.low > 1}


# ---- the map ---------------------------------------------------------------------------------------


def _axis_label(column: str) -> str:
    return {RTT_COLUMN: "RTT, ms (configured)", UPLINK_COLUMN: "uplink, Mbit/s (configured)"}.get(column, column)


def _tick(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float, np.number)) else str(value)


def _within_noise(row: dict) -> bool:
    """Whether a point's margin was bootstrapped and its CI includes 0 (not shown when no CI was made)."""
    low, high = row.get("margin_low"), row.get("margin_high")
    return low is not None and high is not None and not pd.isna(low) and not pd.isna(high) and \
        not bool(row.get("distinguishable"))


def decision_map(
    requests: pd.DataFrame,
    rounds: pd.DataFrame | None,
    objective: str = "latency",
    *,
    table: pd.DataFrame | None = None,
    x: str = UPLINK_COLUMN,
    y: str = RTT_COLUMN,
    **options,
) -> Figure:
    """A heat map over ``y`` (rows; default the RTT) x ``x`` (columns; default the uplink rate):
    each cell coloured by the best system on ``objective`` there (ties in grey) and annotated
    with its name and margin over the runner-up (the fraction of the runner-up's cost it
    saves), from :func:`decision_table` (or the ``table`` given; other ``options`` go to
    :func:`decision_table`). A point with no data is left blank. Raises ValueError when the
    table has other grouping columns with several values (filter the rows first)."""
    spec = get_objective(objective, requests)
    if table is None:
        table = decision_table(requests, rounds, objective, at=(y, x), **options)
    extra = [c for c in table.columns if c not in (x, y) and c in ("pair", "workload") and table[c].nunique() > 1]
    if extra:
        raise ValueError(f"the decision table varies in {', '.join(extra)}: draw one map per value (filter the rows)")
    table = table[table["best"].notna()]
    if table.empty:
        raise ValueError(f"no system has a usable {spec.label} at any point")
    xs = sorted(table[x].dropna().unique())
    ys = sorted(table[y].dropna().unique())
    systems = sorted({s for b in table["best"] for s in b.split(TIE_SEPARATOR)})
    colours = [f"C{i % 10}" for i in range(len(systems))]
    codes = np.full((len(ys), len(xs)), np.nan)
    fig = Figure(figsize=(max(5.0, 1.6 * len(xs) + 2.5), max(3.5, 1.0 * len(ys) + 2.0)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in table.to_dict("records"):
        i, j = ys.index(r[y]), xs.index(r[x])
        codes[i, j] = len(systems) if r["tied"] else systems.index(r["best"])
        margin = "tie" if r["tied"] else ""
        if pd.notna(r["runner_up"]) and math.isfinite(r["margin"]):
            margin = (margin + " · " if margin else "") + f"saves {r['margin']:.0%} vs {r['runner_up']}"
            if _within_noise(r):
                margin += "\n(within noise)"
        name = r["best"].replace(TIE_SEPARATOR, " =\n")
        ax.text(j, i, f"{name}\n{margin}", ha="center", va="center", fontsize=7, gid=f"cell:{i}:{j}")
    ax.imshow(codes, cmap=ListedColormap([*colours, TIE_COLOUR]), vmin=-0.5, vmax=len(systems) + 0.5,
              origin="lower", aspect="auto", alpha=0.55)
    ax.set_xticks(range(len(xs)), [_tick(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_tick(v) for v in ys])
    ax.set_xticks(np.arange(len(xs) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(ys) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel(_axis_label(x))
    ax.set_ylabel(_axis_label(y))
    provenance = spec.provenance(requests)
    ax.set_title(f"Best system by {spec.label}: {provenance}", fontsize=9)
    handles = [Patch(facecolor=c, alpha=0.55, label=s) for s, c in zip(systems, colours)]
    if table["tied"].any():
        handles.append(Patch(facecolor=TIE_COLOUR, label="tie"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.text(0.01, 0.005, f"Cell colour: the system with the lowest mean {spec.label} at that point (lower is "
                          f"better); text: its saving over the runner-up, 1 - best / runner-up; \"within noise\": "
                          f"the saving's paired 95% bootstrap CI includes 0. Values are "
                          f"{provenance}.", fontsize=7, ha="left", va="bottom", wrap=True, gid=CAPTION_GID)
    fig.get_layout_engine().set(rect=(0, 0.08, 1, 0.92))
    return fig


def write_maps(paths: Sequence[str], out_dir: str, objectives: Sequence[str] = ("latency",), *,
               systems: Sequence[str] | None = None, n_resamples: int = 9999) -> list[str]:
    """For each objective, ``decision_map_<objective>.png`` and ``decision_table_<objective>.csv``
    in ``out_dir`` (created), from the runs at ``paths`` (only ``systems``' requests, when
    given); returns the written paths."""
    from pathlib import Path

    from analysis.figures import figure_png
    from analysis.load import load_runs

    requests, rounds = load_runs(paths)
    if systems:
        missing = sorted(set(systems) - set(requests["system"]))
        if missing:
            raise ValueError(f"no requests of {', '.join(missing)} in {', '.join(map(str, paths))}")
        requests = requests[requests["system"].isin(systems)]
        rounds = rounds[rounds["system"].isin(systems)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in objectives:
        table = decision_table(requests, rounds, name, n_resamples=n_resamples)
        table.to_csv(out / f"decision_table_{name}.csv", index=False)
        png = out / f"decision_map_{name}.png"
        png.write_bytes(figure_png(decision_map(requests, rounds, name, table=table), dpi=110))
        written += [str(out / f"decision_table_{name}.csv"), str(png)]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.decision RUN_OR_SWEEP... [--objective NAME...] [--out DIR]``: the
    decision map and table per objective; prints the written paths. Exit 2 with one line for a
    folder that is not a run or records without the grid's columns."""
    import argparse
    import sys

    from analysis.load import RunFolderError

    parser = argparse.ArgumentParser(prog="python -m analysis.decision", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, or folders of runs (a sweep over RTT x uplink)")
    parser.add_argument("--objective", nargs="+", default=["latency"],
                        help=f"one or more of {', '.join(OBJECTIVES)} or a numeric request column (default: latency)")
    parser.add_argument("--systems", help="comma-separated systems to compare (default: every one in the runs)")
    parser.add_argument("--out", help="where to write (default: <first path>/report)")
    parser.add_argument("--resamples", type=int, default=9999, help="bootstrap resamples for the margins' CIs")
    args = parser.parse_args(argv)
    try:
        written = write_maps(args.paths, args.out or f"{args.paths[0]}/report", args.objective,
                             systems=args.systems.split(",") if args.systems else None, n_resamples=args.resamples)
    except (RunFolderError, ValueError, KeyError) as exc:
        print(f"analysis.decision: {exc}", file=sys.stderr)
        return 2
    print("\n".join(written))
    return 0


__all__ = [
    "OBJECTIVES", "Objective", "TIE_SEPARATOR", "VALUE_COLUMN", "cloud_time_per_token", "decision_map",
    "decision_table", "energy_per_token", "get_objective", "latency_per_token", "main", "objective_values",
    "write_maps",
]


if __name__ == "__main__":
    import sys

    sys.exit(main())
