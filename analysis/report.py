"""The suite's report: one self-contained ``report.html`` (figures as base64 PNG data URIs, CSS
inline, no external URL) and a ``report.md`` with the PNGs beside it, built from run folders.

    python -m analysis.report results/sweep-1 [more runs or sweeps...] [--out DIR]

It holds a manifest summary per run; the summary table per system and network (median TTFT,
TPOT, end-to-end latency, acceptance rate, bytes each way and energy per token, each with its
bootstrap CI); the paired speedup table with its verdicts; every figure of
:data:`analysis.figures.FIGURES` the records can give (and why the others were left out); for
runs of many edges sharing one cloud, SLO attainment, goodput and capacity against the number
of edges, beside WISP's published ratios (:mod:`analysis.capacity`, also as ``capacity.csv``); and
each number's provenance: *modelled* (virtual time: device profiles and the link model),
*measured* (wall clock, hardware counters, or counted from the records: tokens, bytes,
verdicts) or *estimated* (energy from a power model). Nothing is re-run.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pandas as pd

from analysis import capacity as C
from analysis import figures as F
from analysis import grid as G
from analysis import metrics as M
from analysis.load import MANIFEST_NAME, RunFolderError, labelled_runs, load_runs
from analysis.stats import Verdict, summarise
from analysis.tables import console_text, write_summaries

HTML_NAME, MD_NAME = "report.html", "report.md"
CAPACITY_CSV = "capacity.csv"
EDGES_HEADING = "Many edges: SLO attainment, goodput, capacity"
# (column, heading, scale, provenance: "time" follows the clock, else fixed)
SUMMARY_METRICS: tuple[tuple[str, str, float, str], ...] = (
    ("ttft", "TTFT, s", 1.0, "time"),
    ("tpot", "TPOT, ms", 1e3, "time"),
    ("e2e", "end-to-end, s", 1.0, "time"),
    ("acceptance_rate", "acceptance rate", 1.0, "measured"),
    ("accepted_length", "accepted length", 1.0, "measured"),
    ("wasted", "wasted draft tokens", 1.0, "measured"),
    ("bytes_up", "bytes up", 1.0, "measured"),
    ("bytes_down", "bytes down", 1.0, "measured"),
)
PROVENANCE_NOTE = ("Provenance of each number: modelled = virtual time (device profiles and the link model); "
                   "measured = wall clock, a hardware counter, or counted from the records (tokens, bytes, "
                   "verdicts); estimated = energy from a power model. Cells: median [95% bootstrap CI].")


@dataclass
class Section:
    """One part of the report: a heading, paragraphs, an optional table (strings) and figures
    (name, title, PNG bytes, caption)."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    figures: list[tuple[str, str, bytes, str]] = field(default_factory=list)


# ---- what ran ---------------------------------------------------------------------------------------


def run_manifests(paths: Iterable[str | os.PathLike]) -> dict[str, dict]:
    """Each run's manifest, by the ``run`` label :func:`analysis.load.load_runs` gives it."""
    return {label: json.loads((run_dir / MANIFEST_NAME).read_text()) for run_dir, label in labelled_runs(paths).items()}


