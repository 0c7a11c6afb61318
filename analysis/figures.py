"""The suite's figures, drawn from the records (the frames of :func:`analysis.load.load_runs`).

Every function takes ``(requests, rounds, **options)`` and returns a matplotlib
:class:`~matplotlib.figure.Figure` (Agg canvas, no pyplot state); nothing is re-run. Each
figure's title says whether its numbers are measured, estimated or modelled, read from the
records' provenance columns (``clock``: virtual time is modelled, wall time measured; the
energy ``*_kind`` columns), and each carries a caption (:func:`figure_caption`).

:data:`FIGURES` lists them all with what each needs, so a report draws every figure whose
data is present and says why the others were left out (:func:`draw_figures`);
:data:`EDGES_FIGURES` likewise lists those of runs of many edges sharing one cloud, which the
report draws in its "Many edges" section.

    requests, rounds = load_runs(["results/sweep"])
    drawn, left_out = draw_figures(requests, rounds)
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis import capacity as C
from analysis.bounds import measured_vs_bound, needs_bounds
from analysis.stats import paired_ratios, summarise

TIME_METRIC = "tpot"  # the default time-per-token metric (seconds per output token after the first)
BASELINES = ("cloud_only", "vanilla")  # the default baseline: the first of these present
RTT_COLUMN = "config.network.rtt_ms"
UPLINK_COLUMN = "config.network.up_mbps"
ROLES = ("edge", "cloud")
PHASES = ("draft", "uplink", "queue", "verify", "downlink")
ESTIMATED_HATCH = "//"
CAPTION_GID = "caption"
_N_RESAMPLES = 9999  # bootstrap resamples, as analysis.stats uses by default: figures and tables agree


# ---- provenance ---------------------------------------------------------------------------------


def time_provenance(frame: pd.DataFrame) -> str:
    """``"modelled"`` (virtual clock), ``"measured"`` (wall clock), ``"measured and modelled"``
    (both present) or ``"unknown"`` (no ``clock`` recorded), from the rows' ``clock`` column."""
    clocks = set(frame["clock"].dropna()) if "clock" in frame.columns else set()
    kinds = sorted({"modelled" if c == "virtual" else "measured" for c in clocks})
    return " and ".join(reversed(kinds)) if kinds else "unknown"


def _time_label(frame: pd.DataFrame) -> str:
    kind = time_provenance(frame)
    return {"modelled": "modelled (virtual time)", "measured": "measured (wall clock)"}.get(kind, kind)


def energy_provenance(kinds: Sequence[str]) -> str:
    """The energy figures' provenance from their kinds: ``"measured"``, ``"estimated"``,
    ``"measured and estimated"``, or ``"none"``."""
    present = {k for k in kinds if isinstance(k, str)}
    ordered = [k for k in ("measured", "estimated") if k in present] + sorted(present - {"measured", "estimated"})
    return " and ".join(ordered) if ordered else "none"


def figure_caption(fig: Figure) -> str:
    """The caption a figure function wrote under its figure ("" if none)."""
    return next((t.get_text() for t in fig.texts if t.get_gid() == CAPTION_GID), "")


