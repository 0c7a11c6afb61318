"""Fitted pairs (:mod:`systems.engines.fitted`): fitted to real runs, or calibrated to a paper.

``specwan fit-pair RUN... --name N`` reads the per-token records of real runs (each round's
verified and accepted counts and the draft's confidence and entropy at every verified token,
``rounds.parquet``) and writes ``conf/pair/fitted_<N>.yaml``:

- the agreement chain: along each request's committed positions the draft agreed (an
  accepted token) or not (the rejected one); after a fully accepted round the bonus token's
  position is not observed. P(agree | run length r) is estimated by expectation-maximisation
  over those hidden positions;
- the confidence and entropy quantiles given agreement, from the verified positions of the
  committed sequence (draft tokens after a rejection were drafted on a context that was
  never committed and are left out);
- the stop hazard: requests that stopped before their token budget over all tokens.

Per category (the runs' workload) and pooled (``default``). The target's shape cannot be seen
from the edge's records; it is taken from ``--like`` (a pair whose value is kept, default
``paper_pipesd``) and marked assumed.

``specwan fit-pair --calibrate paper_pipesd`` instead searches the statistics (Optuna, a
seeded TPE) whose simulated runs of the paper's methods reproduce its published figures,
and writes the pair with the calibration's residuals.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

LEVELS = 21  # quantile knots at 0, 0.05, ..., 1
CHAIN_STATES = 6


class FitError(ValueError):
    """Runs cannot be fitted (no per-token records, sampled decoding, nothing verified)."""


# ---- statistics of rounds (shared by fits, calibrations and validations) -----------------------


@dataclass
class WindowStats:
    """What a set of verification rounds shows: draft length (verified tokens per verifying
    round), acceptance (accepted / verified), rollback rate (rounds with a rejection), and the
    per-position acceptance (P(accepted at position i | verified and all before accepted))."""

    rounds: int
    draft_length: float
    acceptance: float
    rollback: float
    per_position: list[float] = field(default_factory=list)
    per_position_n: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "draft_length": round(self.draft_length, 4),
                "acceptance": round(self.acceptance, 4), "rollback": round(self.rollback, 4),
                "per_position": [round(p, 4) for p in self.per_position], "per_position_n": self.per_position_n}


def window_stats(rounds: Iterable[tuple[int, int]], positions: int = 8) -> WindowStats:
    """:class:`WindowStats` of ``(verified, accepted)`` pairs (rounds that verified nothing are skipped)."""
    pairs = [(int(v), int(a)) for v, a in rounds if v > 0]
    if not pairs:
        raise FitError("no round verified any draft token")
    verified = sum(v for v, _ in pairs)
    accepted = sum(a for _, a in pairs)
    reached = [0] * positions
    kept = [0] * positions
    for v, a in pairs:
        for i in range(min(v, a + 1, positions)):
            reached[i] += 1
            kept[i] += i < a
    per = [k / n for k, n in zip(kept, reached) if n]
    return WindowStats(len(pairs), verified / len(pairs), accepted / verified,
                       sum(a < v for v, a in pairs) / len(pairs), per, [n for n in reached if n])


def records_stats(records, positions: int = 8) -> WindowStats:
    """:func:`window_stats` of in-memory request records (:class:`systems.records.RequestRecord`)."""
    return window_stats(((r.verified, r.accepted) for rec in records for r in rec.rounds
                         if not r.extra.get("discarded")), positions)


# ---- fitting from runs ----------------------------------------------------------------------


@dataclass
class _Request:
    """One request's committed positions: agreement (None: a bonus position, not observed),
    with the draft's confidence and entropy where observed."""

    agree: list[bool | None] = field(default_factory=list)
    conf: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)


def _requests_of(rounds_df) -> list[_Request]:
    out = []
    keys = ["_run", "request_id", "attempt"] if "_run" in rounds_df.columns else ["request_id", "attempt"]
    for _, group in rounds_df.sort_values([*keys, "round"]).groupby(keys):
        req = _Request()
        for row in group.itertuples(index=False):
            verified, accepted = int(row.verified), int(row.accepted)
            if verified == 0:
                continue
            conf = list(row.draft_conf) if row.draft_conf is not None else []
            ent = list(row.draft_entropy) if row.draft_entropy is not None else []
            if len(conf) != verified or len(ent) != verified:
                raise FitError(f"request {row.request_id} round {row.round}: {len(conf)} confidences for "
                               f"{verified} verified tokens")
            seen = accepted + (accepted < verified)
            req.agree += [True] * accepted + ([False] if accepted < verified else [None])
            req.conf += conf[:seen]
            req.entropy += ent[:seen]
        if req.agree:
            out.append(req)
    return out


