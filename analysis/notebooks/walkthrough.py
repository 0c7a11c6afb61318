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
# # One run, walked through
#
# What a run folder holds and how the suite's headline figures come out of it: the manifest
# (what ran, where, with which code), one row per request, and one row per verification round.
# TTFT, TPOT and the acceptance rate are recomputed here by hand from the raw timestamps and
# round counts, and checked against the figures the harness recorded. Nothing is re-run.
#
# Give the run folder in the parameters cell below, or export `SPECWAN_RUNS=results/<run>`
# before starting the kernel.

# %% tags=["parameters"]
runs = None  # one run folder (a path); None: read SPECWAN_RUNS
request_id = None  # the request whose rounds to draw; None: the first that drafted

# %%
import numpy as np
import pandas as pd

from analysis import figures as F
from analysis.load import load_runs
from analysis.notebooks import report_result, resolve_runs, show
from analysis.report import manifest_table, run_manifests

RUNS = resolve_runs(runs)
requests, rounds = load_runs(RUNS)
manifests = run_manifests(RUNS)
if len(manifests) != 1:
    raise ValueError(f"the walkthrough reads one run, got {len(manifests)}: {', '.join(manifests)} "
                     "(use sweep.py for several)")
(run, manifest), = manifests.items()
print(f"run {run}: {len(requests)} request(s), {len(rounds)} round(s)")

# %% [markdown]
# ## The manifest
#
# The summary the report shows, then the entries behind it: the clock (virtual time is
# *modelled* from device profiles and the link model; wall time is *measured*), the link, the
# models and where energy figures come from.

# %%
manifest_table(manifests, requests).T

# %%
link = manifest.get("link") or {}
configured = link.get("configured") or {}
pd.Series({
    "created": manifest.get("created"),
    "clock": manifest.get("clock"),
    "config hash": manifest.get("config_hash"),
    "link backend": link.get("backend"),
    "link RTT, ms (configured)": configured.get("rtt_ms"),
    "link uplink, Mbit/s (configured)": configured.get("up_mbps"),
    "link measured": link.get("measured"),
    "draft model": (manifest.get("models") or {}).get("draft", {}).get("file"),
    "target model": (manifest.get("models") or {}).get("target", {}).get("file"),
    "edge device": (manifest.get("device_profiles") or {}).get("edge", {}).get("name"),
    "cloud device": (manifest.get("device_profiles") or {}).get("cloud", {}).get("name"),
}, dtype=object).to_frame("value")

# %% [markdown]
# ## The requests
#
# One row per request (the last attempt of each). Times are seconds on the run's clock.

# %%
REQUEST_COLUMNS = ["request_id", "system", "network", "category", "n_tokens", "ttft", "tpot", "e2e", "rounds",
                   "drafted", "accepted", "acceptance_rate", "bytes_up", "bytes_down", "error"]
requests[[c for c in REQUEST_COLUMNS if c in requests.columns]]

# %% [markdown]
# ## TTFT, TPOT and acceptance by hand
#
# - **TTFT**: the first token's time minus the request's start;
# - **TPOT**: the time from the first token to the end, over the tokens after the first;
# - **acceptance rate**: draft tokens accepted over draft tokens the cloud judged (verified),
#   summed over the request's rounds.

# %%
first_token = requests["token_times"].map(lambda t: t[0] if len(t) else np.nan)
by_hand = pd.DataFrame({"request_id": requests["request_id"]})
by_hand["ttft"] = first_token - requests["start"]
by_hand["tpot"] = ((requests["end"] - first_token) / (requests["n_tokens"] - 1)).where(requests["n_tokens"] > 1)
keys = ["request_id", "attempt"]
sums = rounds.groupby(keys)[["accepted", "verified"]].sum()
judged = requests[keys].merge(sums.reset_index(), on=keys, how="left")
by_hand["acceptance_rate"] = (judged["accepted"] / judged["verified"]).where(judged["verified"] > 0).to_numpy()
for column in ("ttft", "tpot", "acceptance_rate"):
    recorded = requests[column].to_numpy(dtype=float)
    np.testing.assert_allclose(by_hand[column].to_numpy(dtype=float), recorded, rtol=1e-12, equal_nan=True,
                               err_msg=f"{column} by hand differs from the recorded figure")
by_hand.assign(**{f"{c} (recorded)": requests[c] for c in ("ttft", "tpot", "acceptance_rate")})

# %% [markdown]
# Over the run: the mean TPOT and the acceptance rate pooled over every round (not the mean of
# the requests' rates, which weighs a short request as much as a long one).

# %%
mean_tpot = float(by_hand["tpot"].mean())
pooled_acceptance = float(rounds["accepted"].sum() / rounds["verified"].sum()) if rounds["verified"].sum() else None
print(f"mean TPOT {mean_tpot * 1e3:.2f} ms/token ({F.time_provenance(requests)}); "
      f"pooled acceptance {pooled_acceptance if pooled_acceptance is None else round(pooled_acceptance, 3)}")

# %% [markdown]
# ## One request's rounds
#
# Each round's draft, uplink, queue, verify and downlink phases on the run's clock.

# %%
figure = None
if rounds.empty:
    print("no rounds recorded in this run (an edge-only baseline): no timeline")
else:
    figure = F.round_timeline(requests, rounds, request_id=request_id)
    chosen = F.pick_request(rounds, request_id=request_id)
    print(F.figure_caption(figure))
show(figure)

# %%
report_result({
    "run": run,
    "n_requests": int(len(requests)),
    "mean_tpot": mean_tpot,
    "mean_ttft": float(by_hand["ttft"].mean()),
    "pooled_acceptance": pooled_acceptance,
    "timeline_request": None if figure is None else str(chosen["request_id"].iloc[0]),
    "timeline_rounds": 0 if figure is None else int(len(chosen)),
})
