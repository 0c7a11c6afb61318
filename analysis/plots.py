"""Plots of a run's summary: time per token and energy per token by system and network.

Takes the summary table (one row per system and network, as ``summary.csv`` holds it) and
draws PNGs; it reads records only, never re-runs anything. Energy columns are named
``<role>_J_per_token_<kind>``; each (role, kind) gets its own panel with the kind in its
title, so measured and estimated figures never share a bar.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_network(df: pd.DataFrame, column: str) -> pd.DataFrame:
    return df.pivot(index="network", columns="system", values=column).reindex(list(dict.fromkeys(df["network"])))


def plot_time_per_token(summary: pd.DataFrame, path: str | Path) -> Path:
    """Grouped bars of modelled time per output token, one group per network."""
    plt = _pyplot()
    ax = _by_network(summary, "ms_per_token").plot(kind="bar", figsize=(8, 4.5), rot=0)
    ax.set_ylabel("time per output token, ms (modelled)")
    ax.set_xlabel("network profile")
    ax.set_title("SpecWAN: time per token by system and network (virtual time)")
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close()
    return Path(path)


def plot_energy_per_token(summary: pd.DataFrame, path: str | Path) -> Path | None:
    """One panel per (role, kind) energy column; None when no energy figure exists."""
    cols = [c for c in summary.columns if "_J_per_token_" in c and summary[c].notna().any()]
    if not cols:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(6 * len(cols), 4.5), squeeze=False)
    for ax, col in zip(axes[0], cols):
        role, kind = col.split("_J_per_token_")
        _by_network(summary, col).plot(kind="bar", ax=ax, rot=0)
        ax.set_title(f"{role}: energy per output token ({kind})")
        ax.set_ylabel(f"J/token, {kind}" + (" (modelled device power)" if kind == "estimated" else ""))
        ax.set_xlabel("network profile")
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
