"""The console tables of run folders: time, speedup, acceptance, bytes and energy per token.

    requests, rounds = load_runs(["results/20250101-120000-bench"])
    print(format_table(summary_by_network(requests, rounds)))
    print(console_summary(["results/20250101-120000-bench"]))  # both tables, ready to print

Every figure is pooled over the rows of a group (sums of the records, then one ratio), not
averaged per request: ``ms_per_token`` = 1000 x sum(e2e) / sum(n_tokens); acceptance = sum
accepted / sum verified draft tokens over the rounds; energy per token per role keeps each
figure's kind (measured or estimated) in its column name, and the two never share a column.
A table's provenance (times modelled or measured, from the rows' ``clock``; energy's kinds)
rides in ``DataFrame.attrs["provenance"]`` and :func:`format_table` prints it under the table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.figures import ROLES, time_provenance
from analysis.load import load_runs

BASELINE = "cloud_only"  # the system every speedup is measured against
NETWORK_KEYS = ("system", "network")
CATEGORY_KEYS = ("category", "system", "network")
SUMMARY_CSV, CATEGORY_CSV = "summary.csv", "summary_by_category.csv"
PROVENANCE = "provenance"  # the attrs key holding a table's provenance lines
_TIME_WORDS = {"modelled": "modelled (virtual clock: device profiles + link model)",
               "measured": "measured (wall clock)",
               "measured and modelled": "measured (wall clock) and modelled (virtual clock) runs mixed"}
_KIND_WORDS = {"estimated": "a power model (device power x busy/idle time), not measured",
               "measured": "an energy meter's reading"}

Energy = tuple[float | None, str | None, str | None]  # (J/token, kind, why it is missing)


# ---- pooling -----------------------------------------------------------------------------------------


def _groups(frame: pd.DataFrame, keys: Sequence[str]):
    """``frame`` grouped by ``keys`` in first-appearance order (a null key is a group of its own)."""
    return frame.groupby(list(keys), sort=False, dropna=False)


def _key(key: Any) -> tuple:
    """A group's key as a tuple, a null as None (NaN keys would never match one another)."""
    return tuple(None if pd.isna(k) else k for k in (key if isinstance(key, tuple) else (key,)))


def _round_totals(rounds: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, tuple[int, int]]:
    """``{key: (accepted, verified)}`` summed over the rounds of each group."""
    sums = _groups(rounds, keys)[["accepted", "verified"]].sum()
    return {_key(k): (int(a), int(v)) for k, a, v in zip(sums.index, sums["accepted"], sums["verified"])}


def _ratio(numerator: float, denominator: float, scale: float = 1.0) -> float | None:
    return scale * numerator / denominator if denominator else None


def _joules_per_token(group: pd.DataFrame, role: str) -> Energy:
    """``(J/token, kind, reason)`` of ``role`` over a group's requests.

    None with the reason when a request lacks the role's joules, when the kinds differ
    (measured and estimated are never added), or without output tokens.
    """
    joules, kinds = group[f"energy_{role}_j"], group[f"energy_{role}_kind"]
    if joules.isna().any():
        reasons = group.loc[joules.isna(), "energy_reason"].dropna()
        return None, None, str(reasons.iloc[0]) if len(reasons) else "not measured"
    if kinds.isna().any() or kinds.nunique() != 1:
        names = ", ".join(sorted(str(k) for k in kinds.unique()))
        return None, None, f"{role} figures of different kinds ({names}) are not added"
    tokens = int(group["n_tokens"].sum())
    if not tokens:
        return None, str(kinds.iloc[0]), "no output tokens"
    return float(joules.sum()) / tokens, str(kinds.iloc[0]), None


def _pooled(key: tuple, group: pd.DataFrame, verdicts: dict[tuple, tuple[int, int]]) -> dict[str, Any]:
    """A group's pooled figures: requests, tokens, ms/token, acceptance, bytes per token."""
    tokens = int(group["n_tokens"].sum())
    accepted, verified = verdicts.get(key, (0, 0))
    return {"requests": len(group), "tokens": tokens,
            "ms_per_token": _ratio(float(group["e2e"].sum()), tokens, 1e3),
            "speedup_vs_cloud_only": None,
            "acceptance": _ratio(accepted, verified),
            "bytes_up_per_token": _ratio(int(group["bytes_up"].sum()), tokens),
            "bytes_down_per_token": _ratio(int(group["bytes_down"].sum()), tokens),
            "_accepted": accepted, "_verified": verified}


