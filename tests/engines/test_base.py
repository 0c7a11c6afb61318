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


def test_errors(toy):
    s = toy.new_session()
    with pytest.raises(EngineError, match="prefill"):
        s.score([1])
    s.close()
    with pytest.raises(EngineError, match="closed"):
        s.extend([1])
    with pytest.raises(EngineError, match="unknown engine 'nope'.*llamacpp"):
        create_engine("nope")
