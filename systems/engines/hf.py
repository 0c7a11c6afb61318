"""A transformers (PyTorch) engine: a Hugging Face model directory or a GGUF file, fp32 on CPU.

Loading a GGUF file needs the ``gguf`` and ``accelerate`` packages; transformers dequantizes
the weights into ``dtype`` (fp32 by default: bf16 has no fast CPU path on AVX2 machines).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import numpy as np

from systems.engines.base import Engine, EngineError, EngineInfo, LayerSplit, ModelPart, fingerprint_vocabulary
from systems.engines.gguf_vocab import gguf_vocab_tokens

_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")


class _State:
    """A session's KV cache; a holder so that a full rollback can swap in a fresh cache."""

    def __init__(self, cache):
        self.cache = cache


class TransformersEngine(Engine):
    """An :class:`Engine` over ``AutoModelForCausalLM`` with one ``DynamicCache`` per session.

    ``model_path`` is a ``.gguf`` file or a Hugging Face model directory (optionally with
    ``gguf_file`` naming a GGUF inside it); only local files are read. Each forward pass gives
    explicit position ids and asks for the logits of the last ``n_logits`` tokens only
    (``logits_to_keep``), since the lm_head over a 150k vocabulary is a large share of a step.

    Batching: :meth:`_forward` evaluates the sessions of a batch one after another (a loop,
    not a fused padded pass); the results equal those of scoring each session alone.

    ``info.vocab_fingerprint`` hashes the raw ``tokenizer.ggml.tokens`` strings when loading a
    GGUF, exactly as the llama.cpp engine does, so both engines on one GGUF agree. For a
    Hugging Face directory it hashes ``convert_ids_to_tokens`` over the output vocabulary;
    such fingerprints are not comparable with GGUF ones.

    ``n_threads`` sets ``torch.set_num_threads``, which is process-wide.
    """

    def __init__(
        self,
        model_path: str | Path,
        gguf_file: str | None = None,
        dtype: str = "float32",
        n_threads: int | None = None,
        n_ctx: int = 4096,
        name: str | None = None,
        device: str = "cpu",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path).expanduser()
        if path.is_file():
            if path.suffix != ".gguf":
                raise EngineError(f"{path} is a file but not a .gguf; give a GGUF or a model directory")
            source, gguf_file = path.parent, path.name
        elif path.is_dir():
            source = path
            if gguf_file is not None and not (path / gguf_file).is_file():
                raise EngineError(f"GGUF file not found: {path / gguf_file}")
        else:
            raise EngineError(f"model not found: {path}")
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise EngineError(f"unknown dtype {dtype!r}")
        if n_threads:
            torch.set_num_threads(int(n_threads))
        self._torch = torch
        self._device = torch.device(device)
        kw = {"local_files_only": True}
        if gguf_file is not None:
            kw["gguf_file"] = gguf_file
        try:
            self._tok = AutoTokenizer.from_pretrained(source, **kw)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kw)
        except (OSError, ValueError, ImportError) as exc:
            raise EngineError(f"cannot load {path} with transformers: {exc}") from exc
        pieces = gguf_vocab_tokens(source / gguf_file) if gguf_file is not None else None
        self._attach(model, name or (gguf_file if gguf_file is not None else path.name), n_ctx, pieces)

    @classmethod
    def from_model(cls, model, tokenizer=None, name: str = "in-memory", n_ctx: int = 4096) -> "TransformersEngine":
        """An engine over a causal LM already in memory (e.g. built from a config with random
        weights, for tests). Without a tokenizer the engine scores ids only: tokenizing
        raises, and the vocabulary fingerprint hashes the ids."""
        import torch

        engine = cls.__new__(cls)
        engine._torch = torch
        engine._device = next(model.parameters()).device
        engine._tok = tokenizer
        vocab = int(model.config.vocab_size)
        engine._attach(model, name, n_ctx, None if tokenizer is not None else [f"<{i}>" for i in range(vocab)])
        return engine

    def _attach(self, model, name: str, n_ctx: int, pieces) -> None:
        self._model = model.to(self._device).eval()
        out = self._model.get_output_embeddings()
        vocab = int(out.weight.shape[0]) if out is not None else int(self._model.config.vocab_size)
        if pieces is None:
            pieces = [t or "" for t in self._tok.convert_ids_to_tokens(list(range(vocab)))]
        dtype = str(self._model.dtype).removeprefix("torch.")
        self.info = EngineInfo(
            backend="transformers",
            model=name,
            vocab_size=vocab,
            vocab_fingerprint=fingerprint_vocabulary(pieces),
            eos_token_ids=self._eos_ids(),
            n_ctx=int(n_ctx),
            extra={"dtype": dtype, "threads": self._torch.get_num_threads(), "device": str(self._device)},
        )

    def _eos_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        if self._tok is not None and self._tok.eos_token_id is not None:
            ids.append(int(self._tok.eos_token_id))
        gen = getattr(self._model, "generation_config", None)
        gen_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if gen_eos is not None:
            ids.extend(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
        if self._tok is not None:
            # Chat end markers the model emits even when the config names only one of them.
            vocab = self._tok.get_vocab()
            ids.extend(vocab[t] for t in _END_TOKENS if t in vocab)
        return tuple(dict.fromkeys(ids))

    # ---- tokenizer -----------------------------------------------------------------
    def _tokenizer(self):
        self._check_open()
        if self._tok is None:
            raise EngineError(f"engine {self.info.model!r} has no tokenizer: it scores token ids only")
        return self._tok

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self._tokenizer().encode(text, add_special_tokens=add_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._tokenizer().decode([int(t) for t in tokens], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        self._tokenizer()
        if not getattr(self._tok, "chat_template", None):
            return super().apply_chat_template(messages, add_generation_prompt)
        return self._tok.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    # ---- sessions ------------------------------------------------------------------
    def _open_state(self) -> _State:
        self._check_open()
        from transformers import DynamicCache

        return _State(DynamicCache(config=self._model.config))

    def _close_state(self, state: _State) -> None:
        state.cache = None

    def _forward(self, items) -> list[np.ndarray]:
        self._check_open()
        torch = self._torch
        results = []
        with torch.inference_mode():
            for state, n_past, tokens, n_logits in items:
                if state.cache is None:
                    raise EngineError("session is closed")
                have = state.cache.get_seq_length()
                if have != n_past:
                    raise EngineError(f"KV cache holds {have} positions, session expects {n_past}")
                if n_past + len(tokens) > self.info.n_ctx:
                    raise EngineError(f"context overflow: {n_past + len(tokens)} > n_ctx {self.info.n_ctx}")
                if not tokens or not 1 <= n_logits <= len(tokens):
                    raise EngineError(f"cannot return {n_logits} logit rows for {len(tokens)} tokens")
                ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._device)
                pos = torch.arange(n_past, n_past + len(tokens), device=self._device).unsqueeze(0)
                out = self._model(input_ids=ids, position_ids=pos, past_key_values=state.cache,
                                  use_cache=True, logits_to_keep=n_logits)
                logits = out.logits[0, -n_logits:]
                results.append(logits.to(device="cpu", dtype=torch.float32).numpy())
        return results

    def layer_split(self) -> "_Layers | None":
        """The model's own modules run a range of decoder layers at a time, for a decoder-only
        model laid out as transformers' Llama-family models are (``model.embed_tokens``,
        ``model.layers``, ``model.rotary_emb``, ``model.norm``, ``lm_head``: Qwen2, Llama,
        Mistral...); None for another layout."""
        self._check_open()
        inner = getattr(self._model, "model", None)
        if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "rotary_emb", "norm")) \
                or self._model.get_output_embeddings() is None:
            return None
        return _Layers(self)

    def _truncate(self, state: _State, n_keep: int) -> None:
        have = state.cache.get_seq_length()
        if n_keep >= have:
            return
        if n_keep <= 0:
            from transformers import DynamicCache

            state.cache = DynamicCache(config=self._model.config)
            return
        # transformers 5.x: crop(tokens_to_remove) takes a negative count (a positive one
        # raises); 4.x: crop(max_length) also reads a negative value as "remove this many".
        state.cache.crop(-(have - n_keep))

    # ---- lifetime ------------------------------------------------------------------
    def _check_open(self) -> None:
        if getattr(self, "_model", None) is None:
            raise EngineError("engine is closed")

    def close(self) -> None:
        """Release the model; the engine and its sessions are unusable afterwards."""
        if getattr(self, "_model", None) is None:
            return
        self._model = None
        self._tok = None
        gc.collect()
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()

    def __enter__(self) -> "TransformersEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Layers(LayerSplit):
    """Split inference over a transformers model: each part runs the model's own modules."""

    def __init__(self, engine: TransformersEngine):
        self.engine = engine
        self.config = engine._model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def _open_part(self, first: int, last: int) -> "_Part":
        return _Part(self, first, last)