def _add_speedups(rows: list[dict], by: Sequence[str]) -> None:
    """Each row's speedup: the baseline's ms/token on the same ``by`` values over its own."""
    base = {tuple(r[k] for k in by): r["ms_per_token"] for r in rows if r["system"] == BASELINE}
    for r in rows:
        b = base.get(tuple(r[k] for k in by))
        if b and r["ms_per_token"]:
            r["speedup_vs_cloud_only"] = b / r["ms_per_token"]


def _summaries(requests: pd.DataFrame, rounds: pd.DataFrame, keys: Sequence[str]) -> list[dict]:
    """One pooled row per group of ``keys`` (first-appearance order), with its speedup and the
    group's per-role energy kept aside under ``_energy``."""
    verdicts = _round_totals(rounds, keys)
    rows = []
    for key, group in _groups(requests, keys):
        key = _key(key)
        rows.append({**dict(zip(keys, key)), **_pooled(key, group, verdicts),
                     "_energy": {role: _joules_per_token(group, role) for role in ROLES}})
    _add_speedups(rows, [k for k in keys if k != "system"])
    return rows


# ---- provenance --------------------------------------------------------------------------------------


def _pairs(requests: pd.DataFrame) -> str:
    pairs = requests["pair"].dropna().unique() if "pair" in requests.columns else []
    return f" with pair {', '.join(map(str, pairs))}" if len(pairs) else ""


def provenance_line(requests: pd.DataFrame, *, with_bytes: bool = True) -> str:
    """Where the numbers come from: times modelled (virtual clock) or measured (wall clock), from
    the rows' ``clock``; tokens and acceptance counted from the records; bytes real encodings."""
    when = time_provenance(requests)
    line = f"times: {_TIME_WORDS.get(when, when)}; tokens and acceptance: measured{_pairs(requests)}"
    return line + ("; bytes: real message encodings" if with_bytes else "")


def _energy_columns(rows: list[dict]) -> list[str]:
    """Put J/token per role in one column per (role, kind) (measured and estimated never share
    one), dropping ``_energy``; returns the notes: each kind's meaning, why a figure is n/a."""
    notes: list[str] = []
    for role in ROLES:
        figures = [r["_energy"][role] for r in rows]
        kinds = sorted({kind for value, kind, _ in figures if value is not None})
        for kind in kinds or [None]:
            column = f"{role}_J_per_token_{kind}" if kind else f"{role}_J_per_token"
            for r, (value, k, _) in zip(rows, figures):
                r[column] = value if k == kind else None
        notes += [f"{role} energy: {kind} = {_KIND_WORDS.get(kind, kind)}" for kind in kinds]
        reasons = sorted({why for value, _, why in figures if value is None and why})
        if reasons:
            notes.append(f"{role} J/token n/a where: {'; '.join(reasons)}")
    for r in rows:
        del r["_energy"]
    return notes


def _frame(rows: list[dict], columns: Sequence[str] | None, provenance: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(columns) if columns is not None else None)
    frame.attrs[PROVENANCE] = provenance
    return frame


# ---- the tables ----------------------------------------------------------------------------------------


