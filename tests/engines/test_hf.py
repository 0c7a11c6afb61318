"""The transformers engine on the real 0.5B draft GGUF (fp32, CPU)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from systems.engines.base import EngineError, fingerprint_vocabulary
from systems.engines.gguf_vocab import gguf_vocab_fingerprint, gguf_vocab_tokens

pytestmark = pytest.mark.slow

PROMPT = (
    "def quicksort(items):\n"
    '    """Sort a list of numbers in ascending order."""\n'
    "    if len(items) <= 1:\n"
    "        return items\n"
)
OTHER_PROMPT = "The three primary colours of light are red, green and"


@pytest.fixture(scope="module")
def engine(draft_model_path):
    from systems.engines.hf import TransformersEngine

    if not draft_model_path.is_file():
        pytest.skip(f"model not downloaded: {draft_model_path.name}")
    # One thread: on a small shared machine, oversubscribed OpenMP threads are 4-5x slower.
    with TransformersEngine(draft_model_path, n_threads=1, n_ctx=512) as eng:
        yield eng


def _greedy(engine, prompt_tokens, n):
    """n tokens by sequential greedy decoding, one forward pass per token."""
    session = engine.new_session()
    logits = session.prefill(prompt_tokens)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = session.score([out[-1]])[-1]
    session.close()
    return out


def test_block_pass_matches_sequential_greedy(engine):
    prompt = engine.tokenize(PROMPT)
    greedy = _greedy(engine, prompt, 9)
    session = engine.new_session()
    session.extend(prompt)  # the prompt and the block are evaluated in one pass
    rows = session.score(greedy[:8])
    assert rows.shape == (9, engine.vocab_size) and rows.dtype == np.float32
    assert [int(np.argmax(r)) for r in rows] == greedy
    assert session.n_evaluated == len(prompt) + 8


def test_rollback_then_rescore_gives_same_logits(engine):
    prompt = engine.tokenize(PROMPT)
    block = engine.tokenize("    pivot = items[0]\n")[:6]
    session = engine.new_session()
    session.prefill(prompt)
    first = session.score(block)
    session.rollback(len(prompt))
    assert len(session) == len(prompt)
    again = session.score(block)
    np.testing.assert_allclose(again, first, atol=1e-4, rtol=0)
    # A partial rollback into the block: keep 3 block tokens, rescore the rest.
    session.rollback(len(prompt) + 3)
    tail = session.score(block[3:])
    np.testing.assert_allclose(tail, first[3:], atol=1e-4, rtol=0)


def test_score_batch_equals_each_session_alone(engine):
    a_prompt, b_prompt = engine.tokenize(PROMPT), engine.tokenize(OTHER_PROMPT)
    a_block, b_block = engine.tokenize("    pivot"), engine.tokenize(" blue, and")
    alone = []
    for prompt, block in ((a_prompt, a_block), (b_prompt, b_block)):
        s = engine.new_session()
        s.prefill(prompt)
        alone.append(s.score(block))
        s.close()
    a, b = engine.new_session(), engine.new_session()
    a.prefill(a_prompt)
    b.prefill(b_prompt)
    together = engine.score_batch([(a, a_block), (b, b_block)])
    for got, want in zip(together, alone):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_tokenizer_template_and_info(engine, draft_model_path):
    text = 'print("héllo, wörld")  # 你好\n<|im_end|>'
    tokens = engine.tokenize(text)
    assert engine.detokenize(tokens) == text
    im_end = engine.tokenize("<|im_end|>")
    assert len(im_end) == 1 and im_end[0] in engine.eos_token_ids  # special tokens are parsed
    chat = engine.apply_chat_template([{"role": "user", "content": "Write a sort."}])
    assert "<|im_start|>" in chat and chat.endswith("<|im_start|>assistant\n")
    info = engine.info
    assert info.backend == "transformers" and info.vocab_size == 151936 and info.n_ctx == 512
    assert info.extra == {"dtype": "float32", "threads": 1, "device": "cpu"}
    assert info.vocab_fingerprint == gguf_vocab_fingerprint(draft_model_path)


def test_context_overflow_and_closed_session_raise(engine):
    session = engine.new_session()
    session.extend([11] * (engine.info.n_ctx + 1))
    with pytest.raises(EngineError, match="context overflow"):
        session.next_logits()
    session.close()
    with pytest.raises(EngineError):
        session.score([11])


def test_missing_model_is_a_clear_error(tmp_path):
    from systems.engines.hf import TransformersEngine

    with pytest.raises(EngineError, match="not found"):
        TransformersEngine(tmp_path / "absent.gguf")
    with pytest.raises(EngineError, match="not found"):
        TransformersEngine(tmp_path, gguf_file="absent.gguf")
    with pytest.raises(EngineError, match="not found"):
        gguf_vocab_fingerprint(tmp_path / "absent.gguf")


def test_gguf_vocab_fingerprint_is_fast_and_shared_by_the_pair(draft_model_path, target_model_path):
    for p in (draft_model_path, target_model_path):
        if not p.is_file():
            pytest.skip(f"model not downloaded: {p.name}")
    start = time.perf_counter()
    draft, target = gguf_vocab_fingerprint(draft_model_path), gguf_vocab_fingerprint(target_model_path)
    assert time.perf_counter() - start < 5.0
    assert draft == target and len(draft) == 64


def test_gguf_vocab_tokens_match_gguf_reader(draft_model_path):
    """The header walk reads the same strings as the gguf package's (slow, ~15 s) reader."""
    from gguf import GGUFReader

    field = GGUFReader(draft_model_path, "r").fields["tokenizer.ggml.tokens"]
    reference = [bytes(field.parts[i]) for i in field.data]
    tokens = gguf_vocab_tokens(draft_model_path)
    assert tokens == reference and len(tokens) == 151936
    assert fingerprint_vocabulary(tokens) == gguf_vocab_fingerprint(draft_model_path)


def test_layer_split_matches_the_unsplit_model(engine):
    """The model run as two parts (layers 0-2 and 3-23, each with its own cache) gives the
    unsplit model's logits after the prompt and after each next token."""
    prompt = engine.tokenize(PROMPT)
    split = engine.layer_split()
    assert (split.n_layers, split.hidden_size) == (24, 896)
    edge, cloud = split.open_part(0, 3), split.open_part(3, 24)
    session = engine.new_session()
    want = session.prefill(prompt)
    got = cloud.run(edge.run(prompt))
    assert got.shape == (1, engine.vocab_size)
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0)
    for _ in range(3):
        token = int(np.argmax(want))
        want = session.score([token])[-1]
        np.testing.assert_allclose(cloud.run(edge.run([token]))[0], want, atol=1e-4, rtol=0)
    session.close()