def _stationary(p: np.ndarray) -> np.ndarray:
    """The stationary distribution over run lengths of the chain with P(agree | r) = ``p``."""
    n = len(p)
    move = np.zeros((n, n))
    for r in range(n):
        move[r, min(r + 1, n - 1)] += p[r]
        move[r, 0] += 1 - p[r]
    w = np.full(n, 1.0 / n)
    for _ in range(500):
        w = w @ move
    return w / w.sum()


def fit_chain(requests: Sequence[_Request], states: int = CHAIN_STATES, iterations: int = 60,
              tol: float = 1e-6, prior: float = 5.0) -> tuple[list[float], list[float]]:
    """P(agree | run length r) for r = 0..states-1 (the last: r >= states-1) by EM
    (forward-backward) over the unobserved bonus positions; and the expected visits of each
    state (its evidence). Each request starts in the chain's stationary mix: the chain runs
    over the prompt too. ``prior``: pseudo-observations at the overall agreement rate added
    to each state (a state seen a few dozen times with no disagreement is not certain)."""
    p = np.full(states, 0.7)
    nxt = np.minimum(np.arange(states) + 1, states - 1)
    visits = np.zeros(states)
    for _ in range(iterations):
        agree_n, visits = np.zeros(states), np.zeros(states)
        start = _stationary(p)
        for req in requests:
            obs = req.agree
            n = len(obs)
            alpha = np.empty((n + 1, states))
            alpha[0] = start
            for t, o in enumerate(obs):  # forward, scaled
                a = np.zeros(states)
                if o is None or o:
                    np.add.at(a, nxt, alpha[t] * p)
                if o is None or not o:
                    a[0] += (alpha[t] * (1 - p)).sum()
                alpha[t + 1] = a / a.sum()
            beta = np.ones(states)
            for t in range(n - 1, -1, -1):  # backward, with the expected counts of position t
                o = obs[t]
                on_agree = alpha[t] * p * beta[nxt] if o is None or o else np.zeros(states)
                on_reject = alpha[t] * (1 - p) * beta[0] if o is None or not o else np.zeros(states)
                z = on_agree.sum() + on_reject.sum()
                agree_n += on_agree / z
                visits += (on_agree + on_reject) / z
                b = np.zeros(states)
                if o is None or o:
                    b += p * beta[nxt]
                if o is None or not o:
                    b += (1 - p) * beta[0]
                beta = b / b.max()
        # a few pseudo-observations at the overall rate keep a rarely visited state from 0 or 1
        overall = agree_n.sum() / max(visits.sum(), 1e-12)
        new = (agree_n + prior * overall) / (visits + prior)
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    return [float(x) for x in p], [float(x) for x in visits]


def quantile_knots(samples: Sequence[float], low: float = 0.0, high: float | None = None) -> list[float]:
    """The samples' quantiles at :data:`LEVELS` equally spaced levels 0..1."""
    if not len(samples):
        raise FitError("no samples to take quantiles of")
    q = np.quantile(np.asarray(samples, dtype=np.float64), np.linspace(0.0, 1.0, LEVELS))
    q = np.maximum.accumulate(np.clip(q, low, high if high is not None else np.inf))
    return [round(float(x), 6) for x in q]


def _fit_category(requests: Sequence[_Request], like: Mapping[str, Any], states: int) -> dict:
    agree, visits = fit_chain(requests, states)
    # (agreed, confidence, entropy) at each observed position; the draft statistics exist only there
    seen = [(a, c, e) for r in requests for a, c, e in zip((x for x in r.agree if x is not None), r.conf, r.entropy)]
    conf_a, ent_a = [c for a, c, _ in seen if a], [e for a, _, e in seen if a]
    conf_d, ent_d = [c for a, c, _ in seen if not a], [e for a, _, e in seen if not a]
    if not conf_d:
        raise FitError("the draft never disagreed with the target in these runs: nothing to fit a rejection from")
    return {
        "agree": [round(x, 5) for x in agree],
        "conf_agree": quantile_knots(conf_a, 0.0, 1.0), "conf_disagree": quantile_knots(conf_d, 0.0, 1.0),
        "entropy_agree": quantile_knots(ent_a, 0.0), "entropy_disagree": quantile_knots(ent_d, 0.0),
        "target_conf": list(like["target_conf"]), "target_tail": int(like["target_tail"]),
        "eos_rate": None,  # set by the caller from the requests
        "fit": {"positions": sum(len(r.agree) for r in requests), "agreements": len(conf_a),
                "disagreements": len(conf_d), "requests": len(requests),
                "chain_evidence": [round(v, 1) for v in visits],
                "assumed": ["target_conf", "target_tail"]},
    }


