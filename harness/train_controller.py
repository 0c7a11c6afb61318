"""``specwan train-controller RUN_DIR ... --out PATH``: train WISP's edge speculation controller.

Reads logged rounds (runs of system=sled or system=wisp record, per drafted token, the
draft's ``draft_features`` in the round's ``extra``), labels each judged token accepted or
rejected, and fits the rejection predictor of :mod:`systems.wisp.controller`.

Labels: with the round's ``verified`` and ``accepted``, token i (0-based, drafting order) was
accepted if ``i < accepted`` and rejected if ``i == accepted < verified``; later tokens, and
every token of a round whose extra says ``"discarded": true``, were never judged and are left
out.

The training recipe is SpecWAN's (WISP publishes none), every part a parameter: tokens are
split into training and held-out sets by request (or by round), seeded, so no request's
tokens sit on both sides; features are standardised with the training tokens' statistics; a
ReLU MLP (``hidden``, default 16, 16) is fitted with class-weighted binary cross-entropy
(rejections are the minority) and Adam; the threshold is the smallest value whose
false-alarm rate over the training tokens is at most ``target_false_alarm``; precision,
recall and false-alarm rate are then measured on the held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from systems.wisp.controller import FEATURES, RejectionPredictor

#: the fewest labelled tokens a training is attempted on (fewer cannot place a threshold)
MIN_TOKENS = 20
FEATURE_SYSTEMS = "runs of system=sled or system=wisp"
SPLITS = ("request", "round")


@dataclass
class LabelledTokens:
    """Judged draft tokens: ``features`` (n, 4), ``rejected`` (n,) bool, and for each token the
    index of its ``request`` and of its ``round`` (numbered over all runs), the groups a split
    keeps whole; ``pair`` (None if unrecorded) and the ``sources`` read."""

    features: np.ndarray
    rejected: np.ndarray
    request: np.ndarray
    round: np.ndarray
    pair: str | None
    sources: list[str]

    def __len__(self) -> int:
        return int(self.rejected.size)

    def groups(self, split_by: str) -> np.ndarray:
        """The group index of each token for a split by ``"request"`` or ``"round"``."""
        if split_by not in SPLITS:
            raise ValueError(f"split_by must be one of {SPLITS}, got {split_by!r}")
        return self.request if split_by == "request" else self.round


def _portable(run_dir: Path) -> str:
    """A run folder as the model file records it: relative to the working directory when
    inside it, else its name alone (a model file is shipped; no machine's paths in it)."""
    try:
        return str(run_dir.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return run_dir.name


def round_labels(n_features: int, verified: int, accepted: int, extra: dict | None = None) -> list[bool]:
    """The labels (True: rejected) of a round's first judged tokens, in drafting order.

    Token i is accepted if ``i < accepted``, rejected if ``i == accepted < verified``; later
    tokens and every token of a discarded round carry none and are not in the list.
    """
    if (extra or {}).get("discarded") is True:
        return []
    n, verified, accepted = int(n_features), int(verified), int(accepted)
    labels = [False] * min(accepted, n)
    if accepted < verified and accepted < n:
        labels.append(True)
    return labels


def collect(run_dirs: Sequence[str | Path]) -> LabelledTokens:
    """Every labelled token of the given run folders (ValueError, one line, when there is none)."""
    from harness.results import ResultsError, load_run

    if not run_dirs:
        raise ValueError(f"no run folders given (train on {FEATURE_SYSTEMS}, which record draft_features)")
    feats: list[list[float]] = []
    rejected: list[bool] = []
    req_idx: list[int] = []
    rnd_idx: list[int] = []
    requests: dict[tuple, int] = {}
    rounds: dict[tuple, int] = {}
    pairs: set[str] = set()
    sources = []
    for run_i, run_dir in enumerate(run_dirs):
        run_dir = Path(run_dir)
        try:
            manifest, _, table = load_run(run_dir)
        except (ResultsError, OSError, ValueError) as e:
            raise ValueError(f"{run_dir}: cannot be read as a run folder ({' '.join(str(e).split())})") from None
        sources.append(_portable(run_dir))
        key_fields = [f for f in (manifest.get("results") or {}).get("key_fields") or () if f in table.columns]
        found = False
        for row in table.to_dict("records"):
            try:
                extra = json.loads(row.get("extra") or "{}")
            except ValueError:
                raise ValueError(f"{run_dir}: round {row.get('round')} of request {row.get('request_id')}: "
                                 "extra is not valid JSON") from None
            values = extra.get("draft_features") if isinstance(extra, dict) else None
            if values is None:
                continue
            found = True
            where = f"{run_dir}: request {row['request_id']} round {row['round']}"
            if not isinstance(values, list):
                raise ValueError(f"{where}: draft_features is not a list")
            labels = round_labels(len(values), row["verified"], row["accepted"], extra)
            if not labels:
                continue
            if row.get("pair") is not None:
                pairs.add(str(row["pair"]))
            request_key = (run_i, row["request_id"], row.get("attempt"), *(row.get(f) for f in key_fields))
            req = requests.setdefault(request_key, len(requests))
            rnd = rounds.setdefault((*request_key, row["round"]), len(rounds))
            for i, label in enumerate(labels):
                f = values[i]
                if (not isinstance(f, (list, tuple)) or len(f) != len(FEATURES)
                        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in f)):
                    raise ValueError(f"{where}: draft_features[{i}] is not {len(FEATURES)} finite numbers "
                                     f"({', '.join(FEATURES)}): {f!r}")
                feats.append([float(v) for v in f])
                rejected.append(label)
                req_idx.append(req)
                rnd_idx.append(rnd)
        if not found:
            systems = sorted({str(s) for s in table["system"].dropna().unique()}) if "system" in table else []
            what = f"system={','.join(systems)}" if systems else "no rounds" if table.empty else "system unknown"
            raise ValueError(f"{run_dir}: no round records draft_features ({what}); only {FEATURE_SYSTEMS} "
                             "record them")
    if len(pairs) > 1:
        raise ValueError(f"the runs come from different pairs ({', '.join(sorted(pairs))}); a controller is "
                         "trained for one draft/target pair")
    return LabelledTokens(
        features=np.asarray(feats, dtype=np.float64).reshape(-1, len(FEATURES)),
        rejected=np.asarray(rejected, dtype=bool),
        request=np.asarray(req_idx, dtype=np.int64),
        round=np.asarray(rnd_idx, dtype=np.int64),
        pair=pairs.pop() if pairs else None,
        sources=sources,
    )


def split(groups: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the held-out tokens: a seeded ``test_fraction`` of the groups, kept whole."""
    ids = np.unique(groups)
    if ids.size < 2:
        raise ValueError(f"only {ids.size} group(s) of tokens: need at least 2 to hold some out "
                         "(record more requests, or split by round)")
    n_test = min(max(1, round(test_fraction * ids.size)), ids.size - 1)
    held = np.random.default_rng(seed).permutation(ids)[:n_test]
    return np.isin(groups, held)


def far_threshold(p_accepted: np.ndarray, target: float) -> float:
    """The smallest threshold whose false-alarm rate (share of ``p_accepted`` >= it) is <= ``target``.

    With k = floor(target * n) false alarms allowed, it is just above the (k+1)-th largest
    probability (0 when every accepted token may be flagged).
    """
    p = np.sort(np.asarray(p_accepted, dtype=np.float64))[::-1]
    k = int(math.floor(target * p.size + 1e-9))  # 1e-9: 0.1 * 30 must allow 3, not 2.9999
    if k >= p.size:
        return 0.0
    return float(min(np.nextafter(p[k], np.inf), 1.0))


def rates(predicted: np.ndarray, rejected: np.ndarray) -> dict[str, Any]:
    """Precision, recall and false-alarm rate of stop predictions (None where undefined) and the counts."""
    predicted, rejected = np.asarray(predicted, bool), np.asarray(rejected, bool)
    tp = int((predicted & rejected).sum())
    fp = int((predicted & ~rejected).sum())
    n_rej, n_acc = int(rejected.sum()), int((~rejected).sum())
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / n_rej if n_rej else None,
        "false_alarm_rate": fp / n_acc if n_acc else None,
        "accepted": n_acc,
        "rejected": n_rej,
    }


def train(run_dirs: Sequence[str | Path], target_false_alarm: float = 0.1, hidden: Sequence[int] = (16, 16),
          epochs: int = 200, seed: int = 0, test_fraction: float = 0.25, *, split_by: str = "request",
          lr: float = 1e-2, batch_size: int = 512) -> RejectionPredictor:
    """Fit a :class:`RejectionPredictor` on the labelled tokens of ``run_dirs`` (see the module doc)."""
    if not 0.0 <= target_false_alarm < 1.0:
        raise ValueError(f"the target false-alarm rate must be in [0, 1), got {target_false_alarm}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    hidden = tuple(int(h) for h in hidden)
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden layer sizes must be positive, got {hidden}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    data = collect(run_dirs)
    if len(data) < MIN_TOKENS:
        raise ValueError(f"only {len(data)} labelled token(s) in the runs; training needs at least {MIN_TOKENS}")
    if not data.rejected.any():
        raise ValueError(f"no rejected token among the {len(data)} labelled ones: nothing to predict")
    if data.rejected.all():
        raise ValueError(f"no accepted token among the {len(data)} labelled ones: no false-alarm rate to meet")
    held = split(data.groups(split_by), test_fraction, seed)
    x_tr, y_tr = data.features[~held], data.rejected[~held]
    x_te, y_te = data.features[held], data.rejected[held]
    if not y_tr.any() or y_tr.all():
        raise ValueError(f"the training split holds {'no rejected' if not y_tr.any() else 'no accepted'} token "
                         f"(seed {seed}); record more rounds or change the seed")
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant feature passes through centred
    layers = _fit((x_tr - mean) / std, y_tr, hidden, epochs, seed, lr, batch_size)
    model = RejectionPredictor(layers, mean, std, threshold=0.0)
    model.threshold = far_threshold(model.p_reject_many(x_tr[~y_tr]), target_false_alarm)
    train_rates = rates(model.p_reject_many(x_tr) >= model.threshold, y_tr)
    test_rates = rates(model.p_reject_many(x_te) >= model.threshold, y_te)
    model.metrics = {
        "precision": test_rates["precision"],
        "recall": test_rates["recall"],
        "false_alarm_rate": test_rates["false_alarm_rate"],
        "target_false_alarm": float(target_false_alarm),
        "train_false_alarm_rate": train_rates["false_alarm_rate"],
        "train_recall": train_rates["recall"],
        "source_runs": list(data.sources),
        "pair": data.pair,
        "n_train": int(y_tr.size),
        "n_test": int(y_te.size),
        "train_accepted": train_rates["accepted"],
        "train_rejected": train_rates["rejected"],
        "test_accepted": test_rates["accepted"],
        "test_rejected": test_rates["rejected"],
    }
    model.training = {"hidden": list(hidden), "epochs": int(epochs), "seed": int(seed),
                      "test_fraction": float(test_fraction), "split_by": split_by, "lr": float(lr),
                      "batch_size": int(batch_size), "optimizer": "adam",
                      "loss": "bce, rejections weighted by accepted/rejected"}
    return model


def _fit(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], epochs: int, seed: int, lr: float,
         batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train the MLP with torch on standardised features; its layers as float64 numpy arrays."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible sums, and no fight with whatever else runs here
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
            torch.manual_seed(seed)
            sizes = (len(FEATURES), *hidden, 1)
            mods: list[torch.nn.Module] = []
            for i in range(len(sizes) - 1):
                mods.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
                if i < len(sizes) - 2:
                    mods.append(torch.nn.ReLU())
            net = torch.nn.Sequential(*mods).double()
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
            yt = torch.from_numpy(y.astype(np.float64))
            pos_weight = torch.tensor([(~y).sum() / max(int(y.sum()), 1)], dtype=torch.float64)
            loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(seed)
            n = xt.shape[0]
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, batch_size):
                    idx = order[start:start + batch_size]
                    opt.zero_grad()
                    loss = loss_fn(net(xt[idx]).squeeze(1), yt[idx])
                    loss.backward()
                    opt.step()
            linears = [m for m in net if isinstance(m, torch.nn.Linear)]
            return [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()) for m in linears]
    finally:
        torch.set_num_threads(threads)


# ---- the command line ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train-controller`` arguments."""
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help=f"run folders to learn from ({FEATURE_SYSTEMS} record draft_features)")
    p.add_argument("--out", required=True, help="where to write the model (JSON)")
    p.add_argument("--target-false-alarm", type=float, default=0.1,
                   help="the largest share of accepted training tokens the controller may flag (default 0.1)")
    p.add_argument("--hidden", default="16,16", help="hidden layer sizes, comma-separated (default 16,16)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the training (default 0)")
    p.add_argument("--split-by", choices=SPLITS, default="request",
                   help="what the held-out set is drawn by, kept whole (default request)")


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--hidden must be layer sizes separated by commas (e.g. 16,16), got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


def _fmt(value: float | None, why: str) -> str:
    return f"{value:.3f}" if value is not None else f"n/a ({why})"


def main(args: argparse.Namespace) -> int:
    """Train, print the token counts and the held-out figures beside the target, write the model."""
    model = train(args.run_dirs, target_false_alarm=args.target_false_alarm, hidden=_hidden(args.hidden),
                  epochs=args.epochs, seed=args.seed, split_by=args.split_by)
    m = model.metrics
    print(f"labelled tokens: train {m['n_train']} ({m['train_accepted']} accepted, {m['train_rejected']} "
          f"rejected); held-out {m['n_test']} ({m['test_accepted']} accepted, {m['test_rejected']} rejected), "
          f"split by {args.split_by}")
    print(f"threshold {model.threshold:.4g}: training false-alarm rate "
          f"{_fmt(m['train_false_alarm_rate'], 'no accepted token')}, target {m['target_false_alarm']:g}")
    print(f"held-out: precision {_fmt(m['precision'], 'nothing flagged')}, "
          f"recall {_fmt(m['recall'], 'no rejected token')}, "
          f"false-alarm rate {_fmt(m['false_alarm_rate'], 'no accepted token')} (target {m['target_false_alarm']:g})")
    path = model.save(args.out)
    print(f"wrote {path}")
    return 0


__all__ = ["LabelledTokens", "MIN_TOKENS", "add_arguments", "collect", "far_threshold", "main", "rates",
           "round_labels", "split", "train"]
