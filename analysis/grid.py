"""The comparison grid's table (experiment presets with a ``grid:`` section: pipesd_table1,
picospec_table1, picospec_rtt, picospec_n), computed from the run folder alone.

    python -m analysis.report <run folder>   # prints it; writes grid.csv in the report folder

One row per cell (scenario x dataset x method: the records' context columns), in the order of
the grid spec the run recorded (``config.grid`` in its manifest): time per accepted token
(1000 x sum(e2e) / sum(n_tokens)), speedups over the dataset's first method, acceptance
(accepted / verified draft tokens, the rounds' sum), cloud energy per 100 accepted tokens,
beside the paper's figures from the spec, with the ratio of the speedups. The thresholds a
cell ran with (tuned ones included) and the system's own model (PicoSpec §3.4) are what the
run recorded under ``grid_cells`` in the manifest. Nothing is re-run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.load import MANIFEST_NAME, labelled_runs, load_runs

GRID_CSV = "grid.csv"
CELL = ("scenario", "dataset", "method")  # the context columns naming a cell
NOTE = ("ours: time modelled in virtual time (device profiles + link model), tokens and acceptance measured with "
        "pair {pair}; cloud energy estimated (modelled device power x busy time: prefill and verification, which is "
        "what the paper integrates; _with_idle adds the idle draw). paper: as printed in the paper (measured on its "
        "testbed, with its models).")


def cell_key(scenario: str, dataset: str, method: str) -> str:
    """A cell's key under the manifest's ``grid_cells``: ``"scenario/dataset/method"``."""
    return f"{scenario}/{dataset}/{method}"


def read_manifest(run_dir: str | os.PathLike) -> dict:
    """A run folder's manifest."""
    return json.loads((Path(run_dir) / MANIFEST_NAME).read_text())


def grid_config(manifest: dict) -> dict | None:
    """The grid spec a run recorded (its resolved ``config.grid``), or None for a run without one."""
    return (manifest.get("config") or {}).get("grid")


def grid_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[Path, str]:
    """The grid runs among the run folders at ``paths``, with their ``run`` labels."""
    return {run_dir: label for run_dir, label in labelled_runs(paths).items()
            if grid_config(read_manifest(run_dir)) is not None}


# ---- per cell ----------------------------------------------------------------------------------------


@dataclass
class CellTotals:
    """A cell's sums over its requests and rounds."""

    tokens: int
    seconds: float
    accepted: int
    verified: int
    cloud_j: float | None  # the cloud device over the requests' time, idle included
    cloud_busy_j: float | None  # only while it prefills and verifies (what the paper integrates)
    cloud_kind: str | None

    @property
    def tpt_ms(self) -> float | None:
        """Time per accepted token, ms: 1000 x seconds / tokens."""
        return 1e3 * self.seconds / self.tokens if self.tokens else None

    def per_100(self, joules: float | None) -> float | None:
        """``joules`` per 100 accepted tokens."""
        return None if joules is None or not self.tokens else 100.0 * joules / self.tokens


def _value(v):
    """A table value as a plain Python value (None for a null)."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _totals(rows: pd.DataFrame, verified: int) -> CellTotals:
    # sums in record order, as the run appended them
    cloud = [_value(v) for v in rows["energy_cloud_j"]]
    idle = [_value(v) or 0.0 for v in rows["energy_cloud_idle_j"]]
    measured = all(c is not None for c in cloud)
    return CellTotals(tokens=int(sum(int(n) for n in rows["n_tokens"])), seconds=sum(float(s) for s in rows["e2e"]),
                   accepted=int(sum(int(a) for a in rows["accepted"])), verified=verified,
                   cloud_j=sum(cloud) if measured else None,
                   cloud_busy_j=sum(c - i for c, i in zip(cloud, idle)) if measured else None,
                   cloud_kind=_value(rows["energy_cloud_kind"].iloc[-1]) if measured else None)


def cell_totals(requests: pd.DataFrame, rounds: pd.DataFrame) -> dict[tuple[str, str, str], CellTotals]:
    """Each cell's sums: tokens, seconds, accepted and verified tokens, cloud energy."""
    verified = rounds.groupby(list(CELL), sort=False)["verified"].sum() if len(rounds) else pd.Series(dtype=int)
    return {key: _totals(rows, int(verified.get(key, 0)))
            for key, rows in requests.groupby(list(CELL), sort=False)}


# ---- the rows ----------------------------------------------------------------------------------------


def _paper(grid: dict, dataset: str, table: str, scenario: str, method: str) -> float | None:
    """The paper's figure for a cell: ``paper.<table>.<scenario>`` lists one per method, in order."""
    d = grid["datasets"][dataset]
    values = ((d.get("paper") or {}).get(table) or {}).get(scenario)
    names = list(d["methods"])
    if values is None or method not in names or names.index(method) >= len(values):
        return None
    return values[names.index(method)]


