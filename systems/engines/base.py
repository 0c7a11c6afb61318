"""The engine contract: a model backend that scores token blocks and rolls back.

An engine knows nothing of speculative decoding. It offers sessions; a session holds a
logical token sequence and the model state (KV cache) for a prefix of it. Tokens appended
with :meth:`EngineSession.extend` are evaluated lazily, together with the next block that is
scored, so a correction token from a verdict costs no forward pass of its own.

The invariant every backend keeps: the key/value state covers ``tokens[:n_evaluated]`` and
``n_evaluated < len(tokens)`` whenever the logits after the last token are not cached. A
backend implements only :meth:`Engine._forward` (evaluate tokens for one or several sessions
in one pass) and :meth:`Engine._truncate` (drop KV entries); the bookkeeping lives here.

A backend may also offer :class:`LayerSplit` (:meth:`Engine.layer_split`): its forward pass
run a range of decoder layers at a time, for split inference.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


class EngineError(RuntimeError):
    """Raised when an engine is misused or its backend fails."""


@dataclass(frozen=True)
class EngineInfo:
    """What identifies an engine's model: used in manifests and the vocabulary check."""

    backend: str
    model: str
    vocab_size: int
    vocab_fingerprint: str
    eos_token_ids: tuple[int, ...]
    n_ctx: int
    extra: dict = field(default_factory=dict)


def fingerprint_vocabulary(pieces: Sequence[bytes | str]) -> str:
    """A sha256 over the ordered token pieces; equal fingerprints mean equal vocabularies."""
    h = hashlib.sha256()
    for piece in pieces:
        if isinstance(piece, str):
            piece = piece.encode("utf-8", "surrogatepass")
        h.update(len(piece).to_bytes(4, "little"))
        h.update(piece)
    return h.hexdigest()


class Engine(ABC):
    """A model backend: tokenizer, sessions, one-pass block scoring, batched across sessions."""

    info: EngineInfo

    # ---- tokenizer -----------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids for ``text`` (special tokens in the text are parsed)."""

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text for ``tokens``."""

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat; backends with a template in the model file override."""
        raise EngineError(f"{type(self).__name__} has no chat template; give the prompt as raw text")

    # ---- sessions ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.info.eos_token_ids

    def new_session(self) -> "EngineSession":
        return EngineSession(self, self._open_state())

    def layer_split(self) -> "LayerSplit | None":
        """The model run a range of decoder layers at a time, if this backend can (split
        inference); None when it cannot."""
        return None

    @abstractmethod
    def _open_state(self) -> object:
        """Backend state for a new, empty session (a KV sequence slot, a cache object...)."""

    def _close_state(self, state: object) -> None:
        """Release a session's backend state."""

    @abstractmethod
    def _forward(self, items: Sequence[tuple[object, int, Sequence[int], int]]) -> list[np.ndarray]:
        """Evaluate several sessions' tokens in one pass.

        ``items`` holds ``(state, n_past, tokens, n_logits)``: append ``tokens`` at positions
        ``n_past...`` of that session's KV state and return, per item, a float32 array with the
        logits after each of the last ``n_logits`` tokens, shape ``(n_logits, vocab)``.
        """

    @abstractmethod
    def _truncate(self, state: object, n_keep: int) -> None:
        """Drop KV entries of a session at positions ``>= n_keep``."""

    def score_batch(self, requests: Sequence[tuple["EngineSession", Sequence[int]]]) -> list[np.ndarray]:
        """Score a block for each of several sessions in one forward pass.

        Each block is appended to its session. For a block of n tokens the result has n + 1
        rows: row 0 is the distribution for the block's first position (after the existing
        context), row i the one after block token i-1. This is exactly what verifying n draft
        tokens needs: p_1 ... p_{n+1}.
        """
        plans = []
        for session, block in requests:
            session._check_open()
            block = [int(t) for t in block]
            if not session.tokens and block:
                raise EngineError("the session is empty: prefill a prompt before scoring a block")
            cached = session._last_logits if session._n_eval == len(session.tokens) else None
            pending = session.tokens[session._n_eval :] + block
            if not pending and cached is None:
                raise EngineError("nothing to score: the session is empty; prefill a prompt first")
            # row 0 comes from the cache when the context was fully evaluated before (an empty
            # block after it is that row alone, with nothing to evaluate).
            n_logits = min(len(block) + (0 if cached is not None else 1), len(pending))
            plans.append((session, block, pending, n_logits, cached))
        # The sessions change only after the backend succeeded, so a failure leaves them as they were.
        items = [(s._state, s._n_eval, p, n) for s, _, p, n, _ in plans if p]
        evaluated = iter(self._forward(items) if items else ())
        results = []
        for session, block, pending, n_logits, cached in plans:
            if not pending:
                results.append(cached[None, :])
                continue
            logits = next(evaluated)
            if logits.shape[0] != n_logits:
                raise EngineError(f"backend returned {logits.shape[0]} logit rows, expected {n_logits}")
            session.tokens.extend(block)
            session._n_eval += len(pending)
            session._last_logits = logits[-1]
            if cached is not None:
                logits = np.concatenate([cached[None, :], logits], axis=0)
            results.append(logits)
        return results