def _new_figure(width: float = 8.0, height: float = 4.5) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _caption(fig: Figure, text: str) -> None:
    # A caption as a figure text (drawn under the axes), found again by figure_caption.
    fig.text(0.01, 0.005, text, fontsize=7, ha="left", va="bottom", wrap=True, gid=CAPTION_GID)
    fig.get_layout_engine().set(rect=(0, 0.08, 1, 0.92))


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, without the software-tag metadata (no URL in the file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


# ---- speedup against a network figure -------------------------------------------------------------


def default_baseline(requests: pd.DataFrame) -> str | None:
    """The autoregressive baseline present in the rows: ``cloud_only``, else ``vanilla``, else None."""
    present = set(requests["system"].dropna()) if "system" in requests.columns else set()
    return next((b for b in BASELINES if b in present), None)


def _varying(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in frame.columns and frame[c].nunique(dropna=True) > 1]


def speedup_table(
    requests: pd.DataFrame,
    *,
    baseline: str | None = None,
    metric: str = TIME_METRIC,
    by: Sequence[str] = ("network",),
    confidence_level: float = 0.95,
    n_resamples: int = _N_RESAMPLES,
) -> pd.DataFrame:
    """Every other system's paired speedup over ``baseline`` (``mean(baseline) / mean(candidate)``
    of ``metric``) within each group of ``by`` (plus ``pair`` and ``workload`` where they vary),
    one row per system and group, with the CI from :func:`analysis.stats.paired_ratios`.

    Raises ValueError when there is no baseline in the rows.
    """
    baseline = baseline or default_baseline(requests)
    systems = sorted(set(requests["system"].dropna()))
    if baseline is None or baseline not in systems:
        raise ValueError(f"no baseline system {baseline or ' or '.join(BASELINES)!r} in the rows "
                         f"(systems: {', '.join(systems)})")
    by = [*by, *(c for c in _varying(requests, ("pair", "workload")) if c not in by)]
    frames = []
    for candidate in systems:
        if candidate == baseline:
            continue
        rows = requests[requests["system"].isin([candidate, baseline])]
        frames.append(paired_ratios(rows, metric, candidate, baseline, by=by, confidence_level=confidence_level,
                                    n_resamples=n_resamples))
    if not frames:
        raise ValueError(f"only the baseline {baseline!r} is in the rows: nothing to compare")
    return pd.concat(frames, ignore_index=True)


def _speedup_against(requests: pd.DataFrame, x_column: str, x_label: str, what: str, *,
                     baseline: str | None, metric: str, confidence_level: float) -> Figure:
    if x_column not in requests.columns:
        raise ValueError(f"no {x_column} column in the records")
    table = speedup_table(requests, baseline=baseline, metric=metric, by=("network", x_column),
                          confidence_level=confidence_level)
    table = table[table[x_column].notna() & np.isfinite(table["estimate"].astype(float))]
    baseline = table["baseline"].iloc[0] if len(table) else (baseline or default_baseline(requests))
    fig, ax = _new_figure()
    extra = [c for c in ("pair", "workload") if c in table.columns]
    for key, rows in table.groupby(["candidate", *extra], sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows = rows.assign(_x=rows[x_column].astype(float)).sort_values("_x", kind="stable")
        label = " · ".join(map(str, key))
        line, = ax.plot(rows["_x"], rows["estimate"], marker="o", label=label, gid=f"speedup:{label}")
        band = ax.fill_between(rows["_x"].to_numpy(), rows["low"].to_numpy(dtype=float),
                               rows["high"].to_numpy(dtype=float), color=line.get_color(), alpha=0.2, linewidth=0)
        band.set_gid(f"ci:{label}")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=f"{baseline} (baseline)")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"speedup over {baseline} ({metric})")
    provenance = _time_label(requests)
    level = round(100 * confidence_level)
    ax.set_title(f"Speedup against the {what}: {provenance}")
    ax.legend(fontsize=7)
    _caption(fig, f"Speedup = mean({metric}) of {baseline} / mean({metric}) of the system over the same prompts "
                  f"(paired), per network; bands: {level}% paired bootstrap CI. Times are {provenance}; "
                  f"the {what} is the configured one ({x_column}).")
    return fig


def speedup_vs_rtt(requests: pd.DataFrame, rounds: pd.DataFrame | None = None, *, baseline: str | None = None,
                   metric: str = TIME_METRIC, confidence_level: float = 0.95) -> Figure:
    """One line per system: its paired speedup over the baseline against the network's RTT
    (``config.network.rtt_ms``), with the bootstrap CI as a band."""
    return _speedup_against(requests, RTT_COLUMN, "RTT, ms (configured)", "RTT", baseline=baseline,
                            metric=metric, confidence_level=confidence_level)


def speedup_vs_bandwidth(requests: pd.DataFrame, rounds: pd.DataFrame | None = None, *,
                         baseline: str | None = None, metric: str = TIME_METRIC,
                         confidence_level: float = 0.95) -> Figure:
    """One line per system: its paired speedup over the baseline against the uplink rate
    (``config.network.up_mbps``), with the bootstrap CI as a band."""
    fig = _speedup_against(requests, UPLINK_COLUMN, "uplink, Mbit/s (configured)", "uplink bandwidth",
                           baseline=baseline, metric=metric, confidence_level=confidence_level)
    ax = fig.axes[0]
    xs = [x for line in ax.lines if str(line.get_gid()).startswith("speedup:") for x in line.get_xdata()]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")
    return fig


