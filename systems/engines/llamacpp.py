"""llama.cpp engine: one GGUF model, one context, one KV sequence per session.

Built directly on llama-cpp-python's low-level C API (``llama_cpp.llama_decode`` and
friends), in the manner of llama.cpp's ``speculative`` example: a single ``llama_batch``
carries the tokens of every session in a scoring call, each with its own sequence id and
positions, and logits are requested only for the rows a caller needs (never
``logits_all``, which would keep n_ctx x n_vocab floats per context).

Logging: llama.cpp's log callback is process-wide. This module installs one that drops
everything below ERROR unless an engine was built with ``verbose=True``. (llama-cpp-python's
own callback maps the ggml levels wrongly and prints warnings while hiding errors.)

Not thread-safe: one engine is driven from one thread at a time.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from systems.engines.base import Engine, EngineError, EngineInfo, fingerprint_vocabulary

try:
    import jinja2.ext  # installed with llama-cpp-python
    import llama_cpp
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise EngineError("the llamacpp engine needs llama-cpp-python (pip install llama-cpp-python)") from exc

_GGML_LOG_ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_GGML_LOG_CONT = 5
_log_state = {"verbose": False, "last": 0}


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level != _GGML_LOG_CONT:
        _log_state["last"] = level
    if _log_state["verbose"] or _log_state["last"] >= _GGML_LOG_ERROR:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


class _Seq:
    """A session's backend state: the llama.cpp sequence id it owns."""

    __slots__ = ("seq_id",)

    def __init__(self, seq_id: int):
        self.seq_id = seq_id


