"""A fitted pair: draft and target as statistical models of a real pair's behaviour.

The fleet simulator runs hundreds of edge devices on the plug-ins' own code; real models
cannot compute that many tokens, and a paper's models often cannot be had at all. A fitted
pair stands in for them through the same :class:`~systems.engines.base.Engine` interface,
so every plug-in runs unchanged and stays lossless: every distribution is a deterministic
function of the context, as with the toy engine.

What is modelled, per category (a workload, e.g. ``humaneval``; ``default`` pools them):

- **Agreement in runs.** Whether the draft's top token is the target's at a position
  depends on how many positions in a row it agreed just before (a Markov chain on the run
  length ``r``, capped at the last entry): ``agree[r]`` = P(agree | r). ``agree`` of one
  entry is i.i.d. agreement; of two, the usual two-state chain.
- **The draft's confidence** (its top token's probability at temperature 1) given that it
  agrees or not: quantile knots ``conf_agree`` / ``conf_disagree`` at equally spaced
  levels 0..1, read by linear interpolation. **Its entropy** (nats) likewise
  (``entropy_agree`` / ``entropy_disagree``), drawn with the confidence's level reversed,
  so a confident draft has a flat tail (the two are strongly and negatively rank-correlated
  in real drafts). The tail mass ``1 - conf`` is spread evenly over as many tokens as that
  entropy needs.
- **The target's shape**: its top token's probability (``target_conf`` knots); the rest
  spread evenly over ``target_tail`` tokens. It matters only when sampling.
- **Stopping**: the target's top token is end-of-sequence with probability ``eos_rate``
  at each position (a constant hazard).

The engine computes rows over ``vocab_size`` ids (a few hundred), while
``wire_vocab_size`` declares the real vocabulary's width so full-distribution uploads cost
what they would on the wire (:func:`systems.messages.declared_vocab_padding`). Prompts are
tokenized at ``chars_per_token`` characters a token, into ids hashed from the text.

Every figure a fitted pair produces is modelled: the pair's ``source`` says from what (the
runs it was fitted to, or the published statistics it was calibrated against).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from systems.engines.base import Engine, EngineError, EngineInfo, fingerprint_vocabulary

EOS = 0
_MASK = (1 << 64) - 1
_KNOT_LISTS = ("conf_agree", "conf_disagree", "entropy_agree", "entropy_disagree", "target_conf")
_LOG_FLOOR = math.log(1e-12)
MEMO_ROWS = 1 << 16  # row shapes kept per engine (about 200 bytes each)
CATEGORY_KEYS = ("agree", *_KNOT_LISTS, "target_tail", "eos_rate")


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


_GOLDEN, _M1, _M2, _UNIT = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 1.0 / (1 << 53)


def _uniforms(key: int, n: int) -> list[float]:
    """``n`` independent uniforms in [0, 1) from one integer key (:func:`_mix` applied in
    turn, inlined: this runs for every row)."""
    out, x = [], key
    for _ in range(n):
        x = (x + _GOLDEN) & _MASK
        x = ((x ^ (x >> 30)) * _M1) & _MASK
        x = ((x ^ (x >> 27)) * _M2) & _MASK
        x ^= x >> 31
        out.append((x >> 11) * _UNIT)
    return out


def _knots(values: Sequence[float], name: str, low: float, high: float) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or len(values) < 2:
        raise EngineError(f"fitted pair: {name} must be a list of at least 2 quantile knots, got {values!r}")
    out = tuple(float(v) for v in values)
    if any(not low <= v <= high for v in out) or any(b < a for a, b in zip(out, out[1:])):
        raise EngineError(f"fitted pair: {name} must be non-decreasing knots in [{low}, {high}], got {list(out)}")
    return out


def quantile(knots: Sequence[float], u: float) -> float:
    """The value at level ``u`` of quantile knots at equally spaced levels 0..1."""
    x = u * (len(knots) - 1)
    i = min(int(x), len(knots) - 2)
    return knots[i] + (knots[i + 1] - knots[i]) * (x - i)


@dataclass(frozen=True)
class CategoryModel:
    """The fitted statistics of one category (see the module docstring)."""

    agree: tuple[float, ...]
    conf_agree: tuple[float, ...]
    conf_disagree: tuple[float, ...]
    entropy_agree: tuple[float, ...]
    entropy_disagree: tuple[float, ...]
    target_conf: tuple[float, ...]
    target_tail: int
    eos_rate: float

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], name: str) -> "CategoryModel":
        if not isinstance(data, Mapping):
            raise EngineError(f"fitted pair: category {name!r} must be a mapping of {', '.join(CATEGORY_KEYS)}")
        unknown = sorted(set(data) - set(CATEGORY_KEYS) - {"fit"})
        missing = sorted(set(CATEGORY_KEYS) - set(data))
        if unknown or missing:
            raise EngineError(f"fitted pair: category {name!r}: " + "; ".join(
                ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
                + ([f"missing {', '.join(missing)}"] if missing else [])) + f" (keys: {', '.join(CATEGORY_KEYS)})")
        agree = data["agree"]
        if not isinstance(agree, (list, tuple)) or not agree or any(
                not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0 for p in agree):
            raise EngineError(f"fitted pair: {name}.agree must be a non-empty list of probabilities "
                              f"P(agree | run length r), got {agree!r}")
        tail, eos = data["target_tail"], data["eos_rate"]
        if isinstance(tail, bool) or not isinstance(tail, int) or tail < 1:
            raise EngineError(f"fitted pair: {name}.target_tail must be a positive integer, got {tail!r}")
        if not isinstance(eos, (int, float)) or not 0.0 <= eos < 1.0:
            raise EngineError(f"fitted pair: {name}.eos_rate must be in [0, 1), got {eos!r}")
        return cls(tuple(float(p) for p in agree),
                   _knots(data["conf_agree"], f"{name}.conf_agree", 0.0, 1.0),
                   _knots(data["conf_disagree"], f"{name}.conf_disagree", 0.0, 1.0),
                   _knots(data["entropy_agree"], f"{name}.entropy_agree", 0.0, 50.0),
                   _knots(data["entropy_disagree"], f"{name}.entropy_disagree", 0.0, 50.0),
                   _knots(data["target_conf"], f"{name}.target_conf", 0.0, 1.0),
                   int(tail), float(eos))

    def p_agree(self, run: int) -> float:
        return self.agree[min(run, len(self.agree) - 1)]


class _Sequence:
    """A session's state: its tokens, and the draft's agreement run length after each one."""

    __slots__ = ("tokens", "runs")

    def __init__(self):
        self.tokens: list[int] = []
        self.runs: list[int] = []  # runs[i]: agreements in a row ending at the row after tokens[:i]


class FittedEngine(Engine):
    """One side (draft or target) of a fitted pair: rows drawn from its category's statistics."""

    def __init__(
        self,
        role: str = "target",
        categories: Mapping[str, Any] | None = None,
        category: str = "default",
        vocab_size: int = 256,
        wire_vocab_size: int | None = None,
        chars_per_token: float = 3.5,
        n_ctx: int = 32768,
        seed: int = 0,
        order: int = 3,
        name: str = "fitted",
        **_ignored,
    ):
        if role not in ("draft", "target"):
            raise EngineError(f"fitted engine role must be 'draft' or 'target', got {role!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
            raise EngineError(f"fitted pair: vocab_size must be an integer >= 4, got {vocab_size!r}")
        if wire_vocab_size is not None and (not isinstance(wire_vocab_size, int) or wire_vocab_size < vocab_size):
            raise EngineError(f"fitted pair: wire_vocab_size must be an integer >= vocab_size ({vocab_size}), "
                              f"got {wire_vocab_size!r}")
        if not isinstance(chars_per_token, (int, float)) or chars_per_token <= 0:
            raise EngineError(f"fitted pair: chars_per_token must be positive, got {chars_per_token!r}")
        if not categories or not isinstance(categories, Mapping):
            raise EngineError("fitted pair: options.categories must map category names to their statistics "
                              "(see systems/engines/fitted.py)")
        models = {str(k): CategoryModel.from_mapping(v, str(k)) for k, v in categories.items()}
        chosen = category if category in models else "default"
        if chosen not in models:
            raise EngineError(f"fitted pair: no statistics for category {category!r} and no 'default' "
                              f"category; valid: {', '.join(sorted(models))}")
        self.role, self.seed, self.order = role, int(seed), int(order)
        self.model = models[chosen]
        self.chars_per_token = float(chars_per_token)
        pieces = [f"<f{i}>" for i in range(vocab_size)]
        self.info = EngineInfo(
            backend="fitted",
            model=f"{name}-{role}-{chosen}",
            vocab_size=vocab_size,
            vocab_fingerprint=fingerprint_vocabulary([name, *pieces]),
            eos_token_ids=(EOS,),
            n_ctx=int(n_ctx),
            extra={"wire_vocab_size": wire_vocab_size, "category": chosen, "category_asked": category,
                   "kind": "modelled"},
        )
        self.rows_computed = 0
        # Rows recur: the fleet's edges take the workload's prompts in turn, and a greedy decode
        # of a prompt is the same every time, so each row's shape is kept by its key (the row is
        # a function of it), up to MEMO_ROWS of them (then they are dropped and recomputed).
        self._shapes: dict[int, tuple[int, float, int, float]] = {}
        self._agree_draws: dict[int, float] = {}  # the chain's uniform at each row key, kept alike

    # ---- the model ----------------------------------------------------------------------
    def _key(self, length: int, tokens: Sequence[int]) -> int:
        """An integer key for the row after ``tokens[:length]`` (its last ``order`` tokens and
        its position), the same for draft and target and in every process (a tuple of ints
        hashes the same everywhere)."""
        window = tuple(tokens[max(0, length - self.order):length])
        return hash((self.seed, length, window)) & _MASK

    def _target_top(self, u_top: float, u_eos: float) -> int:
        if u_eos < self.model.eos_rate:
            return EOS
        return 1 + int(u_top * (self.info.vocab_size - 1))

    def _row(self, length: int, tokens: Sequence[int], agrees: bool) -> np.ndarray:
        """The log-probabilities after ``tokens[:length]``; ``agrees`` is the draft's chain state there."""
        row = np.full(self.info.vocab_size, _LOG_FLOOR, dtype=np.float32)
        self._fill(row, length, tokens, agrees)
        return row

    def _fill(self, row: np.ndarray, length: int, tokens: Sequence[int], agrees: bool) -> None:
        """Write :meth:`_row` into ``row``, which holds ``_LOG_FLOOR`` everywhere."""
        key = self._key(length, tokens)
        memo = (key << 1) | agrees
        shape = self._shapes.get(memo)
        if shape is None:
            shape = self._row_shape(key, agrees)
            if len(self._shapes) >= MEMO_ROWS:
                self._shapes.clear()
            self._shapes[memo] = shape
        self._put(row, *shape)

    def _row_shape(self, key: int, agrees: bool) -> tuple[int, float, int, float]:
        """The row of key ``key`` as :meth:`_shape` gives it."""
        m, vocab = self.model, self.info.vocab_size
        u_top, u_eos, u_conf, u_other, u_tconf = _uniforms(key, 5)
        top = self._target_top(u_top, u_eos)
        if self.role == "target":
            return self._shape(top, quantile(m.target_conf, u_tconf), None, m.target_tail)
        if agrees:
            conf, entropy = quantile(m.conf_agree, u_conf), quantile(m.entropy_agree, 1.0 - u_conf)
            mine = top
        else:
            conf, entropy = quantile(m.conf_disagree, u_conf), quantile(m.entropy_disagree, 1.0 - u_conf)
            mine = (top + 1 + int(u_other * (vocab - 1))) % vocab  # any token but the target's top
        return self._shape(mine, conf, entropy, None)

    def _logits(self, top: int, conf: float, entropy: float | None, tail: int | None) -> np.ndarray:
        """Log-probabilities with ``conf`` on ``top`` and the rest evenly over ``tail`` tokens
        (or as many as give ``entropy``), the tail taken in id order after ``top``."""
        row = np.full(self.info.vocab_size, _LOG_FLOOR, dtype=np.float32)
        self._put(row, *self._shape(top, conf, entropy, tail))
        return row

    def _shape(self, top: int, conf: float, entropy: float | None, tail: int | None) -> tuple[int, float, int, float]:
        """:meth:`_logits`'s row as ``(top, log conf, tail, log share)``."""
        vocab = self.info.vocab_size
        conf = min(max(conf, 1.0 / vocab + 1e-6), 1.0 - 1e-6)
        rest = 1.0 - conf
        if tail is None:
            # H = h(conf) + rest * ln(k) for the top plus k even tail tokens
            h_top = -(conf * math.log(conf) + rest * math.log(rest))
            tail = int(round(math.exp(min(math.log(vocab), max(0.0, (entropy - h_top) / rest)))))
        # every tail token must stay below the top so the top is the argmax
        tail = min(vocab - 1, max(1, tail, math.ceil(rest / (conf * 0.999))))
        return top, math.log(conf), tail, math.log(rest / tail)

    def _put(self, row: np.ndarray, top: int, log_conf: float, tail: int, log_share: float) -> None:
        """The tail's ``tail`` ids after ``top`` (wrapping round the vocabulary) at ``log_share``,
        ``top`` at ``log_conf``: two slices, not an index array."""
        vocab = self.info.vocab_size
        end = top + 1 + tail
        row[top + 1:min(end, vocab)] = log_share
        if end > vocab:
            row[:end - vocab] = log_share
        row[top] = log_conf
        self.rows_computed += 1

    def _advance(self, seq: _Sequence, upto: int) -> None:
        """Extend the chain of run lengths to cover the rows after ``tokens[:upto]``."""
        tokens, runs, agree = seq.tokens, seq.runs, self.model.agree
        last = len(agree) - 1
        draws = self._agree_draws
        while len(runs) <= upto:
            i = len(runs)
            prev = runs[i - 1] if i else 0
            key = self._key(i, tokens)
            u = draws.get(key)
            if u is None:
                u = _uniforms(key ^ 0x5EED, 1)[0]
                if len(draws) >= MEMO_ROWS:
                    draws.clear()
                draws[key] = u
            runs.append(prev + 1 if u < agree[min(prev, last)] else 0)

    def logits_for(self, context: Sequence[int]) -> np.ndarray:
        """The exact log-probabilities this engine gives after ``context`` (for tests)."""
        seq = _Sequence()
        seq.tokens = [int(t) for t in context]
        if self.role == "draft":
            self._advance(seq, len(seq.tokens))
        return self._row(len(seq.tokens), seq.tokens, self.role == "draft" and seq.runs[len(seq.tokens)] > 0)

    def agrees_after(self, tokens: Sequence[int]) -> bool:
        """Whether the draft's top token after ``tokens`` is the target's (for tests and fits)."""
        seq = _Sequence()
        seq.tokens = list(tokens)
        self._advance(seq, len(tokens))
        return seq.runs[len(tokens)] > 0

    # ---- tokenizer ------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """``chars_per_token`` characters a token; "<f3><f1>" notation gives ids directly."""
        parts = [p for p in text.replace(">", "> ").split() if p]
        if parts and all(p.startswith("<f") and p.endswith(">") and p[2:-1].isdigit() for p in parts):
            ids = [int(p[2:-1]) for p in parts]
            if any(not 0 <= i < self.info.vocab_size for i in ids):
                raise EngineError(f"fitted token id out of range 0..{self.info.vocab_size - 1} in {text!r}")
            return ids
        n = max(1, round(len(text) / self.chars_per_token))
        step = len(text) / n
        chunks = [text[int(i * step):int((i + 1) * step)] for i in range(n)]
        # blake2b, not hash(): str hashes differ between processes
        return [1 + int.from_bytes(hashlib.blake2b(f"{self.seed}|{i}|{c}".encode(), digest_size=8).digest(), "little")
                % (self.info.vocab_size - 1) for i, c in enumerate(chunks)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(f"<f{int(t)}>" for t in tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """A plain role-tagged rendering (a real template adds a similar handful of tokens)."""
        text = "".join(f"<|{m.get('role', 'user')}|>\n{m.get('content', '')}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")

    # ---- backend hooks --------------------------------------------------------------------
    def _open_state(self) -> _Sequence:
        return _Sequence()

    def _forward(self, items):
        out = []
        for seq, n_past, tokens, n_logits in items:
            if n_past != len(seq.tokens):
                raise EngineError(f"fitted KV holds {len(seq.tokens)} tokens, asked to append at {n_past}")
            if n_past + len(tokens) > self.info.n_ctx:
                raise EngineError(f"context of {n_past + len(tokens)} tokens exceeds n_ctx={self.info.n_ctx}")
            seq.tokens.extend(int(t) for t in tokens)
            end = len(seq.tokens)
            if self.role == "draft":
                self._advance(seq, end)
            block = np.full((n_logits, self.info.vocab_size), _LOG_FLOOR, dtype=np.float32)
            draft, runs, seq_tokens = self.role == "draft", seq.runs, seq.tokens
            for r, i in enumerate(range(end - n_logits + 1, end + 1)):
                self._fill(block[r], i, seq_tokens, draft and runs[i] > 0)
            out.append(block)
        return out

    def _truncate(self, seq: _Sequence, n_keep: int) -> None:
        del seq.tokens[n_keep:]
        del seq.runs[n_keep + 1:]