# ---- time per token by prompt category --------------------------------------------------------------


def _grouped_bars(ax, table: pd.DataFrame, group: str, series: str, scale: float = 1.0,
                  hatch_of: Callable[[object], str | None] | None = None) -> None:
    """Bars of ``table.estimate`` (x ``scale``) with CI error bars: groups on the x axis, one bar
    per ``series`` value in each (a BarContainer labelled by it)."""
    groups = list(dict.fromkeys(table[group]))
    names = list(dict.fromkeys(table[series]))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rows = table[table[series] == name].set_index(group).reindex(groups)
        est = rows["estimate"].to_numpy(dtype=float) * scale
        low = rows["low"].to_numpy(dtype=float) * scale
        high = rows["high"].to_numpy(dtype=float) * scale
        err = np.vstack([np.where(np.isfinite(low), est - low, 0), np.where(np.isfinite(high), high - est, 0)])
        x = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        bars = ax.bar(x, np.nan_to_num(est), width, yerr=err, capsize=3, label=str(name),
                      hatch=hatch_of(name) if hatch_of else None, edgecolor="black", linewidth=0.5)
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups], fontsize=8)


def time_per_token_by_category(requests: pd.DataFrame, rounds: pd.DataFrame | None = None, *,
                               metric: str = TIME_METRIC, confidence_level: float = 0.95) -> Figure:
    """Grouped bars: the median ``metric`` (ms per token) per prompt category, one bar per
    system, with the bootstrap CI of the median as error bars."""
    rows = requests.assign(category=requests["category"].fillna("(none)"))
    table = summarise(rows, metric, by=["category", "system"], confidence_level=confidence_level,
                      n_resamples=_N_RESAMPLES)
    table = table[table["n"] > 0]
    if table.empty:
        raise ValueError(f"no request has a {metric}")
    fig, ax = _new_figure()
    _grouped_bars(ax, table, "category", "system", scale=1e3)
    provenance = _time_label(requests)
    ax.set_xlabel("prompt category")
    ax.set_ylabel(f"median {metric}, ms per token")
    ax.set_title(f"Time per token by prompt category: {provenance}")
    ax.legend(fontsize=7)
    _caption(fig, f"Bars: median {metric} over the requests of each category (all networks pooled); "
                  f"error bars: {round(100 * confidence_level)}% bootstrap CI of the median. Times are {provenance}.")
    return fig


# ---- energy per token per role ---------------------------------------------------------------------


def energy_per_token_table(requests: pd.DataFrame, *, confidence_level: float = 0.95,
                           n_resamples: int = _N_RESAMPLES) -> pd.DataFrame:
    """Median joules per output token per request, by system, network, role and kind (measured
    and estimated never pooled), with a bootstrap CI. Requests without a figure are left out."""
    parts = []
    for role in ROLES:
        joules, kind = f"energy_{role}_j", f"energy_{role}_kind"
        if joules not in requests.columns or kind not in requests.columns:
            continue
        ok = requests[joules].notna() & requests[kind].notna() & (requests["n_tokens"] > 0)
        if "error" in requests.columns:
            ok &= requests["error"].isna()
        rows = requests[ok]
        parts.append(pd.DataFrame({
            "system": rows["system"], "network": rows["network"], "role": role, "kind": rows[kind],
            "j_per_token": rows[joules].astype(float) / rows["n_tokens"].astype(float)}))
    if not parts or all(p.empty for p in parts):
        return pd.DataFrame(columns=["system", "network", "role", "kind", "estimate", "low", "high", "n"])
    long = pd.concat(parts, ignore_index=True)
    return summarise(long, "j_per_token", by=["system", "network", "role", "kind"],
                     confidence_level=confidence_level, n_resamples=n_resamples)


