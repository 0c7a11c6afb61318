"""The engine contract's bookkeeping (lazy evaluation, rollback, batching) on the toy engine."""

from __future__ import annotations

import numpy as np
import pytest

from systems.engines import EngineError, create_engine


@pytest.fixture
def toy():
    return create_engine("toy", role="target", vocab_size=16, seed=4)


def test_block_rows_match_the_model(toy):
    s = toy.new_session()
    s.prefill([1, 2, 3])
    rows = s.score([4, 5])
    assert rows.shape == (3, 16)
    for i, ctx in enumerate([[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5]]):
        assert np.array_equal(rows[i], toy.logits_for(ctx))


def test_rollback_then_rescore_and_lazy_extend(toy):
    s = toy.new_session()
    s.prefill([1, 2, 3])
    first = s.score([4, 5, 6])
    s.rollback(4)
    assert s.tokens == [1, 2, 3, 4] and s.n_evaluated == 3  # the last kept token is re-evaluated
    s.extend([5])  # lazy: evaluated together with the next block
    again = s.score([6])
    assert np.array_equal(again, first[2:])
    with pytest.raises(EngineError, match="cannot roll back"):
        s.rollback(99)


def test_batched_scoring_equals_separate(toy):
    a, b = toy.new_session(), toy.new_session()
    a.prefill([1, 2])
    b.prefill([7])
    ra, rb = toy.score_batch([(a, [3, 4]), (b, [8])])
    c = toy.new_session()
    c.prefill([1, 2])
    assert np.array_equal(ra, c.score([3, 4]))
    assert rb.shape == (2, 16)


def test_an_empty_block_after_an_evaluated_context_is_its_next_row(toy):
    """Verifying no draft tokens (a request with one token left) needs only the row after the
    context: scoring an empty block gives it, alone or beside another session's block, and
    evaluates nothing."""
    a, b = toy.new_session(), toy.new_session()
    a.prefill([1, 2, 3])
    b.prefill([7])
    assert np.array_equal(a.score([]), toy.logits_for([1, 2, 3])[None, :])
    ra, rb = toy.score_batch([(a, []), (b, [8])])
    assert np.array_equal(ra, toy.logits_for([1, 2, 3])[None, :])
    assert np.array_equal(rb[1], toy.logits_for([7, 8]))
    assert a.tokens == [1, 2, 3] and a.n_evaluated == 3
    empty = toy.new_session()
    with pytest.raises(EngineError, match="nothing to score"):
        empty.score([])


def test_errors(toy):
    s = toy.new_session()
    with pytest.raises(EngineError, match="prefill"):
        s.score([1])
    s.close()
    with pytest.raises(EngineError, match="closed"):
        s.extend([1])
    with pytest.raises(EngineError, match="unknown engine 'nope'.*llamacpp"):
        create_engine("nope")
