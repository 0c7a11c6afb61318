"""A small deterministic engine with exact, seeded distributions, for tests and conformance.

The target's logits at a position are a seeded pseudo-random function of the last
``order`` tokens and the position. The draft's logits mix the target's with independent
noise: ``agreement * target + (1 - agreement) * noise``, so ``agreement=1`` gives a draft
identical to the target and lower values give more rejections. Because every distribution
is an explicit function of the context, tests can compute the exact probability of any
output sequence and compare it with what speculative decoding produced.

The same function is also computed by a stack of ``n_layers`` layers (:meth:`ToyEngine.layer_split`),
so split inference runs on the toy genuinely: a hidden state holds the ``order`` most recent
token ids of its position (-1 where the sequence is shorter), the embedding puts the
position's own token in slot 0, and ``order - 1`` of the layers are attention layers, spread
over the stack, each filling one more slot from the previous position's hidden state at its
input (which it keeps in its own KV cache); the other layers pass hidden states through.
The output head reads the window and the position and gives :meth:`ToyEngine.logits_for`'s
logits. A part after the first sees only hidden states and positions, never token ids.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np

from systems.engines.base import Engine, EngineError, EngineInfo, LayerSplit, ModelPart, fingerprint_vocabulary

EOS = 0
#: the logits rows an engine keeps (least recently used dropped first): at most this many,
#: and at most :data:`CACHE_BYTES` of them, so memory stays flat however many tokens it scores
CACHE_ROWS = 4096
CACHE_BYTES = 64 << 20


class ToyEngine(Engine):
    """Seeded toy language model over a tiny vocabulary (token 0 is end-of-sequence)."""

    def __init__(
        self,
        role: str = "target",
        vocab_size: int = 8,
        seed: int = 0,
        agreement: float = 0.8,
        sharpness: float = 2.0,
        eos_logit: float = -3.0,
        order: int = 3,
        n_ctx: int = 4096,
        n_layers: int = 6,
        **_ignored,
    ):
        if role not in ("draft", "target"):
            raise EngineError(f"toy engine role must be 'draft' or 'target', got {role!r}")
        if vocab_size < 2:
            raise EngineError(f"toy vocabulary needs at least 2 tokens, got {vocab_size}")
        if not 0.0 <= agreement <= 1.0:
            raise EngineError(f"agreement must be in [0, 1], got {agreement}")
        if n_layers < max(1, order - 1):
            raise EngineError(f"toy n_layers must be >= max(1, order - 1) = {max(1, order - 1)}, got {n_layers}")
        self.role, self.seed, self.agreement = role, seed, agreement
        self.n_layers = n_layers
        self.sharpness, self.eos_logit, self.order = sharpness, eos_logit, order
        # rows are a pure function of their key, so dropping one changes no result, only time
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_rows = max(16, min(CACHE_ROWS, CACHE_BYTES // (4 * vocab_size)))
        pieces = [f"<t{i}>" for i in range(vocab_size)]
        self.info = EngineInfo(
            backend="toy",
            model=f"toy-{role}-v{vocab_size}-s{seed}-a{agreement}",
            vocab_size=vocab_size,
            vocab_fingerprint=fingerprint_vocabulary(pieces),
            eos_token_ids=(EOS,),
            n_ctx=n_ctx,
            extra={"agreement": agreement, "sharpness": sharpness, "order": order},
        )

    # ---- the model ---------------------------------------------------------------
    def _noise(self, stream: int, key: tuple) -> np.ndarray:
        digest = hashlib.blake2b(repr((self.seed, stream, key)).encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return rng.standard_normal(self.info.vocab_size) * self.sharpness

    def logits_for(self, context: Sequence[int]) -> np.ndarray:
        """The exact logits this engine gives after ``context``."""
        return self._logits_at(len(context), tuple(context[-self.order :]))

    def _logits_at(self, length: int, window: tuple) -> np.ndarray:
        """The logits after a context of ``length`` tokens ending with ``window`` (its last ``order``)."""
        key = (length, *window)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        target = self._noise(0, key)
        target[EOS] += self.eos_logit
        if self.role == "target" or self.agreement == 1.0:
            out = target
        else:
            noise = self._noise(1, key)
            noise[EOS] += self.eos_logit
            out = self.agreement * target + (1.0 - self.agreement) * noise
        out = out.astype(np.float32)
        cache[key] = out
        if len(cache) > self._cache_rows:
            cache.popitem(last=False)
        return out

    # ---- tokenizer: "<t3><t1>" <-> [3, 1]; other text maps byte-wise ----------------
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Ids from "<t3><t1>" notation; any other text maps each UTF-8 byte to an id in
        1..V-1 (never EOS), so dry runs can feed real prompts to the toy model."""
        parts = [p for p in text.replace(">", "> ").split() if p]
        if parts and all(p.startswith("<t") and p.endswith(">") and p[2:-1].isdigit() for p in parts):
            ids = [int(p[2:-1]) for p in parts]
            if any(not 0 <= i < self.info.vocab_size for i in ids):
                raise EngineError(f"toy token id out of range 0..{self.info.vocab_size - 1} in {text!r}")
            return ids
        return [1 + b % (self.info.vocab_size - 1) for b in text.encode("utf-8")]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(f"<t{int(t)}>" for t in tokens)

    # ---- backend hooks -------------------------------------------------------------
    def _open_state(self) -> list[int]:
        return []

    def _forward(self, items):
        out = []
        for state, n_past, tokens, n_logits in items:
            if n_past != len(state):
                raise EngineError(f"toy KV holds {len(state)} tokens, asked to append at {n_past}")
            if n_past + len(tokens) > self.info.n_ctx:
                raise EngineError(f"context of {n_past + len(tokens)} tokens exceeds n_ctx={self.info.n_ctx}")
            state.extend(int(t) for t in tokens)
            end = len(state)
            out.append(np.stack([self.logits_for(state[:i]) for i in range(end - n_logits + 1, end + 1)]))
        return out

    def _truncate(self, state: list[int], n_keep: int) -> None:
        del state[n_keep:]

    def layer_split(self) -> "_ToyLayers":
        return _ToyLayers(self)


