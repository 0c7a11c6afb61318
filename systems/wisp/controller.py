"""WISP's edge speculation controller: a small MLP that predicts the target's rejection.

WISP (Li et al., SIGMETRICS 2026, arXiv 2601.11652; notes: research/papers.md §3) runs, per
drafted token, an MLP on the draft's own output statistics (confidence, entropy, top-1/top-2
margin, logit spread) that predicts whether the target will reject the token; the edge stops
drafting, and sends the verification request, as soon as it predicts a rejection. The
predictor is trained offline on logged rounds of the same draft/target pair for a low
false-alarm rate (predicting rejection for a token the target accepts).

WISP-like, not WISP: the paper publishes neither the MLP's size, nor its threshold, nor how
it is trained. Everything here beyond the four features and the stop rule is SpecWAN's
design, and each choice is a parameter of :func:`harness.train_controller.train`: the hidden
layer sizes (default 16, 16), ReLU between layers and a sigmoid out, the input standardised
with the training tokens' mean and std, and the threshold chosen as the smallest one whose
false-alarm rate on the training tokens is at most a target (default 0.1).

Inference is numpy only (float64); torch is needed only to train.

Model file (JSON, written by :meth:`RejectionPredictor.save`)::

    {"format": "specwan.wisp_controller", "version": 1,
     "features": ["confidence", "entropy", "margin", "spread"],
     "activation": "relu", "output": "sigmoid",
     "layers": [{"W": [[...]], "b": [...]}, ...],    # W is (out, in); h = relu(W @ h + b)
     "normaliser": {"mean": [4 floats], "std": [4 floats]},
     "threshold": float,                               # stop iff p_reject >= threshold
     "metrics": {...},                                 # held-out figures and provenance
     "training": {...},                                # the trainer's parameters
     "note": "..."}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from systems.sampling import softmax

FEATURES = ("confidence", "entropy", "margin", "spread")
FORMAT = "specwan.wisp_controller"
FORMAT_VERSION = 1
NOTE = ("WISP-like controller: WISP (arXiv 2601.11652) publishes no MLP size, threshold or training "
        "procedure; these are SpecWAN's choices (see systems/wisp/controller.py)")


def draft_features(logits) -> tuple[float, float, float, float]:
    """The controller's four inputs for one row of raw draft logits, at temperature 1, in float64.

    confidence = max softmax probability; entropy = -sum p log p (nats); margin = top-1 minus
    top-2 probability (the top-1 probability when the row has one token); spread = the
    (population) standard deviation of the finite logits (a -inf logit, a masked token, has
    no probability and no place in the spread).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1 and z.size >= 2 and np.isfinite(z).all():
        block = _block_features(z[None, :])
        if block is not None:
            return block[0]
    return _row_features(z)


def _row_features(z: np.ndarray) -> tuple[float, float, float, float]:
    """:func:`draft_features` of one float64 row, whatever it holds (masked tokens, underflow)."""
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"draft_features takes one non-empty row of logits, got shape {z.shape}")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ValueError("draft_features: the logits hold NaN or +inf")
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        raise ValueError("draft_features: every logit is -inf")
    p = softmax(z)
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    if p.size == 1:
        top1, top2 = float(p[0]), 0.0
    else:
        top2, top1 = (float(v) for v in np.partition(p, p.size - 2)[-2:])
    return top1, max(entropy, 0.0), top1 - top2, float(finite.std())


def draft_features_many(rows) -> list[tuple[float, float, float, float]]:
    """:func:`draft_features` of each row of a (k, vocab) array of raw draft logits, at once
    (a drafting round's rows in one go: a few numpy calls for the block, not a dozen a row)."""
    z = np.asarray(rows, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"draft_features_many takes a (k, vocab) block of logits, got shape {z.shape}")
    if z.shape[0] and z.shape[1] >= 2 and np.isfinite(z).all():
        block = _block_features(z)
        if block is not None:
            return block
    return [_row_features(r) for r in z]


