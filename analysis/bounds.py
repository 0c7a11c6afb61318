"""Each speculative system's measured speedup beside its analytical model, from the records.

With i.i.d. acceptance ``alpha`` and ``n`` draft tokens judged per round, a round yields
``E[L] = (1 - alpha^(n+1)) / (1 - alpha)`` tokens (``n + 1`` when ``alpha = 1``; Leviathan et
al. 2023). A system that drafts and then waits for the verdict (vanilla SD, HSL) makes
``E[L] / (n*t_d + T_link+verify)`` tokens per second (stop-and-wait); one that drafts while the
link and the verifier work (PicoSpec; the bound for PipeSD and EdgeLLM) makes
``E[L] / max(n*t_d, T_link+verify)`` (pipelined; PicoSpec, arXiv 2603.19133, section 3.4).

Every input is estimated from the run's own rounds (:func:`round_model_inputs`), so the model
is modelled from the records, not a free parameter; nothing is re-run.

    requests, rounds = load_runs(["results/sweep"])
    table = bounds_table(requests, rounds)      # one row per modelled (system, network)
    fig = measured_vs_bound(requests, rounds)   # paired bars: measured solid, model hatched
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

STOP_AND_WAIT = "stop-and-wait"
PIPELINED = "pipelined"
MODEL_KINDS: dict[str, str] = {"vanilla": STOP_AND_WAIT, "hsl": STOP_AND_WAIT, "picospec": PIPELINED,
                               "pipesd": PIPELINED, "edgellm": PIPELINED}
LINK_PHASES = ("t_uplink", "t_queue", "t_verify", "t_downlink")
ROUND_COLUMNS = ("system", "network", "drafted", "verified", "accepted", "t_draft", *LINK_PHASES)
REQUEST_COLUMNS = ("system", "network", "n_tokens", "e2e", "ttft")
MODEL_HATCH = "//"
BOUNDS_COLUMNS = ["system", "network", "model", "alpha", "n", "t_d", "t_link_verify", "expected_tokens",
                  "rounds", "measured_throughput", "model_throughput", "baseline", "baseline_throughput",
                  "measured_speedup", "model_speedup", "model_over_measured", "provenance"]
FORMULAS = ("E[L] = (1 − α^(n+1)) / (1 − α) tokens per round (n + 1 when α = 1); "
            "stop-and-wait (vanilla, HSL): E[L] / (n·t_d + T_link+verify); "
            "pipelined (PicoSpec; an upper bound for PipeSD and EdgeLLM): E[L] / max(n·t_d, T_link+verify)")
INPUTS = ("α = Σ accepted / Σ verified, n = mean verified per round, t_d = Σ t_draft / Σ drafted, "
          "T_link+verify = mean(t_uplink + t_queue + t_verify + t_downlink), over the rounds that verified "
          "a draft token (t_d over all rounds)")


# ---- the model --------------------------------------------------------------------------------------


def round_model_inputs(rounds: pd.DataFrame) -> dict[str, float]:
    """The model's inputs estimated from ``rounds`` (one system on one network):

    ``alpha`` = sum(accepted) / sum(verified); ``n`` = mean verified per round that verified
    a token; ``t_d`` = sum(t_draft) / sum(drafted) (seconds per drafted token, over every
    round: discarded drafts cost time too); ``t_link_verify`` = mean over the rounds that
    verified a token of t_uplink + t_queue + t_verify + t_downlink (a null phase counts 0; a
    round with none recorded is left out). NaN where undefined (nothing verified or drafted).
    """
    verified = rounds["verified"].fillna(0).astype(float)
    judged = rounds[verified > 0]
    n_verified = float(verified.sum())
    drafted = float(rounds["drafted"].fillna(0).sum())
    # A round's link+verify time; all four phases null (a window never sent) is no time at all.
    link = judged[list(LINK_PHASES)].astype(float).sum(axis=1, min_count=1)
    return {
        "alpha": float(judged["accepted"].fillna(0).sum()) / n_verified if n_verified > 0 else math.nan,
        "n": float(verified[verified > 0].mean()) if len(judged) else math.nan,
        "t_d": float(rounds["t_draft"].fillna(0).sum()) / drafted if drafted > 0 else math.nan,
        "t_link_verify": float(link.mean()) if link.notna().any() else math.nan,
    }


def expected_tokens_per_round(alpha: float, n: float) -> float:
    """``E[L] = (1 - alpha^(n+1)) / (1 - alpha)``, the expected tokens a round yields (its accepted
    drafts plus the verifier's own token); ``n + 1`` when ``alpha = 1``; NaN for a NaN input."""
    if math.isnan(alpha) or math.isnan(n):
        return math.nan
    if alpha == 1.0:
        return n + 1.0
    return (1.0 - alpha ** (n + 1.0)) / (1.0 - alpha)


def model_throughput(inputs: Mapping[str, float], kind: str) -> float:
    """Tokens per second of the ``kind`` model (``"stop-and-wait"`` or ``"pipelined"``) for
    :func:`round_model_inputs`' ``inputs``; NaN when an input is undefined or a round takes no
    time. Raises ValueError for another kind."""
    if kind not in (STOP_AND_WAIT, PIPELINED):
        raise ValueError(f"no model {kind!r}: use {STOP_AND_WAIT!r} or {PIPELINED!r}")
    tokens = expected_tokens_per_round(inputs["alpha"], inputs["n"])
    draft, link = inputs["n"] * inputs["t_d"], inputs["t_link_verify"]
    if any(math.isnan(v) for v in (tokens, draft, link)):
        return math.nan
    per_round = draft + link if kind == STOP_AND_WAIT else max(draft, link)
    return tokens / per_round if per_round > 0 else math.nan


# ---- the table --------------------------------------------------------------------------------------


def _usable_requests(requests: pd.DataFrame) -> pd.DataFrame:
    ok = requests["e2e"].notna() & requests["n_tokens"].notna()
    if "error" in requests.columns:
        ok &= requests["error"].isna()
    return requests[ok]


def measured_throughputs(requests: pd.DataFrame) -> dict[tuple[str, str], float]:
    """``{(system, network): sum(n_tokens - 1) / sum(e2e - ttft)}``: the decode rate after the
    first token, over the requests without an error that emitted at least two tokens. The
    models describe the steady state of drafting and verifying rounds; the prefills and the
    first verdict (the TTFT) are outside it, as they are outside TPOT."""
    rows = _usable_requests(requests)
    rows = rows[(rows["n_tokens"] >= 2) & rows["ttft"].notna()]
    sums = rows.assign(_tokens=rows["n_tokens"] - 1, _seconds=rows["e2e"] - rows["ttft"]).groupby(
        ["system", "network"], sort=True)[["_tokens", "_seconds"]].sum()
    return {key: _ratio(float(r._tokens), float(r._seconds)) for key, r in sums.iterrows()}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan  # NaN for NaN too: a comparison with NaN is False


def _verified_rounds(rounds: pd.DataFrame | None) -> pd.DataFrame:
    if rounds is None or rounds.empty or "verified" not in rounds.columns:
        return pd.DataFrame(columns=list(ROUND_COLUMNS))
    return rounds[rounds["verified"].fillna(0) > 0]


def unmodelled_systems(requests: pd.DataFrame, rounds: pd.DataFrame | None,
                       baseline: str | None = None) -> dict[str, str]:
    """Every system of the records (``baseline`` aside) that :func:`bounds_table` has no row for,
    with the reason: it verified no draft token, or :data:`MODEL_KINDS` has no model for it."""
    systems = set(requests["system"].dropna()) if "system" in requests.columns else set()
    if rounds is not None and "system" in rounds.columns:
        systems |= set(rounds["system"].dropna())
    speculating = set(_verified_rounds(rounds)["system"].dropna())
    out = {}
    for system in sorted(systems - {baseline}):
        if system not in speculating:
            out[system] = "no round verified a draft token"
        elif system not in MODEL_KINDS:
            out[system] = "no analytical model for it"
    return out


def bounds_table(requests: pd.DataFrame, rounds: pd.DataFrame, baseline: str = "cloud_only") -> pd.DataFrame:
    """One row per (system, network) with a model (:data:`MODEL_KINDS`, and rounds that verified a
    draft token), with the columns of :data:`BOUNDS_COLUMNS`: the model's ``kind`` and inputs
    (:func:`round_model_inputs`), ``expected_tokens`` (E[L]), ``rounds`` (those that verified),
    the measured throughput (:func:`measured_throughputs`: after the first token, tokens/s)
    and the model's, the
    ``baseline``'s measured throughput on the same network, both speedups over it (NaN where
    the baseline did not run on that network), ``model_over_measured`` and the time
    ``provenance`` of the system's requests there.

    Raises ValueError when ``baseline`` is not among the requests' systems.
    """
    from analysis.figures import time_provenance  # figures imports this module: no import cycle

    systems = sorted(set(requests["system"].dropna()))
    if baseline not in systems:
        raise ValueError(f"no baseline system {baseline!r} in the rows (systems: {', '.join(systems)})")
    measured = measured_throughputs(requests)
    base = {net: tps for (system, net), tps in measured.items() if system == baseline}
    modelled = {key for key in _verified_rounds(rounds).groupby(["system", "network"]).groups
                if key[0] in MODEL_KINDS}
    rows = []
    for system, network in sorted(modelled):
        group = rounds[(rounds["system"] == system) & (rounds["network"] == network)]
        kind, inputs = MODEL_KINDS[system], round_model_inputs(group)
        model, tps, base_tps = (model_throughput(inputs, kind), measured.get((system, network), math.nan),
                                base.get(network, math.nan))
        mine = requests[(requests["system"] == system) & (requests["network"] == network)]
        rows.append({"system": system, "network": network, "model": kind, **inputs,
                     "expected_tokens": expected_tokens_per_round(inputs["alpha"], inputs["n"]),
                     "rounds": int((group["verified"].fillna(0) > 0).sum()), "measured_throughput": tps,
                     "model_throughput": model, "baseline": baseline, "baseline_throughput": base_tps,
                     "measured_speedup": _ratio(tps, base_tps), "model_speedup": _ratio(model, base_tps),
                     "model_over_measured": _ratio(model, tps), "provenance": time_provenance(mine)})
    return pd.DataFrame(rows, columns=BOUNDS_COLUMNS)


# ---- the figure -------------------------------------------------------------------------------------


def _network_order(requests: pd.DataFrame, networks) -> list[str]:
    """The networks by configured RTT (where recorded), then by name."""
    from analysis.figures import RTT_COLUMN

    rtt = {}
    if RTT_COLUMN in requests.columns:
        rtt = requests.dropna(subset=[RTT_COLUMN]).groupby("network")[RTT_COLUMN].min().to_dict()
    return sorted(set(networks), key=lambda n: (float(rtt.get(n, math.inf)), str(n)))


def _paired_bars(ax, table: pd.DataFrame, networks: list[str]) -> None:
    systems = sorted(set(table["system"]))
    width = 0.8 / (2 * len(systems))
    colours = [f"C{i % 10}" for i in range(len(systems))]
    for i, (system, colour) in enumerate(zip(systems, colours)):
        rows = table[table["system"] == system]
        x = np.array([networks.index(n) for n in rows["network"]], dtype=float) - 0.4 + width * (2 * i + 0.5)
        kind = rows["model"].iloc[0]
        solid = ax.bar(x, rows["measured_speedup"], width, color=colour, edgecolor="black", linewidth=0.5,
                       label=f"{system}: measured")
        hatched = ax.bar(x + width, rows["model_speedup"], width, color=colour, alpha=0.45, hatch=MODEL_HATCH,
                         edgecolor="black", linewidth=0.5, label=f"{system}: model ({kind})")
        for network, a, b in zip(rows["network"], solid.patches, hatched.patches):
            a.set_gid(f"measured:{system}:{network}")
            b.set_gid(f"model:{system}:{network}")
    ax.set_xticks(np.arange(len(networks)), [str(n) for n in networks], fontsize=8)


def measured_vs_bound(requests: pd.DataFrame, rounds: pd.DataFrame, *, baseline: str | None = None) -> Figure:
    """Per network, paired bars of each modelled system's speedup over ``baseline`` (default
    :func:`analysis.figures.default_baseline`): measured (solid) beside its analytical model
    (hatched), both divided by the baseline's measured throughput on that network
    (:func:`bounds_table`). Raises ValueError when no system has both."""
    from analysis.figures import _caption, _new_figure, _time_label, default_baseline, time_provenance

    baseline = baseline or default_baseline(requests)
    if baseline is None:
        raise ValueError("no baseline system (cloud_only or vanilla) in the rows")
    table = bounds_table(requests, rounds, baseline=baseline)
    table = table[np.isfinite(table["measured_speedup"].astype(float))
                  & np.isfinite(table["model_speedup"].astype(float))]
    if table.empty:
        raise ValueError(f"no modelled system has rounds and a measured {baseline} on the same network")
    networks = _network_order(requests, table["network"])
    fig, ax = _new_figure(min(16.0, max(9.0, 0.5 * len(networks) * table["system"].nunique())), 6.0)
    _paired_bars(ax, table, networks)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=f"{baseline} (baseline)")
    ax.set_xlabel("network")
    ax.set_ylabel(f"speedup over {baseline} (throughput ratio)")
    ax.set_title(f"Speedup beside the analytical model: times {_time_label(requests)}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    left_out = unmodelled_systems(requests, rounds, baseline)
    gaps = "; ".join(f"{s} ({why})" for s, why in left_out.items())
    _caption(fig, f"Speedup = decode throughput after the first token (Σ (tokens − 1) / Σ (end-to-end − TTFT)) / "
                  f"{baseline}'s measured one on the "
                  f"same network. Solid: measured; hatched: the analytical model, {FORMULAS}. The model's inputs are "
                  f"estimated from the same run's rounds: {INPUTS}. Times are {time_provenance(requests)}."
                  + (f" Left out: {gaps}." if gaps else ""))
    fig.get_layout_engine().set(rect=(0, 0.17, 1, 0.83))  # the caption runs to several lines
    return fig


def needs_bounds(requests: pd.DataFrame, rounds: pd.DataFrame) -> str | None:
    """Why :func:`measured_vs_bound` cannot be drawn from the records (None when it can): no
    request or round records, no round that verified a draft token, no system with a model,
    no baseline, or no network where both a modelled system and the baseline ran."""
    from analysis.figures import BASELINES, default_baseline

    for frame, columns, what in ((requests, REQUEST_COLUMNS, "request"), (rounds, ROUND_COLUMNS, "round")):
        if frame is None or frame.empty:
            return f"no {what} records"
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            return f"the {what} records lack column(s) {', '.join(missing)}"
    judged = _verified_rounds(rounds)
    if judged.empty:
        return "no round verified a draft token (no speculative system)"
    modelled = judged[judged["system"].isin(list(MODEL_KINDS))]
    if modelled.empty:
        return f"no analytical model for the systems that verified drafts ({', '.join(sorted(set(judged.system)))})"
    baseline = default_baseline(requests)
    if baseline is None:
        return f"no baseline system ({' or '.join(BASELINES)}) in the rows"
    usable = _usable_requests(requests)
    base_nets = set(usable.loc[usable["system"] == baseline, "network"])
    if not base_nets & set(modelled["network"]):
        return f"the baseline {baseline} ran on none of the networks the modelled systems ran on"
    return None


__all__ = [
    "BOUNDS_COLUMNS", "MODEL_HATCH", "MODEL_KINDS", "PIPELINED", "STOP_AND_WAIT", "bounds_table",
    "expected_tokens_per_round", "measured_throughputs", "measured_vs_bound", "model_throughput", "needs_bounds",
    "round_model_inputs", "unmodelled_systems",
]
