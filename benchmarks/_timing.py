"""Shared by the benchmark scripts: time spent inside an engine's forward passes."""

from __future__ import annotations

import time


class ForwardTimer:
    """Wraps an engine's forward pass and sums the time spent in it."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0
        self._inner = engine._forward
        engine._forward = self._timed

    def _timed(self, items):
        t0 = time.perf_counter()
        try:
            return self._inner(items)
        finally:
            self.seconds += time.perf_counter() - t0