def _block_features(z: np.ndarray) -> list[tuple[float, float, float, float]] | None:
    """The features of each row of a finite (k, n >= 2) float64 block; None if a probability
    underflows to 0 (then :func:`_row_features` leaves it out of the entropy, row by row).

    The arithmetic is :func:`_row_features`'s, in the same order, row-wise (numpy reduces each
    row of a contiguous block over its last axis as it reduces one row alone, and ndarray.std
    is its mean, squared deviations, their mean, a square root), so each row gets the
    features it gets alone.
    """
    n = z.shape[1]
    e = np.exp(z - z.max(axis=1, keepdims=True))  # systems.sampling.softmax, row-wise
    p = e / e.sum(axis=1, keepdims=True)
    if not p.min() > 0.0:
        return None
    entropy = -(p * np.log(p)).sum(axis=1)
    top = np.partition(p, n - 2, axis=1)[:, -2:]
    mean = z.sum(axis=1, keepdims=True)
    mean /= n
    dev = np.subtract(z, mean)
    np.square(dev, out=dev)
    var = dev.sum(axis=1)
    var /= n
    spread = np.sqrt(var)
    return [(t1, max(h, 0.0), t1 - t2, s)
            for (t2, t1), h, s in zip(top.tolist(), entropy.tolist(), spread.tolist())]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # the two branches keep exp() from overflowing and small probabilities from rounding to 0
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


class RejectionPredictor:
    """A trained controller: MLP weights, feature normaliser, stop threshold and its metadata.

    ``layers``: ``[(W, b), ...]`` with ``W`` of shape (out, in); ReLU between layers, a
    sigmoid on the last (one output: the probability that the target rejects the token).
    ``mean``/``std``: the training features' statistics, applied before the first layer.
    ``metrics``: held-out ``precision``, ``recall``, ``false_alarm_rate`` (None where
    undefined), the ``target_false_alarm``, ``source_runs``, ``n_train``, ``n_test``,
    ``pair`` (None if unknown) and token counts. ``training``: the trainer's parameters.
    """

    def __init__(self, layers: Sequence[tuple[Any, Any]], mean, std, threshold: float,
                 metrics: Mapping[str, Any] | None = None, training: Mapping[str, Any] | None = None):
        self.layers = [(np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)) for W, b in layers]
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.threshold = float(threshold)
        self.metrics = dict(metrics or {})
        self.training = dict(training or {})
        problem = _check(self.layers, self.mean, self.std, self.threshold)
        if problem:
            raise ValueError(problem)

    @property
    def hidden(self) -> tuple[int, ...]:
        """The hidden layer sizes."""
        return tuple(W.shape[0] for W, _ in self.layers[:-1])

    def p_reject_many(self, features) -> np.ndarray:
        """P(the target rejects) for each row of an (n, 4) feature array."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURES):
            raise ValueError(f"features must be an (n, {len(FEATURES)}) array ({', '.join(FEATURES)}), "
                             f"got shape {x.shape}")
        h = (x - self.mean) / self.std
        for i, (W, b) in enumerate(self.layers):
            h = h @ W.T + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return _sigmoid(h[:, 0])

    def p_reject(self, features) -> float:
        """P(the target rejects) for one token's (confidence, entropy, margin, spread)."""
        x = np.asarray(features, dtype=np.float64)
        if x.shape != (len(FEATURES),):
            raise ValueError(f"features must be the {len(FEATURES)} values ({', '.join(FEATURES)}), "
                             f"got shape {x.shape}")
        return float(self.p_reject_many(x[None, :])[0])

    def stop(self, features) -> bool:
        """Whether to stop drafting after this token (predicted rejection: p_reject >= threshold)."""
        return self.p_reject(features) >= self.threshold

    # ---- the file ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The model file's content."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "features": list(FEATURES),
            "activation": "relu",
            "output": "sigmoid",
            "layers": [{"W": W.tolist(), "b": b.tolist()} for W, b in self.layers],
            "normaliser": {"mean": self.mean.tolist(), "std": self.std.tolist()},
            "threshold": self.threshold,
            "metrics": _jsonable(self.metrics),
            "training": _jsonable(self.training),
            "note": NOTE,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as JSON (floats written exactly: a reload predicts bit for bit alike)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RejectionPredictor":
        """Read a model file; a missing or malformed one raises ValueError naming the file and the problem."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ValueError(f"{path}: no such controller file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot be read ({e})") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Any) -> "RejectionPredictor":
        """The predictor a :meth:`to_dict` mapping describes (ValueError with the problem otherwise)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a WISP controller file (format {got!r}, expected {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"controller format version {data.get('version')!r}; this code reads {FORMAT_VERSION}")
        if data.get("features") != list(FEATURES):
            raise ValueError(f"features {data.get('features')!r}; this code computes {list(FEATURES)}")
        if data.get("activation", "relu") != "relu" or data.get("output", "sigmoid") != "sigmoid":
            raise ValueError("only a ReLU MLP with a sigmoid output is supported")
        layers = data.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ValueError("'layers' must be a non-empty list")
        parsed = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or "W" not in layer or "b" not in layer:
                raise ValueError(f"layer {i}: must be an object with 'W' and 'b'")
            parsed.append((_array(layer["W"], f"layer {i} W", 2), _array(layer["b"], f"layer {i} b", 1)))
        norm = data.get("normaliser")
        if not isinstance(norm, dict) or "mean" not in norm or "std" not in norm:
            raise ValueError("'normaliser' must be an object with 'mean' and 'std'")
        threshold = data.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"'threshold' must be a number, got {threshold!r}")
        for key in ("metrics", "training"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"{key!r} must be an object")
        return cls(parsed, _array(norm["mean"], "normaliser mean", 1), _array(norm["std"], "normaliser std", 1),
                   float(threshold), data.get("metrics"), data.get("training"))

    def __repr__(self) -> str:
        return (f"RejectionPredictor(hidden={self.hidden}, threshold={self.threshold:.6g}, "
                f"pair={self.metrics.get('pair')!r})")