def fit_runs(run_dirs: Sequence[str | Path], name: str, like: Mapping[str, Any], states: int = CHAIN_STATES,
             chars_per_token: float | None = None, wire_vocab: int | None = None) -> dict:
    """The pair mapping (``conf/pair`` form) fitted to ``run_dirs`` (see the module docstring)."""
    import pandas as pd

    from harness.results import ResultsError, load_run

    if not run_dirs:
        raise FitError("give at least one run folder to fit from")
    frames, requests_frames, sources, measured_cpt = [], [], [], []
    given_cpt = chars_per_token
    for run_dir in run_dirs:
        try:
            manifest, requests_df, rounds_df = load_run(run_dir)
        except ResultsError as exc:
            raise FitError(str(exc)) from None
        config = manifest.get("config", {})
        if float(config.get("temperature", 0.0) or 0.0) != 0.0:
            raise FitError(f"{run_dir}: temperature {config.get('temperature')}; fit from greedy runs "
                           "(temperature=0), where an accepted token means the draft's top token is the target's")
        if "draft_conf" not in rounds_df.columns:
            raise FitError(f"{run_dir}: its rounds have no per-token draft confidences (a run folder written "
                           "before they were recorded); run it again")
        rounds_df = rounds_df[rounds_df["extra"].map(lambda e: not json.loads(e or "{}").get("discarded"))]
        budget = int(config.get("max_new_tokens", 0) or 0)
        requests_df = requests_df.assign(_budget=budget)
        frames.append(rounds_df.assign(_run=len(frames)))  # request ids repeat across runs
        requests_frames.append(requests_df)
        sources.append({"run": Path(run_dir).name, "system": str(config.get("system", {}).get("name")),
                        "pair": str(config.get("pair", {}).get("name")),
                        "workload": str(config.get("workload", {}).get("name")),
                        "requests": int(len(requests_df)), "rounds": int(len(rounds_df))})
        wire_vocab = wire_vocab or _vocab_size(manifest)
        if chars_per_token is None and (cpt := prompt_chars_per_token(manifest, requests_df)) is not None:
            measured_cpt.append(cpt)
    rounds = pd.concat(frames, ignore_index=True)
    reqs = pd.concat(requests_frames, ignore_index=True)
    categories = {}
    groups = [("default", rounds, reqs)] + [(str(w), rounds[rounds["workload"] == w], reqs[reqs["workload"] == w])
                                            for w in sorted(rounds["workload"].unique())]
    for cat, rdf, qdf in groups:
        requests = _requests_of(rdf)
        if not requests:
            continue
        model = _fit_category(requests, like, states)
        tokens = int(qdf["n_tokens"].sum())
        stopped = int((qdf["n_tokens"] < qdf["_budget"]).sum())
        model["eos_rate"] = round(stopped / tokens, 6) if tokens else 0.0
        stats = window_stats(zip(rdf["verified"], rdf["accepted"]))
        model["fit"]["source_stats"] = stats.as_dict()
        categories[cat] = model
    if not categories:
        raise FitError("these runs verified no draft token: nothing to fit")
    if chars_per_token is None and measured_cpt:
        chars_per_token = round(sum(measured_cpt) / len(measured_cpt), 4)
    options = {"name": f"fitted_{name}", "vocab_size": 256, "wire_vocab_size": wire_vocab,
               "chars_per_token": chars_per_token or 3.5, "seed": 0,
               "category": "${oc.select:workload.name,default}", "categories": categories}
    return {"name": f"fitted_{name}",
            "description": f"fitted to {len(sources)} run(s) of {', '.join(sorted({s['pair'] for s in sources}))} "
                           "(modelled: systems/engines/fitted.py)",
            "fit": {"kind": "fitted to runs", "runs": sources, "chain_states": states,
                    "chars_per_token": "given" if given_cpt else (
                        "measured: the runs' workloads rendered here against their real prompt lengths"
                        if measured_cpt else "assumed (3.5): the runs' workloads could not be loaded")},
            "draft": {"engine": "fitted", "options": options},
            "target": {"engine": "fitted", "options": options}}