def _model_columns(grid: dict, key: tuple[str, str, str], t: CellTotals, rep: dict | None) -> dict:
    """A system's own model beside the measurement (PicoSpec's §3.4 throughput), when it has
    one, with the tokens per round beside the paper's acceptance length if it printed one."""
    if not rep or "throughput_async" not in rep:
        return {}
    scenario, dataset, method = key
    return {"tok_s": t.tokens / t.seconds if t.seconds else None,
            "model_tok_s": rep["throughput_async"] if rep.get("pipelined", True) else rep["throughput_sync"],
            "model_sync_tok_s": rep["throughput_sync"], "model_error": rep["model_error"],
            "accept_len": rep["inputs"]["expected_length"],
            "paper_accept_len": _paper(grid, dataset, "accept_len", scenario, method)}


def _row(grid: dict, key: tuple[str, str, str], totals: dict, recorded: dict) -> dict:
    scenario, dataset, method = key
    c = totals[key]
    base_name = next(iter(grid["datasets"][dataset]["methods"]))
    base = totals.get((scenario, dataset, base_name))
    paper_tpt = _paper(grid, dataset, "tpt_ms", scenario, method)
    paper_base = _paper(grid, dataset, "tpt_ms", scenario, base_name)
    speedup = base.tpt_ms / c.tpt_ms if base is not None and base.tpt_ms and c.tpt_ms else None
    paper_speedup = paper_base / paper_tpt if paper_base and paper_tpt else None
    cell = recorded.get(cell_key(*key)) or {}
    # a run from before grid_cells was recorded: the spec's own parameters
    params = cell.get("params", grid["datasets"][dataset]["methods"][method].get("params") or {})
    return {
        "scenario": scenario, "dataset": dataset, "method": method, "tokens": c.tokens,
        "tpt_ms": c.tpt_ms, "paper_tpt_ms": paper_tpt,
        f"speedup_vs_{base_name}": speedup, f"paper_speedup_vs_{base_name}": paper_speedup,
        "speedup_ratio": speedup / paper_speedup if speedup and paper_speedup else None,
        "acceptance": c.accepted / c.verified if c.verified else None,
        "cloud_busy_j_per_100": c.per_100(c.cloud_busy_j),
        "paper_cloud_j_per_100": _paper(grid, dataset, "cloud_j_per_100", scenario, method),
        "cloud_j_per_100_with_idle": c.per_100(c.cloud_j), "cloud_energy_kind": c.cloud_kind,
        "r1": params.get("r1"), "r2": params.get("r2"),
        **_model_columns(grid, key, c, cell.get("system_report")),
    }


def _cells_in_order(grid: dict) -> list[tuple[str, str, str]]:
    """Every cell of the spec, in the order the run served them."""
    return [(s, d, m) for s in grid["scenarios"] for d, spec in grid["datasets"].items() for m in spec["methods"]]


def grid_rows(run_dir: str | os.PathLike) -> list[dict]:
    """One row per cell of a grid run that has records: ours beside the paper's, speedups
    over the first method of each dataset, in the order of the grid spec.

    Raises ValueError for a run folder without a grid spec (``config.grid``), and
    :class:`analysis.load.RunFolderError` for a folder that is not a run.
    """
    manifest = read_manifest(run_dir)
    grid = grid_config(manifest)
    if grid is None:
        raise ValueError(f"{run_dir} is not a grid run (its manifest has no config.grid)")
    requests, rounds = load_runs(run_dir)
    totals = cell_totals(requests, rounds)
    recorded = manifest.get("grid_cells") or {}
    return [_row(grid, key, totals, recorded) for key in _cells_in_order(grid) if key in totals]


# ---- output ------------------------------------------------------------------------------------------


def format_value(v) -> str:
    """A table value as the grid prints it: - for a missing value, 2 decimals for a float."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def formatted(rows: list[dict]) -> pd.DataFrame:
    """The rows as text (:func:`format_value`), every column any row has, in first-seen order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return pd.DataFrame([[format_value(r.get(c)) for c in cols] for r in rows], columns=cols)


def grid_title(manifest: dict) -> str:
    """The grid's name, with the source of the paper's figures when the spec gives one."""
    grid = grid_config(manifest) or {}
    name, source = grid.get("name", "grid"), grid.get("source")
    return f"{name} ({source})" if source else str(name)


def provenance(manifest: dict) -> str:
    """Where the numbers come from: ours modelled and measured (with the run's pair), the paper's as printed."""
    return NOTE.format(pair=((manifest.get("config") or {}).get("pair") or {}).get("name"))


def grid_table_text(run_dir: str | os.PathLike) -> str:
    """The grid as fixed-width text: its title, one line per cell, then :func:`provenance`."""
    manifest = read_manifest(run_dir)
    table = formatted(grid_rows(run_dir))
    widths = [max(len(c), *(len(v) for v in table[c])) for c in table.columns]
    lines = [grid_title(manifest), "  ".join(c.rjust(w) for c, w in zip(table.columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table.itertuples(index=False)]
    return "\n".join([*lines, provenance(manifest)])


def write_grid_csv(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the grid's rows (:func:`grid_rows`) as ``grid.csv`` into ``out_dir`` (created);
    returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(grid_rows(run_dir)).to_csv(out / GRID_CSV, index=False)
    return out / GRID_CSV


__all__ = ["CELL", "GRID_CSV", "CellTotals", "cell_key", "cell_totals", "format_value", "formatted", "grid_config",
           "grid_rows", "grid_runs", "grid_table_text", "grid_title", "provenance", "read_manifest", "write_grid_csv"]