def _short(text: object, limit: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _energy_source(manifest: dict) -> str:
    parts = []
    for role in F.ROLES:
        info = (manifest.get("energy") or {}).get(role) or {}
        kind = info.get("kind") or "none"
        why = info.get("source") or info.get("reason") or ""
        parts.append(f"{role}: {kind}" + (f" ({_short(why, 60)})" if why else ""))
    return "; ".join(parts)


def manifest_table(manifests: dict[str, dict], requests: pd.DataFrame) -> pd.DataFrame:
    """One row per run: git commit, pair, systems, networks, clock, energy source per role."""
    rows = []
    for run, m in manifests.items():
        mine = requests[requests["run"] == run]
        git = m.get("git") or {}
        commit = git.get("commit")
        commit = (commit[:12] + (" (dirty)" if git.get("dirty") else "")) if commit else f"none ({git.get('reason')})"
        pair = ((m.get("config") or {}).get("pair") or {})
        pair = pair.get("name") if isinstance(pair, dict) else pair
        rows.append({
            "run": run, "git commit": commit,
            "pair": pair or ", ".join(map(str, mine["pair"].dropna().unique())),
            "systems": ", ".join(map(str, mine["system"].dropna().unique())),
            "networks": ", ".join(map(str, mine["network"].dropna().unique())),
            "clock": m.get("clock") or "unknown", "requests": len(mine), "energy source": _energy_source(m)})
    return pd.DataFrame(rows)


# ---- numbers ----------------------------------------------------------------------------------------


def fmt(value: float, scale: float = 1.0) -> str:
    """A number for a table: thousands separated from 1000 up, else 3 significant digits; n/a for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    v = float(value) * scale
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _cell(est: float, low: float, high: float, scale: float, provenance: str) -> str:
    ci = f" [{fmt(low, scale)}, {fmt(high, scale)}]" if not (math.isnan(low) or math.isnan(high)) else ""
    return f"{fmt(est, scale)}{ci} {provenance}" if not math.isnan(est) else "n/a"


def summary_table(requests: pd.DataFrame, *, confidence_level: float = 0.95, n_resamples: int = 9999) -> pd.DataFrame:
    """One row per system and network: the median of each of :data:`SUMMARY_METRICS` and the
    energy per token per role, each as ``median [low, high] provenance`` (bootstrap CI from
    :func:`analysis.stats.summarise`); energy of different kinds is never pooled."""
    by = ["system", "network"]
    groups = requests[by].drop_duplicates().sort_values(by, kind="stable")
    table = groups.reset_index(drop=True).copy()
    table["requests"] = [int(((requests["system"] == s) & (requests["network"] == n)).sum())
                         for s, n in zip(groups["system"], groups["network"])]
    for column, heading, scale, kind in SUMMARY_METRICS:
        if column not in requests.columns:
            continue
        stats = summarise(requests, column, by=by, confidence_level=confidence_level,
                          n_resamples=n_resamples).set_index(by)
        cells = []
        for s, n in zip(groups["system"], groups["network"]):
            r = stats.loc[(s, n)]
            rows = requests[(requests["system"] == s) & (requests["network"] == n)]
            provenance = F.time_provenance(rows) if kind == "time" else kind
            cells.append(_cell(r["estimate"], r["low"], r["high"], scale, provenance))
        table[heading] = cells
    energy = F.energy_per_token_table(requests, confidence_level=confidence_level, n_resamples=n_resamples)
    for role in F.ROLES:
        cells = []
        for s, n in zip(groups["system"], groups["network"]):
            mine = energy[(energy["system"] == s) & (energy["network"] == n) & (energy["role"] == role)]
            cells.append("; ".join(_cell(r.estimate, r.low, r.high, 1.0, r.kind) for r in mine.itertuples())
                         or "n/a (not measured)")
        table[f"{role} J/token"] = cells
    return table


def verdict_words(verdict: str, baseline: str, confidence_level: float, note: str | None = None) -> str:
    """A speedup verdict in words: faster / slower than the baseline, or indistinguishable, at the level."""
    level = f"{round(100 * confidence_level)}%"
    words = {Verdict.CANDIDATE_LOWER.value: f"faster than {baseline} at {level}",
             Verdict.CANDIDATE_HIGHER.value: f"slower than {baseline} at {level}"}.get(
        verdict, f"indistinguishable at {level}")
    return words + (f" ({note})" if note and verdict == Verdict.INDISTINGUISHABLE.value else "")


def speedup_rows(requests: pd.DataFrame, *, baseline: str | None = None, metric: str = F.TIME_METRIC,
                 confidence_level: float = 0.95, n_resamples: int = 9999) -> pd.DataFrame:
    """The paired speedup table for the report: per system and network, the speedup over the
    baseline on ``metric``, its CI, the pairs used, the verdict in words and the provenance."""
    table = F.speedup_table(requests, baseline=baseline, metric=metric, confidence_level=confidence_level,
                            n_resamples=n_resamples)
    extra = [c for c in ("pair", "workload") if c in table.columns]
    out = []
    for r in table.itertuples(index=False):
        rows = requests[(requests["network"] == r.network) & requests["system"].isin([r.candidate, r.baseline])]
        ci = "n/a" if math.isnan(r.low) or math.isnan(r.high) else f"[{fmt(r.low)}, {fmt(r.high)}]"
        out.append({"system": r.candidate, "network": r.network, **{c: getattr(r, c) for c in extra},
                    "baseline": r.baseline, f"speedup ({metric})": fmt(r.estimate),
                    f"{round(100 * confidence_level)}% CI": ci, "pairs": r.n_pairs,
                    "verdict": verdict_words(r.verdict, r.baseline, confidence_level, r.note),
                    "provenance": F.time_provenance(rows)})
    return pd.DataFrame(out)


# ---- many edges sharing one cloud ------------------------------------------------------------------


def _pct(value: float) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:.0%}"


def _joules(value: float, kind: str) -> str:
    return f"n/a ({kind})" if pd.isna(value) else f"{fmt(value)} {kind}"


def edges_table(table: pd.DataFrame) -> pd.DataFrame:
    """A :func:`analysis.capacity.sweep_table` (or its per-run, per-device form) for the report."""
    keys = [c for c in ("run", "system", "n_edges", "edge_device") if c in table.columns
            and not (c == "edge_device" and (table[c] == C.ALL_DEVICES).all())]
    out = table[keys].rename(columns={"n_edges": "edges N", "edge_device": "edge device"}).copy()
    out["requests"] = table["requests"]
    out["judged (SLO)"] = table["with_slo"]
    out["met"] = table["met"]
    out["attainment"] = [_pct(v) for v in table["attainment"]]
    out["goodput, tok/s"] = [fmt(v) for v in table["goodput"]]
    out["throughput, tok/s"] = [fmt(v) for v in table["throughput"]]
    out["makespan, s"] = [fmt(v) for v in table["makespan_s"]]
    out["wasted tokens/request"] = [fmt(v) for v in table["wasted_tokens_per_request"]]
    out["wasted J/request"] = [_joules(v, k) for v, k in zip(table["wasted_j_per_request"], table["wasted_j_kind"])]
    out["times"] = table["clock"]
    return out


def ratios_table(ratios: pd.DataFrame) -> pd.DataFrame:
    """:func:`analysis.capacity.paper_ratios` for the report: ours beside the paper's, each labelled."""
    return pd.DataFrame({
        "ratio": [f"WISP / {v} {m}" for m, v in zip(ratios["metric"], ratios["versus"])],
        "ours": [f"{fmt(v)}x {k}" if pd.notna(v) else f"n/a ({k})" for v, k in zip(ratios["ours"], ratios["ours_are"])],
        "basis": ratios["basis"],
        "paper": [f"{fmt(v)}x [P]" if pd.notna(v) else "n/a" for v in ratios["paper"]]})


def _pair_words(pair: dict) -> str:
    return (f"batch {pair['batch']} took {pair['later']} (arrived {fmt(pair['later_arrived'])} s) while "
            f"{pair['waiting']} (arrived {fmt(pair['waiting_arrived'])} s) waited until batch {pair['waiting_batch']}")


def scheduler_section(batches: pd.DataFrame, time_kind: str) -> Section | None:
    """What the cloud's recorded batches say: the estimator's error on the batches it was not
    fitted on, work taken out of arrival order, and admissions the estimator refused."""
    if batches.empty:
        return None
    section = Section("Many edges: the cloud's batches")
    if capped := batches.attrs.get("capped"):
        runs = ", ".join(f"{label} ({kept:,} of {total:,})" for label, (kept, total) in sorted(capped.items()))
        section.paragraphs.append(f"Each run's first {C.MAX_PASSES_PER_RUN:,} passes only, where it recorded more: "
                                  f"{runs}.")
    error = C.estimator_error(batches)
    if len(error):
        section.paragraphs.append(
            "Verification time estimator: relative error |predicted - actual| / actual over the batches it "
            "predicted, those it was fitted on left out (fitted excluded); actual times " + time_kind + ".")
        section.table = pd.DataFrame({
            "system": error["system"] if "system" in error.columns else "", "batches": error["count"],
            "median error": [_pct(v) for v in error["median"]], "p90 error": [_pct(v) for v in error["p90"]],
            "fitted excluded": error["fitted_excluded"]})
    order = C.non_fcfs_summary(batches)
    refused = C.refused_admissions(batches)
    for system in sorted(set(batches["system"].dropna())) if "system" in batches.columns else []:
        mine = order[order["system"] == system] if "system" in order.columns else order
        mine = mine[mine["pairs"] > 0]
        n_batches = int((batches["system"] == system).sum())
        if mine.empty:
            words = "every batch took work in arrival order (first come, first served)"
        else:
            words = (f"{int(mine['batches'].sum())} batch(es) took work ahead of earlier-arrived work still waiting "
                     f"({int(mine['pairs'].sum())} pair(s); e.g. {_pair_words(mine['example'].iloc[0])}): "
                     "not first come, first served")
        theirs = refused[refused["system"] == system] if "system" in refused.columns else refused
        if len(theirs):
            words += (f"; the estimator refused {len(theirs)} admission(s) in {theirs['batch'].nunique()} batch(es) "
                      f"(e.g. {theirs['session'].iloc[0]} in batch {theirs['batch'].iloc[0]})")
        section.paragraphs.append(f"{system}: {n_batches} batch(es); {words}.")
    return section


def edges_sections(paths: Sequence[str | os.PathLike], requests: pd.DataFrame, rounds: pd.DataFrame, *,
                   slo: M.SLO | None = None, threshold: float = C.DEFAULT_THRESHOLD) -> list[Section]:
    """The report's sections on runs of many edges sharing one cloud (:mod:`analysis.capacity`),
    empty unless the runs have several edges or requests carrying an SLO: the sweep table with
    each system's capacity and the figure; WISP's ratios beside the paper's; the per-device
    table (several device profiles); and the cloud's batches (estimator error, order, refusals)."""
    if not C.has_many_edges(requests):
        return []
    time_kind = C.clock_kind(requests)
    table = C.sweep_table(requests, slo)
    caps = C.capacities(table, threshold)
    own = "Requests carrying an SLO are judged by their recorded verdict; " + (
        f"the others against {slo.describe()} (--slo)." if slo is not None else
        "the others are not judged (give --slo to judge them).")
    main = Section(EDGES_HEADING, [
        own + " Attainment = requests meeting their SLO / requests judged. Goodput = output tokens of the "
        "requests that met it / the run's makespan (first arrival, or start under a closed loop, to last end); "
        "throughput likewise over every request. Wasted = draft tokens not accepted (drafted - accepted) and the "
        f"edge's joules drafting them, per request. Times {time_kind}.",
        f"Capacity (largest N with attainment >= {threshold:g} at N and every smaller N tested): "
        + "; ".join(f"{r.system} {r.capacity_label}" + (f" (first miss at N={r.first_miss})"
                                                         if pd.notna(r.first_miss) and r.capacity_label != "none"
                                                         else "") for r in caps.itertuples()) + "."],
        edges_table(table))
    specs = [replace(s, function=partial(s.function, slo=slo, threshold=threshold)) for s in F.EDGES_FIGURES]
    drawn, left_out = F.draw_figures(requests, rounds, specs)
    titles = {s.name: s.title for s in F.EDGES_FIGURES}
    for name, fig in drawn.items():
        main.figures.append((name, titles[name], F.figure_png(fig), F.figure_caption(fig)))
    if left_out:
        main.paragraphs.append("Left out: " + "; ".join(f"{titles[n]}: {why}" for n, why in left_out.items()) + ".")
    sections = [main]
    ratios = C.paper_ratios(table, caps, time_kind)
    if len(ratios):
        sections.append(Section("Many edges: WISP beside the paper", [
            f"Paper: {C.PAPER_SOURCE}; goodput up to 1.94x centralized and 3.7x SLED, capacity up to 2.1x and "
            f"4.1x [P]. Ours are {time_kind} on this suite's pair, devices and links, not the paper's set-up; "
            "the basis says at which N each goodput ratio is taken."], ratios_table(ratios)))
    if "edge_device" in requests.columns and requests["edge_device"].nunique(dropna=True) > 1:
        per_device = C.run_metrics(requests, slo)
        per_device = per_device[per_device["edge_device"] != C.ALL_DEVICES]
        sections.append(Section("Many edges: per edge device", [
            "Each device profile's requests in each run; goodput and throughput over the whole run's makespan, so "
            f"the devices' add up to the run's. Times {time_kind}."], edges_table(per_device)))
    scheduler = scheduler_section(C.load_batches(paths, max_per_run=C.MAX_PASSES_PER_RUN), time_kind)
    if scheduler is not None:
        sections.append(scheduler)
    return sections


# ---- assembling ---------------------------------------------------------------------------------------


def _specs(baseline: str | None) -> list[F.FigureSpec]:
    if baseline is None:
        return list(F.FIGURES)
    speedups = (F.speedup_vs_rtt, F.speedup_vs_bandwidth)
    return [replace(s, function=partial(s.function, baseline=baseline)) if s.function in speedups else s
            for s in F.FIGURES]


def latency_table(requests: pd.DataFrame) -> pd.DataFrame:
    """Per system and network: inter-token latency percentiles (ms) over every chunk after the
    first, per chunk and per token (:func:`analysis.metrics.itl_summary`)."""
    itl = M.itl_summary(requests)
    table = itl[["system", "network", "chunks"]].copy()
    table["tokens per chunk"] = [fmt(v) for v in itl["tokens_per_chunk"]]
    for column, label in (("itl", "ITL"), ("itl_per_token", "ITL per token")):
        for q in M.PERCENTILES:
            table[f"{label} p{q}, ms"] = [fmt(v, 1e3) for v in itl[f"{column}_p{q}"]]
    return table


def goodput_table(requests: pd.DataFrame, slo: M.SLO) -> pd.DataFrame:
    """Per system and network: SLO attainment and goodput (:func:`analysis.metrics.goodput`)."""
    g = M.goodput(requests, slo)
    return pd.DataFrame({"system": g["system"], "network": g["network"], "requests": g["requests"],
                         "met SLO": g["met"], "attainment": [f"{v:.0%}" for v in g["attainment"]],
                         "serving, s": [fmt(v) for v in g["serving_s"]],
                         "goodput, req/s": [fmt(v) for v in g["goodput"]]})


def grid_sections(paths: Sequence[str | os.PathLike]) -> list[Section]:
    """One section per grid run among ``paths``: its comparison table (:mod:`analysis.grid`)."""
    sections = []
    for run_dir in G.grid_runs(paths):
        manifest = G.read_manifest(run_dir)
        name = G.grid_config(manifest).get("name", "grid")
        sections.append(Section(f"Comparison grid: {name}", [G.grid_title(manifest), G.provenance(manifest)],
                                G.formatted(G.grid_rows(run_dir))))
    return sections


def report_sections(paths: Sequence[str | os.PathLike], *, baseline: str | None = None,
                    metric: str = F.TIME_METRIC, n_resamples: int = 9999, slo: M.SLO | None = None,
                    records: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                    capacity_threshold: float = C.DEFAULT_THRESHOLD) -> list[Section]:
    """The report's sections, built from the run folders at ``paths`` (as :func:`load_runs`
    reads them, or their ``records`` already loaded); with ``slo``, a section of SLO attainment
    and goodput; for runs of many edges (or requests carrying an SLO), the sections of
    :func:`edges_sections` (capacity at attainment >= ``capacity_threshold``). Raises
    :class:`analysis.load.RunFolderError` for a path that is not a run."""
    requests, rounds = records if records is not None else load_runs(paths)
    requests = requests.assign(wasted=M.wasted_per_request(requests, rounds))
    manifests = run_manifests(paths)
    time_kind = F.time_provenance(requests)
    sections = [Section("Runs", [f"{len(manifests)} run(s), {len(requests)} request(s), {len(rounds)} round(s)."],
                        manifest_table(manifests, requests))]
    sections += grid_sections(paths)
    sections.append(Section("Summary per system and network", [PROVENANCE_NOTE],
                            summary_table(requests, n_resamples=n_resamples)))
    sections.append(Section("Inter-token latency", [
        "A verdict commits several tokens at one instant, so the gap is measured between chunks (the instants "
        "a request's output grew), as vLLM's serving benchmark does, and per token (the gap over the tokens the "
        f"chunk brought), as SGLang's does; the first chunk's wait is the TTFT. Times {time_kind}."],
        latency_table(requests)))
    if slo is not None:
        sections.append(Section("SLO attainment and goodput", [
            f"SLO: {slo.describe()}. Goodput = requests meeting every objective per second of serving (the sum of "
            f"the requests' end-to-end latencies: one request at a time per edge). Times {time_kind}."],
            goodput_table(requests, slo)))
    sections += edges_sections(paths, requests, rounds, slo=slo, threshold=capacity_threshold)
    try:
        speed = speedup_rows(requests, baseline=baseline, metric=metric, n_resamples=n_resamples)
        sections.append(Section("Paired speedup", [
            f"Speedup = mean {metric} of the baseline / mean {metric} of the system over the same prompts, turns "
            "and seeds (paired); CI: paired BCa bootstrap. Where the CI holds 1 the two are indistinguishable."],
            speed))
    except ValueError as exc:  # no baseline, or only the baseline ran
        sections.append(Section("Paired speedup", [f"No speedup table: {exc}."]))
    drawn, left_out = F.draw_figures(requests, rounds, _specs(baseline))
    titles = {s.name: s.title for s in F.FIGURES}
    figs = Section("Figures")
    for name, fig in drawn.items():
        figs.figures.append((name, titles[name], F.figure_png(fig), F.figure_caption(fig)))
    if left_out:
        figs.paragraphs.append("Left out: " + "; ".join(f"{titles[n]}: {why}" for n, why in left_out.items()) + ".")
    sections.append(figs)
    return sections


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.8em;color:#444}.note{font-size:.85em;color:#444}
"""


def _text(value: object) -> str:
    """HTML-escaped text in which no URL scheme survives as a link (``://`` is written as entities)."""
    return html.escape(str(value)).replace("://", ":&#47;&#47;")


def render_html(sections: Sequence[Section], title: str = "SpecWAN report") -> str:
    """One self-contained HTML page: inline CSS, figures as ``data:image/png;base64`` URIs."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_text(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{_text(title)}</h1>"]
    for s in sections:
        out.append(f"<h2>{_text(s.heading)}</h2>")
        out += [f'<p class="note">{_text(p)}</p>' for p in s.paragraphs]
        if s.table is not None and not s.table.empty:
            out.append("<table><thead><tr>" + "".join(f"<th>{_text(c)}</th>" for c in s.table.columns)
                       + "</tr></thead><tbody>")
            for row in s.table.itertuples(index=False):
                out.append("<tr>" + "".join(f"<td>{_text(v)}</td>" for v in row) + "</tr>")
            out.append("</tbody></table>")
        for name, heading, png, caption in s.figures:
            data = base64.b64encode(png).decode("ascii")
            out.append(f'<figure id="{_text(name)}"><img alt="{_text(heading)}" src="data:image/png;base64,{data}">'
                       f"<figcaption><b>{_text(heading)}.</b> {_text(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def _md(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: Sequence[Section], title: str = "SpecWAN report") -> str:
    """The report as Markdown; figures referenced as ``<name>.png`` beside it."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.heading}", ""]
        for p in s.paragraphs:
            out += [_md(p), ""]
        if s.table is not None and not s.table.empty:
            out.append("| " + " | ".join(_md(c) for c in s.table.columns) + " |")
            out.append("|" + "---|" * len(s.table.columns))
            out += ["| " + " | ".join(_md(v) for v in row) + " |" for row in s.table.itertuples(index=False)]
            out.append("")
        for name, heading, _, caption in s.figures:
            out += [f"![{heading}]({name}.png)", "", f"*{heading}.* {_md(caption)}", ""]
    return "\n".join(out)


def build_report(paths: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 baseline: str | None = None, metric: str = F.TIME_METRIC, n_resamples: int = 9999,
                 slo: M.SLO | None = None, records: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                 capacity_threshold: float = C.DEFAULT_THRESHOLD) -> Path:
    """Write ``report.html`` (self-contained), ``report.md``, one PNG per figure and the console
    tables as ``summary.csv`` and ``summary_by_category.csv`` (:mod:`analysis.tables`), and a grid
    run's table as ``grid.csv`` (:mod:`analysis.grid`; several grid runs: one in a folder named
    for each run), into ``out_dir`` (created), from the run folders or sweeps at ``paths``;
    returns the HTML's path.

    ``baseline``: the system speedups are measured against (default: cloud_only, else vanilla);
    ``metric``: the time-per-token column for the speedups; ``slo``: adds SLO attainment and
    goodput (:mod:`analysis.metrics`). Runs of many edges (or requests carrying an SLO) add the
    "Many edges" sections and ``capacity.csv`` (:func:`analysis.capacity.capacity_table`;
    capacity at attainment >= ``capacity_threshold``). Raises
    :class:`analysis.load.RunFolderError` for a path that is not a run and holds none.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records = records if records is not None else load_runs(paths)
    sections = report_sections(paths, baseline=baseline, metric=metric, n_resamples=n_resamples, slo=slo,
                               records=records, capacity_threshold=capacity_threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in sections:
        for name, _, png, _ in s.figures:
            (out / f"{name}.png").write_bytes(png)
    write_summaries(*records, out)
    if C.has_many_edges(records[0]):
        C.capacity_table(records[0], slo, capacity_threshold).to_csv(out / CAPACITY_CSV, index=False)
    grids = G.grid_runs(paths)
    for run_dir, label in grids.items():
        G.write_grid_csv(run_dir, out if len(grids) == 1 else out / label)
    (out / MD_NAME).write_text(render_markdown(sections), encoding="utf-8")
    page = out / HTML_NAME
    page.write_text(render_html(sections), encoding="utf-8")
    return page


def latest_run(parent: str | Path) -> Path | None:
    """The run or sweep directly under ``parent`` written last, or None: each folder there that
    is a run (holds manifest.json) or a sweep (its sub-folders hold runs) is dated by the newest
    manifest in it, so after a sweep (``make bench``) the whole sweep is reported."""
    newest: dict[Path, float] = {}
    for manifest in [*Path(parent).glob("*/manifest.json"), *Path(parent).glob("*/*/manifest.json")]:
        if manifest.is_file():
            top = Path(parent) / manifest.relative_to(parent).parts[0]
            newest[top] = max(newest.get(top, 0.0), manifest.stat().st_mtime)
    return max(newest, key=newest.get) if newest else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options (``python -m analysis.report`` and ``specwan report`` share them)."""
    parser.add_argument("paths", nargs="*", help="run folders, or folders of runs (sweeps)")
    parser.add_argument("--latest", metavar="DIR", help="report on the run or sweep directly under DIR "
                                                        "written last")
    parser.add_argument("--out", help="where to write the report (default: <first path>/report)")
    parser.add_argument("--baseline", help="the system speedups are measured against (default: cloud_only, "
                                           "else vanilla)")
    parser.add_argument("--metric", default=F.TIME_METRIC, help="time-per-token column for the speedups")
    parser.add_argument("--slo", help="objectives in ms for SLO attainment and goodput, e.g. ttft:500,tpot:100")
    parser.add_argument("--capacity-attainment", type=float, default=C.DEFAULT_THRESHOLD, metavar="SHARE",
                        help="runs of many edges: a system's capacity is the largest N whose SLO attainment is at "
                             f"least this share, every smaller N too (default {C.DEFAULT_THRESHOLD:g})")


def run(args: argparse.Namespace, prog: str = "analysis.report") -> int:
    """Build the report of ``args`` (see :func:`add_arguments`); prints the console tables
    (:func:`analysis.tables.console_text`), a grid run's table
    (:func:`analysis.grid.grid_table_text`) and then the path of report.html, last. Exit 2 with
    one line for a folder that is not a run or a bad option."""
    paths = list(args.paths)
    if args.latest:
        newest = latest_run(args.latest)
        if newest is None:
            print(f"{prog}: no run folder under {args.latest}; run `make bench` or `specwan run` first",
                  file=sys.stderr)
            return 2
        paths.append(str(newest))
    if not paths:
        print(f"{prog}: give run folders or sweeps (or --latest DIR)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(paths[0]) / "report"
    try:
        slo = M.SLO.parse(args.slo) if args.slo else None
    except ValueError as exc:
        print(f"{prog}: --slo: {exc}", file=sys.stderr)
        return 2
    threshold = getattr(args, "capacity_attainment", C.DEFAULT_THRESHOLD)
    if not 0 < threshold <= 1:
        print(f"{prog}: --capacity-attainment: {threshold:g} is not a share in (0, 1]", file=sys.stderr)
        return 2
    try:
        records = load_runs(paths)  # read once for the report and the console tables
        page = build_report(paths, out, baseline=args.baseline, metric=args.metric, slo=slo, records=records,
                            capacity_threshold=threshold)
        summary = console_text(*records)
        grids = [G.grid_table_text(run_dir) for run_dir in G.grid_runs(paths)]
    except RunFolderError as exc:
        print(f"{prog}: {exc}; pass a run folder (one holding manifest.json, as `specwan run` writes "
              "under results/) or a folder holding runs", file=sys.stderr)
        return 2
    print(summary)
    for text in grids:
        print(f"\n{text}")
    print(page)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.report RUN_OR_SWEEP... [--out DIR] [--baseline SYSTEM] [--slo ...]``."""
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
