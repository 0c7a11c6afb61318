"""A drafting round that notes each token's features and may stop where a predictor says."""

from __future__ import annotations

from typing import Callable

import numpy as np

from systems.protocol import SpeculativeEdge
from systems.wisp.controller import draft_features, draft_features_many


async def draft_round(edge: SpeculativeEdge, limit: int, log_features: bool,
                      stop: Callable[[tuple[float, ...]], bool] | None = None) -> bool:
    """Draft up to ``limit`` tokens into the open window: fewer at a stop token, at the length
    limit, or at the first token for which ``stop(features)`` is true (that token is kept:
    drafted already, it costs the verifier one position, and is accepted if the prediction
    was a false alarm). With ``log_features`` each token's [confidence, entropy, margin,
    spread] goes into the round's record as ``draft_features``. True when ``stop`` ended it."""
    rows, features, stopped = [], [], False
    for _ in range(min(limit, edge.remaining - 1)):
        d = await edge.draft()
        if stop is not None:
            f = draft_features(d.logits)
            if log_features:
                features.append(f)
        elif log_features:
            rows.append(d.logits)  # the round's features are computed in one go at its end
        if edge.is_stop(d.token):
            break
        if stop is not None and stop(f):
            stopped = True
            break
    if log_features:
        if rows:
            features = draft_features_many(np.array(rows, dtype=np.float64))
        edge.note("draft_features", [[round(x, 6) for x in f] for f in features])
    return stopped