class _Part(ModelPart):
    """Layers ``[first, last)`` with a ``DynamicCache`` of their own (its other layers stay empty).

    Follows the decoder loop of the model's own ``forward`` (embedding, rotary embeddings and
    causal masks from the positions, each layer, then the final norm and the head), so the
    parts chained reproduce the unsplit forward pass.
    """

    def __init__(self, split: _Layers, first: int, last: int):
        from transformers import DynamicCache

        super().__init__(split, first, last)
        self.engine = split.engine
        self.cache = DynamicCache(config=split.config)

    def _masks(self, hidden, positions) -> tuple[dict, list[str]]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = self.split.config
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.split.n_layers)
        masks = {}
        for kind in dict.fromkeys(types[self.first:self.last]):
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            # Sized against this part's own first layer of that kind: the cache's other layers are empty.
            first_of_kind = self.first + types[self.first:self.last].index(kind)
            masks[kind] = make(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=self.cache,
                               position_ids=positions, layer_idx=first_of_kind)
        return masks, types

    def _run(self, x: np.ndarray, start: int, keep: int) -> np.ndarray:
        engine = self.engine
        engine._check_open()
        torch, model = engine._torch, engine._model
        inner = model.model
        if start + len(x) > engine.info.n_ctx:
            raise EngineError(f"context overflow: {start + len(x)} > n_ctx {engine.info.n_ctx}")
        with torch.inference_mode():
            if self.takes_tokens:
                ids = torch.as_tensor(x, dtype=torch.long, device=engine._device)[None]
                hidden = inner.embed_tokens(ids)
            else:
                hidden = torch.tensor(x, dtype=model.dtype, device=engine._device)[None]  # a copy: x may be read-only
            positions = torch.arange(start, start + len(x), device=engine._device)[None]
            masks, types = self._masks(hidden, positions)
            rotary = inner.rotary_emb(hidden, positions)
            for i in range(self.first, self.last):
                hidden = inner.layers[i](hidden, attention_mask=masks[types[i]], position_embeddings=rotary,
                                         position_ids=positions, past_key_values=self.cache, use_cache=True)
            if self.gives_logits:
                hidden = model.get_output_embeddings()(inner.norm(hidden[:, -keep:]))
            return hidden[0].to(device="cpu", dtype=torch.float32).numpy()

    def close(self) -> None:
        super().close()
        self.cache = None
