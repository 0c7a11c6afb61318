"""A small deterministic engine with exact, seeded distributions, for tests and conformance.

The target's logits at a position are a seeded pseudo-random function of the last
``order`` tokens and the position. The draft's logits mix the target's with independent
noise: ``agreement * target + (1 - agreement) * noise``, so ``agreement=1`` gives a draft
identical to the target and lower values give more rejections. Because every distribution
is an explicit function of the context, tests can compute the exact probability of any
output sequence and compare it with what speculative decoding produced.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from systems.engines.base import Engine, EngineError, EngineInfo, fingerprint_vocabulary

EOS = 0


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
        **_ignored,
    ):
        if role not in ("draft", "target"):
            raise EngineError(f"toy engine role must be 'draft' or 'target', got {role!r}")
        if vocab_size < 2:
            raise EngineError(f"toy vocabulary needs at least 2 tokens, got {vocab_size}")
        if not 0.0 <= agreement <= 1.0:
            raise EngineError(f"agreement must be in [0, 1], got {agreement}")
        self.role, self.seed, self.agreement = role, seed, agreement
        self.sharpness, self.eos_logit, self.order = sharpness, eos_logit, order
        self._cache: dict[tuple, np.ndarray] = {}
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
        key = (len(context), *tuple(context[-self.order :]))
        hit = self._cache.get(key)
        if hit is not None:
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
        self._cache[key] = out
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
