"""Metrics over many requests, from the records: inter-token latency, SLO attainment, goodput.

    requests, rounds = load_runs("results/bench-qwen25coder")
    chunks = token_chunks(requests)            # one row per burst of tokens after the first
    itl = itl_summary(requests)                 # per system and network: median / p90 / p99
    table = goodput(requests, SLO.parse("ttft:500,tpot:100"))

**Inter-token latency (ITL).** Speculative decoding emits tokens in bursts: a verdict commits
several at one instant. Following vLLM's serving benchmark, ITL is the gap between
consecutive *chunks* (the distinct instants at which a request's output grew), so a burst
counts once and no zero gaps are averaged in; ``itl_per_token`` divides each gap by the
tokens that chunk brought, as SGLang's benchmark does since it learned that per-chunk ITL
overstates the wait per token under SD (anchors.md §vLLM, §SGLang). The first chunk's wait
is the TTFT, not an ITL.

**Goodput** (vLLM's ``--goodput``, DistServe): requests that meet every given SLO per second
of serving. Runs here serve one request at a time on one edge device, so the serving time of
a group is the sum of its requests' end-to-end latencies. A request that failed meets no SLO;
a one-token request has no TPOT and cannot miss a TPOT objective.

Times are in seconds throughout; their provenance is the records' clock (modelled in virtual
time, measured on the wall clock). Nothing is re-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: columns that identify a request across loaded runs (those present are kept on each chunk)
REQUEST_KEYS = ("run", "system", "network", "pair", "workload", "prompt_id", "request_id", "attempt", "clock")
DEFAULT_BY = ("system", "network")
PERCENTILES = (50, 90, 99)


def _failed(requests: pd.DataFrame) -> pd.Series:
    if "error" not in requests.columns:
        return pd.Series(False, index=requests.index)
    return requests["error"].notna() & (requests["error"].astype(str) != "")


def token_chunks(requests: pd.DataFrame) -> pd.DataFrame:
    """One row per chunk after a request's first: ``chunk`` (1 = the second burst), ``tokens``
    (how many it brought), ``itl`` (seconds since the previous chunk) and ``itl_per_token``
    (``itl / tokens``), with the request's identifying columns. Failed requests are left out."""
    keys = [k for k in REQUEST_KEYS if k in requests.columns]
    rows = []
    for rec in requests.loc[~_failed(requests), [*keys, "token_times"]].to_dict("records"):
        times = np.asarray(rec["token_times"] if rec["token_times"] is not None else [], dtype=float)
        if times.size == 0:
            continue
        instants, counts = np.unique(times, return_counts=True)  # sorted: emission times never go back
        for i in range(1, len(instants)):
            gap = float(instants[i] - instants[i - 1])
            rows.append({**{k: rec[k] for k in keys}, "chunk": i, "tokens": int(counts[i]), "itl": gap,
                         "itl_per_token": gap / int(counts[i])})
    return pd.DataFrame(rows, columns=[*keys, "chunk", "tokens", "itl", "itl_per_token"])