def prompt_chars_per_token(manifest: Mapping[str, Any], requests_df) -> float | None:
    """Characters per prompt token that give the run's prompts their real lengths: the run's
    workload rendered with a fitted engine's plain chat template (at one character a token)
    against the ``prompt_tokens`` the real tokenizer gave. None when the workload cannot be
    loaded here."""
    from systems.engines.fitted import FittedEngine
    from workloads import load_workload, workload_spec

    config = manifest.get("config", {})
    try:
        workload = load_workload(workload_spec(config["workload"]), int(config.get("max_new_tokens", 1)),
                                 seed=int(config.get("seed", 0)), progress=False)
        ruler = FittedEngine("target", categories={"default": _RULER}, chars_per_token=1.0, vocab_size=256)
        chars = {t.request_id: len(t.request.prompt) for t in workload.first_turns(ruler)}
    except Exception:  # noqa: BLE001 - any failure leaves the value assumed, and says so
        return None
    pairs = [(chars[rid.split("@")[0]], int(n)) for rid, n in zip(requests_df["request_id"], requests_df["prompt_tokens"])
             if rid.split("@")[0] in chars]
    if not pairs:
        return None
    return sum(c for c, _ in pairs) / sum(n for _, n in pairs)


#: statistics for an engine used only to measure rendered prompts
_RULER = {"agree": [1.0], "conf_agree": [1.0, 1.0], "conf_disagree": [0.5, 0.5], "entropy_agree": [0.0, 0.0],
          "entropy_disagree": [1.0, 1.0], "target_conf": [1.0, 1.0], "target_tail": 1, "eos_rate": 0.0}


def _vocab_size(manifest: Mapping[str, Any]) -> int | None:
    """The real pair's vocabulary size: read from the target's GGUF file where the manifest
    names one that is present; None otherwise (give ``--wire-vocab``)."""
    from systems.engines.gguf_vocab import gguf_vocab_tokens

    model = (manifest.get("models") or {}).get("target") or {}
    path = model.get("path") if isinstance(model, Mapping) else None
    if path and Path(path).is_file() and str(path).endswith(".gguf"):
        try:
            return len(gguf_vocab_tokens(path))
        except (OSError, ValueError):
            return None
    return None


# ---- writing ---------------------------------------------------------------------------------


def write_pair(mapping: Mapping[str, Any], path: Path) -> Path:
    """Write a fitted pair's YAML (draft and target share one options block)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # one options mapping, written twice in full: plain and explicit
            return True

    header = ("# A fitted pair (systems/engines/fitted.py), written by `specwan fit-pair`: draft and target\n"
              "# are statistical models; every figure they give is modelled. `fit` says from what.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.dump(_plain(mapping), Dumper=_Dumper, sort_keys=False, width=110))
    return path


def _plain(value: Any) -> Any:
    """Plain YAML-safe values (numpy scalars and tuples made Python floats, ints and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def print_fit(mapping: Mapping[str, Any], out=sys.stdout) -> None:
    """One block per category: the chain, the confidence medians, the source's window figures."""
    for cat, model in mapping["draft"]["options"]["categories"].items():
        fit = model.get("fit", {})
        chain = ", ".join(f"{p:.3f}" for p in model["agree"])
        print(f"  {cat}: P(agree | run 0..{len(model['agree']) - 1}+) = [{chain}]; confidence median "
              f"{model['conf_agree'][LEVELS // 2]:.3f} agreeing / {model['conf_disagree'][LEVELS // 2]:.3f} not; "
              f"stop rate {model['eos_rate']:.4f}/token; {fit.get('positions', '?')} positions", file=out)
        if (src := fit.get("source_stats")) is not None:
            print(f"    source: draft length {src['draft_length']:.2f}, acceptance {src['acceptance']:.3f}, "
                  f"rollback {src['rollback']:.3f}, per position {src['per_position']}", file=out)