def energy_per_token(requests: pd.DataFrame, rounds: pd.DataFrame | None = None, *,
                     confidence_level: float = 0.95) -> Figure:
    """Grouped bars of the median joules per output token, one bar per role and kind in each
    system (and network, where several): estimated figures hatched, measured ones solid."""
    table = energy_per_token_table(requests, confidence_level=confidence_level)
    if table.empty:
        raise ValueError("no request has an energy figure (energy=none, or not measured)")
    several = table["network"].nunique(dropna=False) > 1
    table = table.assign(
        group=[f"{s}\n{n}" if several else str(s) for s, n in zip(table["system"], table["network"])],
        series=[f"{r} ({k})" for r, k in zip(table["role"], table["kind"])])
    kinds = dict(zip(table["series"], table["kind"]))
    fig, ax = _new_figure(max(8.0, 0.9 * table["group"].nunique()), 4.8)
    _grouped_bars(ax, table, "group", "series",
                  hatch_of=lambda s: ESTIMATED_HATCH if kinds[s] == "estimated" else None)
    provenance = energy_provenance(table["kind"])
    ax.set_ylabel("median J per output token")
    ax.set_title(f"Energy per token per role: {provenance}")
    ax.legend(fontsize=7)
    clock = _time_label(requests)
    _caption(fig, f"Hatched bars: estimated (a power model x busy/idle time); solid bars: measured (a hardware "
                  f"counter). Median J/token per request, error bars: {round(100 * confidence_level)}% bootstrap CI. "
                  f"Times behind the figures are {clock}.")
    return fig


# ---- acceptance by draft position -----------------------------------------------------------------


def acceptance_by_position_table(rounds: pd.DataFrame, *, by: Sequence[str] = ("system",)) -> pd.DataFrame:
    """Per group and draft position k (1-based): ``drafted`` (rounds that drafted at least k
    tokens), ``accepted`` (of those, rounds that accepted at least k) and ``rate``
    (accepted / drafted). Rounds that drafted nothing are left out."""
    rows = rounds[rounds["drafted"].fillna(0) > 0]
    out = []
    for key, group in rows.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        drafted = group["drafted"].to_numpy(dtype=int)
        accepted = group["accepted"].fillna(0).to_numpy(dtype=int)
        for k in range(1, int(drafted.max()) + 1):
            n = int((drafted >= k).sum())
            hit = int(((drafted >= k) & (accepted >= k)).sum())
            out.append({**dict(zip(by, key)), "position": k, "drafted": n, "accepted": hit, "rate": hit / n})
    return pd.DataFrame(out, columns=[*by, "position", "drafted", "accepted", "rate"])


def acceptance_by_position(requests: pd.DataFrame | None, rounds: pd.DataFrame) -> Figure:
    """One line per system: the fraction of rounds whose k-th draft token was accepted, among
    the rounds that drafted at least k tokens (networks pooled)."""
    table = acceptance_by_position_table(rounds)
    if table.empty:
        raise ValueError("no round drafted a token (no speculative system in these runs)")
    fig, ax = _new_figure()
    for system, rows in table.groupby("system", sort=True):
        ax.plot(rows["position"], rows["rate"], marker="o", label=str(system), gid=f"acceptance:{system}")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("fraction of rounds accepting position k")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(range(1, int(table["position"].max()) + 1))
    ax.set_title("Acceptance rate by draft position: measured (counted from the verdicts)")
    ax.legend(fontsize=7)
    _caption(fig, "Position k counts as accepted in a round when the round accepted at least k draft tokens; the "
                  "denominator is the rounds that drafted at least k (discarded drafts included). Acceptance is "
                  "counted from the recorded verdicts, whatever the clock.")
    return fig


# ---- one request's rounds on a time axis ------------------------------------------------------------


REQUEST_IDENTITY = ("run", "system", "network", "pair", "workload", "seed", "request_id")


def pick_request(rounds: pd.DataFrame, *, run: str | None = None, request_id: str | None = None,
                 system: str | None = None) -> pd.DataFrame:
    """The rounds of one request (its last attempt), in round order: the one named, or else
    the first (by run and id) of a system that drafts, or else the first of all."""
    rows = rounds
    for column, value in (("run", run), ("request_id", request_id), ("system", system)):
        if value is not None:
            rows = rows[rows[column] == value]
    if rows.empty:
        raise ValueError(f"no rounds for run={run!r} request_id={request_id!r} system={system!r}")
    # One run may hold many systems, networks and repeats of the same prompt (`make bench` does):
    # a request is told apart by all of them, not by its id alone.
    keys = [c for c in REQUEST_IDENTITY if c in rows.columns]
    drafting = rows.groupby(keys, sort=True)["drafted"].transform("max") > 0
    pool = rows[drafting] if drafting.any() else rows
    first = pool.sort_values(keys, kind="stable").iloc[0]
    chosen = pool[(pool[keys] == first[keys]).all(axis=1)]
    if "attempt" in chosen.columns:
        chosen = chosen[chosen["attempt"] == chosen["attempt"].max()]
    return chosen.sort_values("round", kind="stable")


