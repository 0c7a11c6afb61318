"""Record once, replay many: an engine wrapper that memoizes forward passes by prefix.

With greedy decoding the tokens a system produces do not depend on the network or the
device profile, only on the model calls, so a sweep over network profiles repeats the same
calls; and different systems score the same prefixes in different blocks. The logits after
a token depend only on the sequence up to it, so :class:`MemoEngine` keeps one logit row
per prefix: a call whose every requested row is known is answered from memory, and only a
call with an unknown row runs the wrapped engine (whose rows are then all kept). The
wrapped engine's own state follows lazily: on a miss its KV cache is trimmed to the longest
common prefix and caught up before the call, so a miss gives the logits the model gives for
that context. (A backend may differ in the last bits between scoring a token alone and in
a block; memoized rows come from whichever call scored the prefix first, so every system in
a sweep sees the same logits for the same prefix.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from systems.engines.base import Engine


class _MemoState:
    def __init__(self):
        self.kv: list[int] = []  # what the caller believes is evaluated
        self.keys: list[int] = []  # keys[i]: a hash chain over kv[: i + 1], the row key after kv[i]
        self.inner = None  # the wrapped engine's state, opened on the first miss
        self.inner_kv: list[int] = []


class MemoEngine(Engine):
    """Wraps an engine; identical forward calls are served from memory."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.info = inner.info
        self._memo: dict[int, np.ndarray] = {}  # prefix key -> the logit row after that prefix
        self.hits = 0
        self.misses = 0

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.inner.tokenize(text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.inner.detokenize(tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return self.inner.apply_chat_template(messages, add_generation_prompt)

    def layer_split(self):
        """The wrapped engine's own (split inference): its parts are not memoized."""
        return self.inner.layer_split()

    def _open_state(self) -> _MemoState:
        return _MemoState()

    def _close_state(self, state: _MemoState) -> None:
        if state.inner is not None:
            self.inner._close_state(state.inner)

    def _truncate(self, state: _MemoState, n_keep: int) -> None:
        del state.kv[n_keep:]
        del state.keys[n_keep:]

    @staticmethod
    def _extend(state: _MemoState, n_past: int, tokens) -> None:
        del state.kv[n_past:]
        del state.keys[n_past:]
        key = state.keys[-1] if state.keys else 0
        for t in tokens:
            key = hash((key, int(t)))
            state.kv.append(int(t))
            state.keys.append(key)

    def _forward(self, items):
        out: list[np.ndarray | None] = []
        missed = []
        for state, n_past, tokens, n_logits in items:
            self._extend(state, n_past, tokens)
            keys = state.keys[len(state.kv) - n_logits:]
            rows = [self._memo.get(k) for k in keys]
            hit = bool(rows) and all(r is not None for r in rows)
            out.append(np.stack(rows) if hit and rows else None)
            if not hit:
                missed.append((len(out) - 1, state, n_past, list(tokens), n_logits, keys))
        self.hits += len(items) - len(missed)
        self.misses += len(missed)
        if missed:
            for _, state, n_past, _, _, _ in missed:
                self._sync(state, state.kv[:n_past])
            rows = self.inner._forward([(s.inner, n_past, toks, n) for _, s, n_past, toks, n, _ in missed])
            for (i, state, n_past, toks, _, keys), r in zip(missed, rows):
                state.inner_kv = state.inner_kv[:n_past] + toks
                for key, row in zip(keys, r):
                    self._memo.setdefault(key, row)
                out[i] = np.stack([self._memo[k] for k in keys]) if keys else r
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