class EngineSession:
    """One sequence on an engine: logical tokens, lazily evaluated KV state, rollback."""

    def __init__(self, engine: Engine, state: object):
        self.engine = engine
        self.tokens: list[int] = []
        self._state = state
        self._n_eval = 0
        self._last_logits: np.ndarray | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_evaluated(self) -> int:
        return self._n_eval

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("session is closed")

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens without evaluating them; the next scoring call evaluates them."""
        self._check_open()
        self.tokens.extend(int(t) for t in tokens)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate a prompt; returns the logits for the first generated position."""
        self.extend(tokens)
        return self.next_logits()

    def next_logits(self) -> np.ndarray:
        """Logits for the position after the last token (evaluating pending tokens)."""
        self._check_open()
        if self._n_eval == len(self.tokens) and self._last_logits is not None:
            return self._last_logits
        return self.score([])[0]

    def score(self, block: Sequence[int]) -> np.ndarray:
        """Append ``block`` and return its ``len(block) + 1`` rows of logits (see score_batch)."""
        return self.engine.score_batch([(self, block)])[0]

    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` tokens."""
        self._check_open()
        if length < 0 or length > len(self.tokens):
            raise EngineError(f"cannot roll back to {length}: session holds {len(self.tokens)} tokens")
        if length == len(self.tokens):
            return
        del self.tokens[length:]
        if self._n_eval > length:
            # Keep the last token un-evaluated so the logits after it are recomputed with the
            # next block, in the same forward pass.
            keep = max(length - 1, 0)
            self.engine._truncate(self._state, keep)
            self._n_eval = keep
            self._last_logits = None

    def close(self) -> None:
        if not self._closed:
            self.engine._close_state(self._state)
            self._closed = True


class LayerSplit(ABC):
    """A capability an engine may offer: its forward pass run a range of decoder layers at a time.

    Split inference runs the embedding and layers ``[0, k)`` on one device and layers
    ``[k, n)``, the final norm and the output head on another; the hidden states of the new
    positions cross between them. Each part of a sequence keeps a KV cache for its own layers.
    """

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Decoder layers in the model."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of a hidden state: the numbers one position carries between two parts."""

    def open_part(self, first: int, last: int) -> "ModelPart":
        """Layers ``[first, last)`` over a new, empty sequence."""
        if not (isinstance(first, int) and isinstance(last, int) and 0 <= first < last <= self.n_layers):
            raise EngineError(f"a model part needs 0 <= first < last <= {self.n_layers} (the model's layers), "
                              f"got [{first}, {last})")
        return self._open_part(first, last)

    @abstractmethod
    def _open_part(self, first: int, last: int) -> "ModelPart":
        """Backend state for layers ``[first, last)`` (checked) over an empty sequence."""


class ModelPart(ABC):
    """Layers ``[first, last)`` of a model over one sequence, with their own KV cache.

    :meth:`run` appends positions ``length ... length + m - 1``. The part that starts at layer
    0 takes token ids and embeds them; a later part takes the hidden states the part before it
    returned, shape ``(m, hidden_size)``. The part that ends at the last layer returns logits
    (after the final norm and the output head) for the last ``logits_to_keep`` positions; any
    other part returns the hidden states of all ``m`` positions. Results are float32.
    """

    def __init__(self, split: LayerSplit, first: int, last: int):
        self.split, self.first, self.last = split, first, last
        self.length = 0
        self.closed = False

    @property
    def takes_tokens(self) -> bool:
        return self.first == 0

    @property
    def gives_logits(self) -> bool:
        return self.last == self.split.n_layers

    def run(self, inputs, logits_to_keep: int = 1) -> np.ndarray:
        """Run the part's layers on ``inputs`` (token ids or hidden states) at the next positions."""
        if self.closed:
            raise EngineError("model part is closed")
        if self.takes_tokens:
            x = np.asarray(inputs)
            if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
                raise EngineError(f"layers [0, {self.last}) take a list of token ids, got an array of shape "
                                  f"{x.shape} and dtype {x.dtype}")
        else:
            x = np.asarray(inputs, dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != self.split.hidden_size:
                raise EngineError(f"layers [{self.first}, {self.last}) take hidden states of shape "
                                  f"(positions, {self.split.hidden_size}), got {x.shape}")
        m = len(x)
        if m == 0:
            raise EngineError("nothing to run: no positions given")
        keep = min(logits_to_keep, m) if self.gives_logits else m
        if keep < 1:
            raise EngineError(f"logits_to_keep must be >= 1, got {logits_to_keep}")
        out = self._run(x, self.length, keep)
        self.length += m
        return out

    @abstractmethod
    def _run(self, x: np.ndarray, start: int, keep: int) -> np.ndarray:
        """Evaluate ``x`` at positions ``start...``; the last ``keep`` rows of the output."""

    def close(self) -> None:
        """Release the part's cache."""
        self.closed = True
