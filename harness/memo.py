"""Record once, replay many: an engine wrapper that memoizes forward passes by prefix.

With greedy decoding the tokens a system produces do not depend on the network or the
device profile, only on the model calls, so a sweep over network profiles repeats exactly
the same calls. :class:`MemoEngine` answers a call it has seen (same evaluated prefix, same
new tokens, same number of logit rows) from memory and runs the wrapped engine only for new
ones. The wrapped engine's own state follows lazily: on a miss its KV cache is trimmed to
the longest common prefix and caught up before the call, so a miss gives the logits the
model gives for that context.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from systems.engines.base import Engine


class _MemoState:
    def __init__(self):
        self.kv: list[int] = []  # what the caller believes is evaluated
        self.inner = None  # the wrapped engine's state, opened on the first miss
        self.inner_kv: list[int] = []


class MemoEngine(Engine):
    """Wraps an engine; identical forward calls are served from memory."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.info = inner.info
        self._memo: dict[tuple, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.inner.tokenize(text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.inner.detokenize(tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return self.inner.apply_chat_template(messages, add_generation_prompt)

    def _open_state(self) -> _MemoState:
        return _MemoState()

    def _close_state(self, state: _MemoState) -> None:
        if state.inner is not None:
            self.inner._close_state(state.inner)

    def _truncate(self, state: _MemoState, n_keep: int) -> None:
        del state.kv[n_keep:]

    def _forward(self, items):
        out: list[np.ndarray | None] = []
        missed = []
        for state, n_past, tokens, n_logits in items:
            key = (tuple(state.kv[:n_past]), tuple(tokens), n_logits)
            state.kv[n_past:] = list(tokens)
            hit = self._memo.get(key)
            out.append(hit)
            if hit is None:
                missed.append((len(out) - 1, state, n_past, list(tokens), n_logits, key))
        self.hits += len(items) - len(missed)
        self.misses += len(missed)
        if missed:
            for _, state, n_past, _, _, _ in missed:
                self._sync(state, state.kv[:n_past])
            rows = self.inner._forward([(s.inner, n_past, toks, n) for _, s, n_past, toks, n, _ in missed])
            for (i, state, n_past, toks, _, key), r in zip(missed, rows):
                state.inner_kv = state.inner_kv[:n_past] + toks
                self._memo[key] = r
                out[i] = r
        return out

    def _sync(self, state: _MemoState, prefix: list[int]) -> None:
        """Make the wrapped engine's KV hold exactly ``prefix``."""
        if state.inner is None:
            state.inner = self.inner._open_state()
        common = 0
        for a, b in zip(state.inner_kv, prefix):
            if a != b:
                break
            common += 1
        if common < len(state.inner_kv):
            self.inner._truncate(state.inner, common)
            del state.inner_kv[common:]
        if common < len(prefix):
            self.inner._forward([(state.inner, common, prefix[common:], 1)])
            state.inner_kv = list(prefix)
