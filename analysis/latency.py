"""Throughput against the RTT, from a grid run over RTTs (``experiment=picospec_rtt``).

Reads a grid run folder's records (the grid's rows, :func:`analysis.grid.grid_rows`) and its
``manifest.json`` (each scenario's link, with its RTT)
and draws each method's measured throughput against the RTT, with the performance model's
curves (PicoSpec §3.4, pipelined and stop-and-wait, computed from each cell's own records)
beside the method that reports one. Never re-runs anything.

    python -m analysis.latency <run folder>      # writes latency.png there, prints the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def latency_sweep(run_dir: str | Path) -> pd.DataFrame:
    """One row per scenario and method: RTT (ms), measured tok/s and, where reported, the
    model's pipelined and stop-and-wait tok/s and its relative error."""
    run_dir = Path(run_dir)
    from analysis.grid import grid_rows

    grid = pd.DataFrame(grid_rows(run_dir))
    links = json.loads((run_dir / "manifest.json").read_text())["link"]["scenarios"]
    out = pd.DataFrame({
        "scenario": grid["scenario"], "dataset": grid["dataset"], "method": grid["method"],
        "rtt_ms": [1e3 * links[s]["rtt_s"] for s in grid["scenario"]],
        "tok_s": 1e3 / grid["tpt_ms"],
    })
    for column in ("model_tok_s", "model_sync_tok_s", "model_error"):
        out[column] = grid[column] if column in grid else float("nan")
    return out.sort_values(["dataset", "method", "rtt_ms"], kind="stable").reset_index(drop=True)


def plot_latency_sweep(sweep: pd.DataFrame, path: str | Path) -> Path:
    """Measured throughput (solid) and the model's curves (dashed, dotted) against the RTT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (dataset, method), rows in sweep.groupby(["dataset", "method"], sort=False):
        label = f"{method} ({dataset})"
        line, = ax.plot(rows["rtt_ms"], rows["tok_s"], marker="o", label=f"{label}, measured")
        if rows["model_tok_s"].notna().any():
            ax.plot(rows["rtt_ms"], rows["model_tok_s"], linestyle="--", color=line.get_color(),
                    label=f"{label}, model (pipelined)")
            ax.plot(rows["rtt_ms"], rows["model_sync_tok_s"], linestyle=":", color=line.get_color(),
                    label=f"{label}, model (stop-and-wait)")
    ax.set_xlabel("RTT, ms")
    ax.set_ylabel("tokens/s (virtual time)")
    ax.set_title("Throughput against the RTT: measured and modelled (PicoSpec §3.4)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m analysis.latency <run folder>", file=sys.stderr)
        return 2
    sweep = latency_sweep(args[0])
    print(sweep.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"plot: {plot_latency_sweep(sweep, Path(args[0]) / 'latency.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