def itl_summary(requests: pd.DataFrame, by: Sequence[str] = DEFAULT_BY) -> pd.DataFrame:
    """Per group of ``by``: ``chunks`` and ``tokens_per_chunk`` (mean), then the 50th, 90th and
    99th percentiles of ``itl`` and ``itl_per_token`` over every chunk of the group's requests
    (``itl_p50`` ...; seconds). A group whose requests all emitted one chunk has no row."""
    chunks = token_chunks(requests)
    by = [c for c in by if c in chunks.columns]
    rows = []
    for point, group in chunks.groupby(by, sort=False, dropna=False):
        point = point if isinstance(point, tuple) else (point,)
        row = {**dict(zip(by, point)), "chunks": len(group), "tokens_per_chunk": float(group["tokens"].mean())}
        for column in ("itl", "itl_per_token"):
            for q in PERCENTILES:
                row[f"{column}_p{q}"] = float(np.percentile(group[column], q))
        rows.append(row)
    columns = [*by, "chunks", "tokens_per_chunk",
               *(f"{c}_p{q}" for c in ("itl", "itl_per_token") for q in PERCENTILES)]
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives on a request, in seconds (None: not constrained)."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str) -> "SLO":
        """``"ttft:500,tpot:100"`` (milliseconds, as vLLM's ``--goodput`` takes them) as an SLO;
        ValueError naming the bad part."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, ms = part.partition(":")
            if not sep or name not in ("ttft", "tpot", "e2e"):
                raise ValueError(f"SLO {part!r}: write metric:milliseconds with metric ttft, tpot or e2e "
                                 "(e.g. ttft:500,tpot:100)")
            try:
                value = float(ms)
            except ValueError:
                raise ValueError(f"SLO {part!r}: {ms!r} is not a number of milliseconds") from None
            if not value > 0:
                raise ValueError(f"SLO {part!r}: the limit must be > 0 ms")
            values[name] = value / 1e3
        if not values:
            raise ValueError("an SLO needs at least one of ttft, tpot, e2e (e.g. ttft:500,tpot:100)")
        return cls(**values)

    def describe(self) -> str:
        """``"TTFT <= 500 ms, TPOT <= 100 ms"``."""
        return ", ".join(f"{name.upper()} <= {1e3 * v:g} ms" for name, v in
                         (("ttft", self.ttft), ("tpot", self.tpot), ("e2e", self.e2e)) if v is not None)


def slo_met(requests: pd.DataFrame, slo: SLO) -> pd.Series:
    """Per request, whether it meets every objective of ``slo`` (see the module's rules)."""
    met = ~_failed(requests)
    for name in ("ttft", "tpot", "e2e"):
        limit = getattr(slo, name)
        if limit is None:
            continue
        value = pd.to_numeric(requests[name], errors="coerce")
        ok = value <= limit
        if name == "tpot":  # a one-token request has no TPOT to miss
            ok |= value.isna() & (requests["n_tokens"] <= 1)
        met &= ok.fillna(False)
    return met.astype(bool)


def goodput(requests: pd.DataFrame, slo: SLO, by: Sequence[str] = DEFAULT_BY) -> pd.DataFrame:
    """Per group of ``by``: ``requests``, ``met`` (meeting every objective), ``attainment``
    (met / requests), ``serving_s`` (the sum of end-to-end latencies: requests one after
    another) and ``goodput`` (met / serving_s, requests per second)."""
    frame = requests.assign(_met=slo_met(requests, slo), _e2e=pd.to_numeric(requests["e2e"], errors="coerce"))
    by = [c for c in by if c in frame.columns]
    rows = []
    for point, group in frame.groupby(by, sort=False, dropna=False):
        point = point if isinstance(point, tuple) else (point,)
        serving = float(group["_e2e"].sum())
        met = int(group["_met"].sum())
        rows.append({**dict(zip(by, point)), "requests": len(group), "met": met, "attainment": met / len(group),
                     "serving_s": serving, "goodput": met / serving if serving > 0 else float("nan")})
    return pd.DataFrame(rows, columns=[*by, "requests", "met", "attainment", "serving_s", "goodput"])


def wasted_per_request(requests: pd.DataFrame, rounds: pd.DataFrame) -> pd.Series:
    """Per request (aligned with ``requests``): the draft tokens its rounds wasted (drafted,
    then thrown away: rejected, or drafted past a verdict that made them moot); 0 for a
    request without rounds."""
    keys = [k for k in ("run", "request_id", "attempt") if k in requests.columns and k in rounds.columns]
    if rounds.empty or "wasted" not in rounds.columns:
        return pd.Series(0, index=requests.index, dtype="int64")
    totals = rounds.groupby(keys, dropna=False)["wasted"].sum()
    index = pd.MultiIndex.from_frame(requests[keys]) if len(keys) > 1 else pd.Index(requests[keys[0]])
    return pd.Series(totals.reindex(index).fillna(0).astype("int64").to_numpy(), index=requests.index)


__all__ = ["SLO", "goodput", "itl_summary", "slo_met", "token_chunks", "wasted_per_request"]