def phase_spans(request_rounds: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """``(spans, anchored)``: one row per round and recorded phase (``round``, ``phase``,
    ``begin``, ``duration``, seconds on the run clock). With round start and end times
    (``anchored``), the draft begins at the round's start and uplink, queue, verify and
    downlink run back to back ending at the round's end; without them, the phases of each
    round are laid end to end after the previous round's. A null phase is left out."""
    starts, ends = request_rounds.get("start"), request_rounds.get("end")
    anchored = starts is not None and ends is not None and starts.notna().all() and ends.notna().all()
    spans, cursor = [], 0.0
    for _, r in request_rounds.iterrows():
        dur = {p: r.get(f"t_{p}") for p in PHASES}
        dur = {p: float(v) for p, v in dur.items() if v is not None and not pd.isna(v)}
        if anchored:
            if "draft" in dur:
                spans.append((r["round"], "draft", float(r["start"]), dur["draft"]))
            t = float(r["end"])
            for p in ("downlink", "verify", "queue", "uplink"):
                if p in dur:
                    t -= dur[p]
                    spans.append((r["round"], p, t, dur[p]))
        else:
            for p in PHASES:
                if p in dur:
                    spans.append((r["round"], p, cursor, dur[p]))
                    cursor += dur[p]
    frame = pd.DataFrame(spans, columns=["round", "phase", "begin", "duration"])
    return frame, anchored


def round_timeline(requests: pd.DataFrame | None, rounds: pd.DataFrame, *, run: str | None = None,
                   request_id: str | None = None, system: str | None = None) -> Figure:
    """A Gantt chart of one request (:func:`pick_request`): a row per round, its draft, uplink,
    queue, verify and downlink phases as bars on the time axis (ms from the first round's
    start; :func:`phase_spans` says how they are placed)."""
    chosen = pick_request(rounds, run=run, request_id=request_id, system=system)
    spans, anchored = phase_spans(chosen)
    if spans.empty:
        raise ValueError("the request's rounds record no phase times")
    origin = float(chosen["start"].min()) if anchored else 0.0
    fig, ax = _new_figure(9.0, max(3.0, min(12.0, 0.25 * len(chosen) + 1.5)))
    colours = dict(zip(PHASES, ("tab:green", "tab:blue", "tab:grey", "tab:red", "tab:purple")))
    order = {r: i for i, r in enumerate(dict.fromkeys(chosen["round"]))}  # one row per round, in order
    for phase in PHASES:
        rows = spans[spans["phase"] == phase]
        if rows.empty:
            continue
        ax.barh(rows["round"].map(order), rows["duration"] * 1e3, left=(rows["begin"] - origin) * 1e3,
                height=0.6, color=colours[phase], label=phase, alpha=0.85)
    ax.set_yticks(list(order.values()), [str(r) for r in order], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time since the first round's start, ms" if anchored else "time, ms (phases laid end to end)")
    ax.set_ylabel("round")
    first = chosen.iloc[0]
    who = f"{first.get('system')} on {first.get('network')}, request {first.get('request_id')}"
    provenance = _time_label(chosen)
    ax.set_title(f"Rounds of one request ({who}): {provenance}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    missing = [p for p in PHASES if chosen[f"t_{p}"].isna().all()] if all(
        f"t_{p}" in chosen.columns for p in PHASES) else []
    how = ("The records hold each phase's duration, not its start: the draft is drawn from the round's start, and "
           "uplink, queue, verify and downlink back to back ending at the round's end (rounds may overlap when a "
           "system pipelines)." if anchored else
           "Round start times are not recorded: each round's phases are laid end to end after the previous round's.")
    gaps = f" Not recorded: {', '.join(missing)}." if missing else ""
    _caption(fig, f"{how}{gaps} Times are {provenance}.")
    return fig


# ---- many edges: SLO attainment and goodput against the number of edges --------------------------


def attainment_goodput_vs_edges(requests: pd.DataFrame, rounds: pd.DataFrame | None = None, *, slo=None,
                                threshold: float = C.DEFAULT_THRESHOLD) -> Figure:
    """Two panels against the number of edge devices N, one line per system: SLO attainment
    (share of requests meeting their SLO, with the capacity threshold dashed) and goodput
    (output tokens/s of those requests), from :func:`analysis.capacity.sweep_table` (``slo``:
    the objectives for requests that carry none)."""
    table = C.sweep_table(requests, slo)
    table = table[table["attainment"].notna()]
    if table.empty:
        raise ValueError("no request carries an SLO (give one with --slo)")
    fig = Figure(figsize=(10.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for system, rows in table.groupby("system", sort=True):
        rows = rows.sort_values("n_edges", kind="stable")
        n = rows["n_edges"].to_numpy(dtype=float)
        left.plot(n, rows["attainment"].to_numpy(dtype=float), marker="o", label=str(system),
                  gid=f"attainment:{system}")
        right.plot(n, rows["goodput"].to_numpy(dtype=float), marker="o", label=str(system), gid=f"goodput:{system}")
    left.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"capacity threshold ({threshold:g})")
    left.set_ylim(0, 1.05)
    left.set_ylabel("SLO attainment, share of requests")
    right.set_ylabel("goodput, output tokens/s (SLO met)")
    ticks = sorted({int(v) for v in table["n_edges"]})
    for ax in (left, right):
        ax.set_xlabel("edge devices sharing the cloud, N")
        ax.set_xticks(ticks)
        ax.legend(fontsize=7)
    provenance = _time_label(requests)
    fig.suptitle(f"SLO attainment and goodput against the number of edges: {provenance}")
    slo_words = f"; requests without an SLO of their own judged against {slo.describe()}" if slo is not None else ""
    _caption(fig, f"Attainment = requests meeting their SLO / requests with an SLO{slo_words}. Goodput = output "
                  f"tokens of those requests / the run's makespan (first arrival to last end). Capacity = the "
                  f"largest N at or above the dashed line with every smaller N too. Times are {provenance}.")
    return fig


# ---- the registry ---------------------------------------------------------------------------------


def _need_columns(frame: pd.DataFrame | None, columns: Sequence[str], table: str) -> str | None:
    if frame is None or frame.empty:
        return f"no {table} records"
    missing = [c for c in columns if c not in frame.columns]
    return f"the {table} records lack column(s) {', '.join(missing)}" if missing else None


def _needs_speedup(x_column: str, what: str):
    def check(requests: pd.DataFrame, rounds: pd.DataFrame) -> str | None:
        """Why the speedup against this network figure cannot be drawn (None when it can)."""
        reason = _need_columns(requests, ["system", "network", TIME_METRIC, x_column], "request")
        if reason:
            return reason
        systems = sorted(requests["system"].dropna().unique())
        if len(systems) < 2:
            return f"only one system ({', '.join(systems) or 'none'}) ran: nothing to compare"
        values = requests[x_column].dropna().unique()
        if len(values) < 2:
            return f"one {what} only ({', '.join(map(str, values)) or 'none'}): a line needs two"
        return None
    return check


def _needs_categories(requests: pd.DataFrame, rounds: pd.DataFrame) -> str | None:
    reason = _need_columns(requests, ["system", "category", TIME_METRIC], "request")
    if reason:
        return reason
    return None if requests[TIME_METRIC].notna().any() else f"no request has a {TIME_METRIC}"


def _needs_energy(requests: pd.DataFrame, rounds: pd.DataFrame) -> str | None:
    cols = [c for r in ROLES for c in (f"energy_{r}_j", f"energy_{r}_kind")]
    reason = _need_columns(requests, ["system", "network", "n_tokens", *cols], "request")
    if reason:
        return reason
    if not any(requests[f"energy_{r}_j"].notna().any() for r in ROLES):
        why = requests["energy_reason"].dropna().unique() if "energy_reason" in requests.columns else []
        return "no energy figure in the records" + (f" ({why[0]})" if len(why) else "")
    return None


def _needs_drafts(requests: pd.DataFrame, rounds: pd.DataFrame) -> str | None:
    reason = _need_columns(rounds, ["system", "drafted", "accepted"], "round")
    if reason:
        return reason
    return None if (rounds["drafted"].fillna(0) > 0).any() else "no round drafted a token (no speculative system)"


def _needs_edges(requests: pd.DataFrame, rounds: pd.DataFrame) -> str | None:
    reason = _need_columns(requests, ["system", "n_edges", "n_tokens", "start", "end"], "request")
    if reason:
        return reason
    counts = sorted(int(v) for v in requests["n_edges"].dropna().unique())
    if len(counts) < 2:
        return f"one number of edges only ({', '.join(map(str, counts)) or 'none'}): a line needs two"
    return None


def _needs_timeline(requests: pd.DataFrame, rounds: pd.DataFrame) -> str | None:
    return _need_columns(rounds, ["request_id", "round", "drafted", *(f"t_{p}" for p in PHASES)], "round")


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the suite: its ``name`` (also its file name), the ``function`` that draws it
    from ``(requests, rounds)``, what it ``needs`` (in words) and ``check``, which returns why
    the records cannot give it (None when they can)."""

    name: str
    title: str
    function: Callable[..., Figure]
    needs: str
    check: Callable[[pd.DataFrame, pd.DataFrame], str | None]


FIGURES: list[FigureSpec] = [
    FigureSpec("speedup_vs_rtt", "Speedup against the RTT", speedup_vs_rtt,
               "a baseline (cloud_only or vanilla) and another system, on networks of at least two RTTs",
               _needs_speedup(RTT_COLUMN, "RTT")),
    FigureSpec("speedup_vs_bandwidth", "Speedup against the uplink bandwidth", speedup_vs_bandwidth,
               "a baseline and another system, on networks of at least two uplink rates",
               _needs_speedup(UPLINK_COLUMN, "uplink rate")),
    FigureSpec("time_per_token_by_category", "Time per token by prompt category", time_per_token_by_category,
               "requests with a time per token and a prompt category", _needs_categories),
    FigureSpec("energy_per_token", "Energy per token per role", energy_per_token,
               "requests with an energy figure (energy=auto or estimate)", _needs_energy),
    FigureSpec("acceptance_by_position", "Acceptance rate by draft position", acceptance_by_position,
               "rounds that drafted tokens (a speculative system)", _needs_drafts),
    FigureSpec("round_timeline", "Rounds of one request", round_timeline,
               "rounds with their phase times", _needs_timeline),
    FigureSpec("measured_vs_bound", "Measured speedup beside the analytical bound", measured_vs_bound,
               "rounds that verified draft tokens of a modelled system (vanilla, hsl, picospec, pipesd, edgellm) "
               "and a baseline (cloud_only or vanilla) on the same network", needs_bounds),
]


#: figures of runs of many edges sharing one cloud (the report's "Many edges" section draws them)
EDGES_FIGURES: list[FigureSpec] = [
    FigureSpec("attainment_goodput_vs_edges", "SLO attainment and goodput against the number of edges",
               attainment_goodput_vs_edges, "runs at two numbers of edges or more (edges.n) whose requests are "
               "judged against an SLO (their own, or --slo)", _needs_edges),
]


def draw_figures(requests: pd.DataFrame, rounds: pd.DataFrame,
                 specs: Sequence[FigureSpec] | None = None) -> tuple[dict[str, Figure], dict[str, str]]:
    """``(drawn, left_out)``: every figure of ``specs`` (default :data:`FIGURES`) the records can
    give, by name, and for each of the others why it was left out (its need unmet, or the
    error drawing it raised)."""
    drawn: dict[str, Figure] = {}
    left_out: dict[str, str] = {}
    for spec in specs or FIGURES:
        reason = spec.check(requests, rounds)
        if reason is None:
            try:
                drawn[spec.name] = spec.function(requests, rounds)
                continue
            except (ValueError, KeyError) as exc:
                reason = f"could not be drawn: {exc}"
        left_out[spec.name] = f"{reason} (needs {spec.needs})"
    return drawn, left_out


__all__ = [
    "BASELINES", "EDGES_FIGURES", "ESTIMATED_HATCH", "FIGURES", "FigureSpec", "PHASES", "RTT_COLUMN", "TIME_METRIC",
    "UPLINK_COLUMN", "acceptance_by_position", "acceptance_by_position_table", "attainment_goodput_vs_edges",
    "default_baseline", "draw_figures",
    "energy_per_token", "energy_per_token_table", "energy_provenance", "figure_caption", "figure_png",
    "phase_spans", "pick_request", "round_timeline", "speedup_table", "speedup_vs_bandwidth", "speedup_vs_rtt",
    "time_per_token_by_category", "time_provenance",
]
