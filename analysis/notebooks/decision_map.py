# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Which system where: the decision map
#
# Over runs covering several network points (RTT x uplink bandwidth), the system that is best
# at each point on a chosen objective, and by how much it beats the runner-up:
#
# - `latency`: time per output token (TPOT);
# - `cloud_time`: cloud busy time per output token (verification compute, a batched pass
#   shared among the sessions it served);
# - `energy`: joules per output token, edge and cloud together.
#
# The margin is the fraction of the runner-up's cost the best system saves (1 - best /
# runner-up), with its paired bootstrap interval; systems within a relative `rtol` of the best
# are a tie and all named. See `analysis/decision.py`.
#
# Give the runs in the parameters cell below, or export `SPECWAN_RUNS=results/<sweep>` before
# starting the kernel.

# %% tags=["parameters"]
runs = None  # run folders or sweep folders (a path or a list); None: read SPECWAN_RUNS
objective = "latency"  # latency, cloud_time, energy, or a numeric request column
n_resamples = 9999  # bootstrap resamples for the margins' intervals (0: none)

# %%
import math

import pandas as pd

from analysis.decision import OBJECTIVES, decision_map, decision_table, objective_values
from analysis.load import load_runs
from analysis.notebooks import report_result, resolve_runs, show
from analysis.stats import paired_ratio

RUNS = resolve_runs(runs)
requests, rounds = load_runs(RUNS)
print(f"{len(requests)} request(s) of {', '.join(sorted(requests['system'].unique()))}")

# %% [markdown]
# ## The points covered

# %%
points = requests.groupby(["config.network.rtt_ms", "config.network.up_mbps"])["system"].agg(
    lambda s: ", ".join(sorted(s.unique())))
points.to_frame("systems")

# %% [markdown]
# ## The decision table

# %%
table = decision_table(requests, rounds, objective, n_resamples=n_resamples)
table[["config.network.rtt_ms", "config.network.up_mbps", "best", "value", "runner_up", "runner_up_value",
       "margin", "margin_low", "margin_high", "distinguishable", "provenance"]]

# %% [markdown]
# ## The map

# %%
figure = decision_map(requests, rounds, objective, table=table)
show(figure)

# %% [markdown]
# ## Every objective the records allow
#
# The same decision on each objective, side by side (a blank where the records lack what the
# objective needs).

# %%
winners = {}
for name, spec in OBJECTIVES.items():
    try:
        t = decision_table(requests, rounds, name, n_resamples=0)
    except ValueError as exc:
        print(f"{name}: not available ({exc})")
        continue
    winners[name] = t.set_index(["config.network.rtt_ms", "config.network.up_mbps"])["best"]
pd.DataFrame(winners)

# %% [markdown]
# ## Check: winners and margins by hand, margins against `analysis.stats`
#
# At every point: the per-system means recomputed with a plain groupby, the lowest picked, the
# margin recomputed; and the margin's ratio equals `paired_ratio` of the best against the
# runner-up where every request is paired.

# %%
values = requests.assign(value=objective_values(requests, rounds, objective))
checked = {}
for row in table.to_dict("records"):
    here = values[(values["config.network.rtt_ms"] == row["config.network.rtt_ms"])
                  & (values["config.network.up_mbps"] == row["config.network.up_mbps"])]
    means = here.dropna(subset=["value"]).groupby("system")["value"].mean().sort_values(kind="stable")
    assert means.iloc[0] == row["value"], (row, means)
    assert means.idxmin() in row["best"].split(" = ")
    if isinstance(row["runner_up"], str):
        assert math.isclose(row["margin"], 1 - means.iloc[0] / means[row["runner_up"]], rel_tol=1e-12)
        best = row["best"].split(" = ")[0]
        pairs = here[here["system"].isin([best, row["runner_up"]])]
        if pairs["value"].notna().all() and means.iloc[0] > 0:
            ratio = paired_ratio(pairs, "value", candidate=best, baseline=row["runner_up"], n_resamples=99)
            assert math.isclose(ratio.estimate, 1 / (1 - row["margin"]), rel_tol=1e-9), (ratio, row)
    checked[f"{row['config.network.rtt_ms']:g} ms / {row['config.network.up_mbps']:g} Mbit/s"] = {
        "best": row["best"], "margin": row["margin"], "runner_up": row["runner_up"]}
pd.DataFrame(checked).T

# %%
report_result({
    "objective": objective,
    "points": len(table),
    "decisions": checked,
    "cells": len([t for t in figure.axes[0].texts if str(t.get_gid()).startswith("cell:")]),
})