def _array(value: Any, what: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a {'matrix' if ndim == 2 else 'list'} of numbers") from None
    if arr.ndim != ndim:
        raise ValueError(f"{what} is not a {'matrix' if ndim == 2 else 'list'} of numbers")
    return arr


def _check(layers, mean, std, threshold) -> str | None:
    """The first problem with a predictor's arrays, or None."""
    n = len(FEATURES)
    if not layers:
        return "the MLP has no layers"
    width = n
    for i, (W, b) in enumerate(layers):
        if W.ndim != 2 or b.ndim != 1 or W.shape[1] != width or b.shape[0] != W.shape[0]:
            return (f"layer {i}: W {W.shape} and b {b.shape} do not fit an input of {width} "
                    f"(W must be (out, {width}) and b (out,))")
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            return f"layer {i}: non-finite weights"
        width = W.shape[0]
    if width != 1:
        return f"the last layer has {width} outputs; the controller has one (p_reject)"
    if mean.shape != (n,) or std.shape != (n,):
        return f"normaliser mean and std must have {n} values, got {mean.shape[0] if mean.ndim else 0} and " \
               f"{std.shape[0] if std.ndim else 0}"
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        return "normaliser: mean must be finite and std finite and > 0"
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        return f"threshold must be in [0, 1], got {threshold!r}"
    return None


def _jsonable(obj: Any) -> Any:
    """Metadata as plain JSON (numpy scalars to floats, tuples to lists, non-finite to None)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


__all__ = ["FEATURES", "FORMAT", "FORMAT_VERSION", "RejectionPredictor", "draft_features", "draft_features_many"]
