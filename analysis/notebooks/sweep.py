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
# # A sweep: systems x networks
#
# Several runs side by side: each metric's median per system and network with a bootstrap
# confidence interval, every system's paired speedup over the autoregressive baseline (the
# same prompts, turns and seeds compared pair by pair), and the speedup against the RTT.
#
# Give the runs (run folders, or a folder holding them) in the parameters cell below, or
# export `SPECWAN_RUNS=results/<sweep>` before starting the kernel.

# %% tags=["parameters"]
runs = None  # run folders or sweep folders (a path or a list); None: read SPECWAN_RUNS
baseline = None  # the system speedups are measured against; None: cloud_only, else vanilla
metric = "tpot"  # the time-per-token column the speedups compare
n_resamples = 9999  # bootstrap resamples for every interval

# %%
import math

import pandas as pd

from analysis import figures as F
from analysis.load import load_runs
from analysis.notebooks import report_result, resolve_runs, show
from analysis.report import manifest_table, run_manifests, summary_table
from analysis.stats import paired_ratio, summarise

RUNS = resolve_runs(runs)
requests, rounds = load_runs(RUNS)
manifests = run_manifests(RUNS)
print(f"{len(manifests)} run(s), {len(requests)} request(s), {len(rounds)} round(s); systems: "
      f"{', '.join(sorted(requests['system'].unique()))}; networks: {', '.join(sorted(requests['network'].unique()))}")
manifest_table(manifests, requests)

# %% [markdown]
# ## Summary per system and network
#
# Cells: median [95% bootstrap CI] and where the number comes from (*modelled*: virtual time;
# *measured*: wall clock or counted; *estimated*: an energy model).

# %%
summary_table(requests, n_resamples=n_resamples)

# %% [markdown]
# The same for one metric as numbers, straight from `analysis.stats.summarise`:

# %%
time_summary = summarise(requests, metric, by=["system", "network"], n_resamples=n_resamples)
time_summary

# %% [markdown]
# ## Paired speedup
#
# Speedup = mean of the baseline's `metric` / mean of the system's, over the same prompts
# (paired); the interval is the paired BCa bootstrap. An interval that holds 1 means the two
# cannot be told apart at this level.

# %%
speedups = F.speedup_table(requests, baseline=baseline, metric=metric, n_resamples=n_resamples)
BASELINE = speedups["baseline"].iloc[0]
speedups[["candidate", "network", "baseline", "estimate", "low", "high", "n_pairs", "verdict", "note"]]

# %% [markdown]
# ## Speedup against the RTT

# %%
spec = next(s for s in F.FIGURES if s.name == "speedup_vs_rtt")
why_not = spec.check(requests, rounds)
figure = None if why_not else F.speedup_vs_rtt(requests, rounds, baseline=BASELINE, metric=metric)
print(f"not drawn: {why_not}" if why_not else F.figure_caption(figure))
show(figure)

# %% [markdown]
# ## Check: the table's speedups are `analysis.stats`' paired ratios
#
# Each row recomputed directly: the ratio of means over the pairs, and `paired_ratio` on the
# network's rows.

# %%
checked = {}
for row in speedups.itertuples(index=False):
    if not math.isfinite(row.estimate):
        continue
    rows = requests[(requests["network"] == row.network) & requests["system"].isin([row.candidate, BASELINE])]
    direct = paired_ratio(rows, metric, candidate=row.candidate, baseline=BASELINE, n_resamples=n_resamples)
    assert direct.estimate == row.estimate and (direct.low, direct.high) == (row.low, row.high), row
    ok = rows["error"].isna() & rows[metric].notna()
    cand = rows[ok & (rows["system"] == row.candidate)].set_index(["prompt_id", "request_id", "seed"])[metric]
    base = rows[ok & (rows["system"] == BASELINE)].set_index(["prompt_id", "request_id", "seed"])[metric]
    both = cand.index.intersection(base.index)
    by_hand = base.loc[both].mean() / cand.loc[both].mean()
    assert math.isclose(by_hand, row.estimate, rel_tol=1e-12), (by_hand, row.estimate)
    checked[f"{row.candidate}@{row.network}"] = row.estimate
print(f"{len(checked)} speedup(s) checked against analysis.stats.paired_ratio and by hand")
pd.Series(checked, name=f"speedup over {BASELINE} ({metric})")

# %%
report_result({
    "runs": len(manifests),
    "baseline": BASELINE,
    "metric": metric,
    "speedups": checked,
    "figure": None if figure is None else "speedup_vs_rtt",
    "figure_lines": [] if figure is None else sorted(
        str(line.get_gid())[len("speedup:"):] for line in figure.axes[0].lines
        if str(line.get_gid()).startswith("speedup:")),
})
