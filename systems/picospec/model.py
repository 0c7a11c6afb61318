"""PicoSpec's probabilistic performance model (arXiv 2603.19133 §3.4; addendum §1.4).

    P_hit = α^γ,  T_hit = max(T_draft, T_RTT + T_verify),  T_miss = T_draft + T_RTT + T_verify
    E[T_async] = α^γ · T_hit + (1 − α^γ) · T_miss
    R_async = E[L] / E[T_async],  R_sync = E[L] / (T_draft + T_RTT + T_verify)

The paper's E[L] is Eq. 5, (1 − α^γ)/(1 − α); :func:`report` predicts with the measured
tokens per round (our choice: the paper's Table 1 counts up to γ + 1 tokens a round, which
Eq. 5 does not) and also gives the pipelined throughput with Eq. 5's E[L]. Every input is taken
from a run's own round records (see :func:`inputs`), so the figures are "modelled from
measured inputs", beside the measured throughput.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

from systems.records import RequestRecord


@dataclass(frozen=True)
class ModelInputs:
    """The model's inputs: per-token acceptance α, draft tokens verified per round γ, and
    mean seconds per round of drafting, the link (both ways) and verification."""

    alpha: float
    gamma: float
    t_draft: float
    t_rtt: float
    t_verify: float
    expected_length: float  # E[L], tokens committed per round


def expected_length_eq5(alpha: float, gamma: float) -> float:
    """The paper's Eq. 5: E[L] = (1 − α^γ)/(1 − α) (γ when α = 1)."""
    return gamma if alpha >= 1.0 else (1.0 - alpha ** gamma) / (1.0 - alpha)


def predict(m: ModelInputs) -> dict:
    """E[T_async], the pipelined and the stop-and-wait throughput (tokens/s) of §3.4."""
    p_hit = m.alpha ** m.gamma
    t_hit = max(m.t_draft, m.t_rtt + m.t_verify)
    t_miss = m.t_draft + m.t_rtt + m.t_verify
    e_t_async = p_hit * t_hit + (1.0 - p_hit) * t_miss
    return {
        "p_hit": p_hit,
        "e_t_async_s": e_t_async,
        "throughput_async": m.expected_length / e_t_async if e_t_async > 0 else None,
        "throughput_sync": m.expected_length / t_miss if t_miss > 0 else None,
    }


def inputs(records: Sequence[RequestRecord]) -> ModelInputs | None:
    """The model's inputs from the round records of a run (None without a verified round).

    α: accepted / verified draft tokens; γ: verified tokens per round; T_draft: the
    drafting time per token (``t_draft`` / ``drafted``) times the tokens drafted per round
    (a pre-drafted round's first token included; drafts a verdict discarded, which the
    next round's record carries as waste, left out); T_RTT: uplink of the closing upload
    plus downlink of the verdict (serialization included, as the paper's T_RTT);
    T_verify: queueing plus the late part of verification (the part on the critical path;
    the early part of fast verification overlaps the drafting). Rounds answered unused
    (``discarded``) are left out.
    """
    rounds = [r for rec in records for r in rec.rounds
              if not r.extra.get("discarded") and r.t_verify is not None]
    if not rounds or not sum(r.verified for r in rounds):
        return None
    n = len(rounds)
    verified = sum(r.verified for r in rounds)
    drafted = sum(r.drafted for r in rounds)
    per_token = sum(r.t_draft for r in rounds) / drafted if drafted else 0.0
    discarded = sum(r.extra["predraft"]["discarded"] for r in rounds if "predraft" in r.extra)
    timed = [r for r in rounds if r.t_uplink is not None and r.t_downlink is not None]
    return ModelInputs(
        alpha=sum(r.accepted for r in rounds) / verified,
        gamma=verified / n,
        t_draft=per_token * (drafted - discarded) / n,
        t_rtt=sum(r.t_uplink + r.t_downlink for r in timed) / len(timed) if timed else 0.0,
        t_verify=sum((r.t_queue or 0.0) + r.t_verify for r in rounds) / n,
        expected_length=sum(r.emitted for r in rounds) / n,
    )


def report(records: Sequence[RequestRecord]) -> dict | None:
    """The model's prediction beside the measured throughput of a run (tokens/s)."""
    m = inputs(records)
    if m is None:
        return None
    tokens = sum(r.n_tokens for r in records)
    seconds = sum(r.e2e for r in records)
    rounds = [r for rec in records for r in rec.rounds if "predraft" in r.extra]
    kept = sum(bool(r.extra["predraft"]["kept"]) for r in rounds)
    eq5 = expected_length_eq5(m.alpha, m.gamma)
    out = {"inputs": asdict(m), "expected_length_eq5": eq5, **predict(m),
           "throughput_async_eq5": predict(replace(m, expected_length=eq5))["throughput_async"],
           "measured_throughput": tokens / seconds if seconds > 0 else None,
           "measured_p_hit": kept / len(rounds) if rounds else None}
    # without pre-drafting (parallel_draft off) the stop-and-wait form is the one that applies
    out["pipelined"] = bool(rounds)
    model = out["throughput_async"] if out["pipelined"] else out["throughput_sync"]
    out["model_error"] = (model / out["measured_throughput"] - 1.0) if model and out["measured_throughput"] else None
    out["summary"] = describe(out)
    return out


def describe(rep: dict) -> str:
    """One line: the model's throughput beside the measured one."""
    m = rep["inputs"]
    err = rep.get("model_error")
    which = "pipelined" if rep.get("pipelined") else "stop-and-wait"
    return (f"PicoSpec performance model (§3.4, modelled from this run's records): α={m['alpha']:.3f} "
            f"γ={m['gamma']:.2f} T_draft={1e3 * m['t_draft']:.1f} ms T_RTT={1e3 * m['t_rtt']:.1f} ms "
            f"T_verify={1e3 * m['t_verify']:.1f} ms E[L]={m['expected_length']:.2f}: "
            f"{rep['throughput_async']:.2f} tok/s pipelined, {rep['throughput_sync']:.2f} stop-and-wait; "
            f"measured {rep['measured_throughput']:.2f} tok/s"
            + (f" (model, {which}: {100 * err:+.1f}%)" if err is not None else ""))