class LlamaCppEngine(Engine):
    """A GGUF model served by llama.cpp, with up to ``n_seq_max`` concurrent sessions.

    The model is loaded once and one llama context is created with ``n_seq_max`` sequences;
    each session owns one sequence id, and :meth:`score_batch` over several sessions is a
    single ``llama_decode`` (split only where the tokens exceed ``n_batch``). ``n_ctx`` is
    the capacity of each session, in tokens.

    KV layout (llama.cpp as vendored in llama-cpp-python 0.3.36): with ``kv_unified=False``
    (the library default) the context's ``n_ctx`` is the *total* and every sequence gets
    its own stream of ``n_ctx / n_seq_max`` cells; a batch holding several sequences is then
    cut into "equal splits" (as many tokens of each sequence, and only consecutive sequence
    ids, per micro-batch), so blocks of different lengths are not one pass. With
    ``kv_unified=True`` all sequences share one buffer, any mix of sequences decodes as one
    micro-batch, and a sequence may use any free cell. We use the unified buffer with
    ``n_ctx * n_seq_max`` cells, so every session can always reach ``n_ctx`` tokens (the
    per-session limit is enforced here), and scoring several sessions is truly one pass. The
    price: attention scans the cells of every open session (masked), so it grows with the
    total context in use rather than the session's own. ``kv_unified=False`` is available.
    """

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 4096,
        n_seq_max: int = 4,
        n_threads: int | None = None,
        n_batch: int = 512,
        name: str | None = None,
        *,
        kv_unified: bool = True,
        verbose: bool = False,
    ):
        path = Path(model_path)
        if not path.is_file():
            raise EngineError(f"model file not found: {path}")
        if n_ctx < 1 or n_seq_max < 1 or n_batch < 1:
            raise EngineError("n_ctx, n_seq_max and n_batch must be positive")
        _log_state["verbose"] = bool(verbose)
        self._model = self._ctx = self._batch = None
        threads = int(n_threads or os.cpu_count() or 1)

        mparams = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq_max
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = kv_unified
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise EngineError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq_max={n_seq_max})")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._n_batch = min(n_batch, llama_cpp.llama_n_batch(self._ctx))
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)

        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self._free = list(range(n_seq_max))
        self._pieces: dict[int, bytes] = {}
        self._n_vocab = n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # The raw token text stored in the GGUF (tokenizer.ggml.tokens), in id order.
        texts = [llama_cpp.llama_vocab_get_text(self._vocab, i) for i in range(n_vocab)]
        eog = tuple(i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, i))
        self._bos_text = self._token_text(llama_cpp.llama_vocab_bos(self._vocab))
        self._eos_text = self._token_text(llama_cpp.llama_vocab_eos(self._vocab))
        template = llama_cpp.llama_model_chat_template(self._model, None)
        self._chat_template = template.decode("utf-8") if template else None
        self._jinja = None
        self.info = EngineInfo(
            backend="llamacpp",
            model=name or path.name,
            vocab_size=n_vocab,
            vocab_fingerprint=fingerprint_vocabulary(texts),
            eos_token_ids=eog,
            n_ctx=n_ctx,
            extra={
                "threads": threads,
                "n_seq_max": n_seq_max,
                "n_batch": self._n_batch,
                "kv_unified": kv_unified,
                "file_size": path.stat().st_size,
            },
        )

    # ---- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        """Free the batch, the context and the model; the engine is unusable afterwards."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._model = None

    def __enter__(self) -> "LlamaCppEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _check_alive(self) -> None:
        if not self._ctx:
            raise EngineError("the llama.cpp engine is closed")

    # ---- tokenizer -----------------------------------------------------------------
    def _token_text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8") if token >= 0 else ""

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        self._check_alive()
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, True)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise EngineError(f"llama.cpp failed to tokenize {len(data)} bytes")

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, True)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``, special tokens rendered (``<|im_end|>``)."""
        self._check_alive()
        ids = [int(t) for t in tokens]
        self._check_ids(ids)
        return b"".join(self._piece(t) for t in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render the GGUF's ``tokenizer.chat_template`` as transformers does (sandboxed jinja2)."""
        if self._chat_template is None:
            return super().apply_chat_template(messages, add_generation_prompt)
        if self._jinja is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

            env.filters["tojson"] = tojson
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._jinja = env.from_string(self._chat_template)

        def raise_exception(message: str):
            raise EngineError(f"chat template: {message}")

        return self._jinja.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_text,
            eos_token=self._eos_text,
            raise_exception=raise_exception,
        )

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self._n_vocab]
        if bad:
            raise EngineError(f"token ids out of range [0, {self._n_vocab}): {bad[:5]}")

    # ---- sessions ------------------------------------------------------------------
    def _open_state(self) -> _Seq:
        self._check_alive()
        if not self._free:
            raise EngineError(
                f"all {self.n_seq_max} llama.cpp sequences are in use (n_seq_max={self.n_seq_max}); "
                "close a session or build the engine with a larger n_seq_max"
            )
        return _Seq(self._free.pop(0))

    def _close_state(self, state: _Seq) -> None:
        if self._ctx and state.seq_id >= 0:
            llama_cpp.llama_memory_seq_rm(self._mem, state.seq_id, -1, -1)
            self._free.append(state.seq_id)
            self._free.sort()
        state.seq_id = -1

    def _truncate(self, state: _Seq, n_keep: int) -> None:
        self._check_alive()
        if not llama_cpp.llama_memory_seq_rm(self._mem, state.seq_id, n_keep, -1):
            raise EngineError(f"llama.cpp could not drop KV entries at positions >= {n_keep}")

    def _forward(self, items: Sequence[tuple[_Seq, int, Sequence[int], int]]) -> list[np.ndarray]:
        self._check_alive()
        seqs = [state.seq_id for state, *_ in items]
        if len(set(seqs)) != len(seqs) or min(seqs, default=0) < 0:
            raise EngineError("each session may appear once per batch, and must be open")
        # One entry per token: (token, position, seq id, item index, logits row or -1).
        entries = []
        outs = []
        for k, (state, n_past, tokens, n_logits) in enumerate(items):
            tokens = [int(t) for t in tokens]
            if n_past + len(tokens) > self.n_ctx:
                raise EngineError(
                    f"session would hold {n_past + len(tokens)} tokens, more than n_ctx={self.n_ctx}"
                )
            if not 0 <= n_logits <= len(tokens):
                raise EngineError(f"asked for {n_logits} logit rows from a block of {len(tokens)} tokens")
            self._check_ids(tokens)
            first = len(tokens) - n_logits
            entries.extend(
                (t, n_past + j, state.seq_id, k, j - first if j >= first else -1) for j, t in enumerate(tokens)
            )
            outs.append(np.empty((n_logits, self._n_vocab), dtype=np.float32))

        batch, n_vocab = self._batch, self._n_vocab
        for start in range(0, len(entries), self._n_batch):
            chunk = entries[start : start + self._n_batch]
            for i, (tok, pos, seq, _, row) in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = row >= 0
            batch.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                # Undo whatever part of this call reached the KV cache, so the sessions stay
                # consistent with their bookkeeping (nothing of this call counts as evaluated).
                for state, n_past, _, _ in items:
                    llama_cpp.llama_memory_seq_rm(self._mem, state.seq_id, n_past, -1)
                raise EngineError(f"llama_decode failed with code {rc} ({len(chunk)} tokens)")
            for i, (_, _, _, k, row) in enumerate(chunk):
                if row >= 0:
                    ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
                    outs[k][row] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
        return outs