class _ToyLayers(LayerSplit):
    """The toy's stack of layers (see the module docstring); attention layer j fills slot j."""

    def __init__(self, engine: ToyEngine):
        self.engine = engine
        order, n = engine.order, engine.n_layers
        # slot j (1 <= j < order) is filled by layer (j * n) // order: increasing, within the stack
        self.fills = {(j * n) // order: j for j in range(1, order)}

    @property
    def n_layers(self) -> int:
        return self.engine.n_layers

    @property
    def hidden_size(self) -> int:
        return self.engine.order

    def _open_part(self, first: int, last: int) -> "_ToyPart":
        return _ToyPart(self, first, last)


class _ToyPart(ModelPart):
    """Toy layers ``[first, last)``; the KV cache of an attention layer is its inputs' previous slot."""

    def __init__(self, split: _ToyLayers, first: int, last: int):
        super().__init__(split, first, last)
        self.kv = {k: [] for k in split.fills if first <= k < last}

    def _run(self, x: np.ndarray, start: int, keep: int) -> np.ndarray:
        engine = self.split.engine
        if start + len(x) > engine.info.n_ctx:
            raise EngineError(f"context of {start + len(x)} tokens exceeds n_ctx={engine.info.n_ctx}")
        if self.takes_tokens:
            h = np.full((len(x), engine.order), -1.0, dtype=np.float32)
            h[:, 0] = x
        else:
            h = np.array(x, dtype=np.float32)
        for layer in range(self.first, self.last):
            slot = self.split.fills.get(layer)
            if slot is None:
                continue
            cache = self.kv[layer]
            seen = cache + [float(v) for v in h[:, slot - 1]]  # this layer's input, position by position
            h[:, slot] = [seen[start + p - 1] if start + p >= 1 else -1.0 for p in range(len(h))]
            cache[:] = seen
        if not self.gives_logits:
            return h
        rows = []
        for p in range(len(h) - keep, len(h)):
            ids = np.rint(h[p]).astype(np.int64)
            if np.any(np.abs(h[p] - ids) > 1e-3) or np.any(ids < -1) or np.any(ids >= engine.info.vocab_size):
                raise EngineError(f"toy hidden state at position {start + p} holds no token ids: {h[p].tolist()}")
            window = tuple(int(t) for t in ids[::-1] if t >= 0)
            rows.append(engine._logits_at(start + p + 1, window))
        return np.stack(rows)