def summary_by_network(requests: pd.DataFrame, rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per (system, network), in order of first appearance in ``requests``.

    Columns: system, network, tokens, ms_per_token (1000 x sum e2e / sum n_tokens),
    speedup_vs_cloud_only (cloud_only's ms_per_token on the same network / this row's; missing
    without a cloud_only run there), acceptance (sum accepted / sum verified draft tokens over
    the rounds; missing when nothing was verified), bytes_up_per_token, bytes_down_per_token,
    then per role ``<role>_J_per_token_<kind>`` for each kind present (``<role>_J_per_token``,
    all missing, when the role has no figure). ``attrs["provenance"]``: the provenance line
    and the energy notes.
    """
    rows = _summaries(requests, rounds, NETWORK_KEYS)
    notes = _energy_columns(rows)
    for r in rows:
        for hidden in ("requests", "_accepted", "_verified"):
            del r[hidden]
    return _frame(rows, None if rows else NETWORK_KEYS, [provenance_line(requests), *notes])


def _category_row(first: dict, rows: list[dict], networks: Sequence[str]) -> dict:
    """One (category, system): acceptance pooled over its networks, the speedup on each network."""
    accepted, verified = sum(r["_accepted"] for r in rows), sum(r["_verified"] for r in rows)
    speedup = {r["network"]: r["speedup_vs_cloud_only"] for r in rows}
    return {"category": first["category"], "system": first["system"], "requests": first["requests"],
            "acceptance": _ratio(accepted, verified),
            **{f"speedup@{n}": speedup.get(n) for n in networks}}


def summary_by_category(requests: pd.DataFrame, rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per (category, system) but the cloud_only baseline, in order of first appearance.

    Columns: category, system, requests (on the first network it ran on), acceptance (sum
    accepted / sum verified over the rounds of every network; missing when nothing was
    verified), then ``speedup@<network>`` per network (cloud_only's ms/token on that network
    and category over this row's; missing without one). Requests without a category are left
    out. ``attrs["provenance"]``: the provenance line.
    """
    has_category = requests["category"].notna()
    rows = _summaries(requests[has_category], rounds[rounds["category"].notna()], CATEGORY_KEYS)
    networks = list(dict.fromkeys(r["network"] for r in rows))
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["system"] != BASELINE:  # the baseline: speedup 1, nothing verified
            by_key.setdefault((r["category"], r["system"]), []).append(r)
    table = [_category_row(group[0], group, networks) for group in by_key.values()]
    columns = ["category", "system", "requests", "acceptance", *(f"speedup@{n}" for n in networks)]
    return _frame(table, columns, [provenance_line(requests[has_category], with_bytes=False)])


# ---- text ----------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """n/a for a missing value, 2 decimals for a float, else the value as written."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(df: pd.DataFrame, notes: Iterable[str] = ()) -> str:
    """``df`` as fixed-width text (columns right-aligned, two spaces apart; n/a for None/NaN,
    floats with 2 decimals), then its ``attrs["provenance"]`` lines, then ``notes``."""
    columns = [str(c) for c in df.columns]
    cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)).rstrip() or "(no rows)"]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([*lines, *df.attrs.get(PROVENANCE, ()), *notes])


def _workloads(requests: pd.DataFrame) -> str:
    names = requests["workload"].dropna().unique() if "workload" in requests.columns else []
    return f"workload {', '.join(map(str, names))}; " if len(names) else ""


def console_summary(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> str:
    """Both tables of the runs at ``paths`` (as :func:`analysis.load.load_runs` finds them),
    rendered with their provenance, ready to print; the category table only when the records
    have categories and a system besides the baseline."""
    return console_text(*load_runs(paths))


def console_text(requests: pd.DataFrame, rounds: pd.DataFrame) -> str:
    """:func:`console_summary` of records already loaded."""
    parts = ["per system and network:", format_table(summary_by_network(requests, rounds))]
    categories = summary_by_category(requests, rounds)
    if not categories.empty:
        parts += ["", f"per category ({_workloads(requests)}speedup over {BASELINE} on each network, "
                      "acceptance pooled over the networks):", format_table(categories)]
    return "\n".join(parts)


def write_summaries(requests: pd.DataFrame, rounds: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``summary.csv`` and ``summary_by_category.csv`` (the two tables) into ``out_dir``;
    returns their paths."""
    out = Path(out_dir)
    written = []
    for name, table in ((SUMMARY_CSV, summary_by_network), (CATEGORY_CSV, summary_by_category)):
        table(requests, rounds).to_csv(out / name, index=False)
        written.append(out / name)
    return written


__all__ = ["BASELINE", "CATEGORY_CSV", "SUMMARY_CSV", "console_summary", "console_text", "format_table", "provenance_line",
           "summary_by_category", "summary_by_network", "write_summaries"]
