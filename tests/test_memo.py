"""Record once, replay many: a network sweep reuses the forward passes of the first run."""

from __future__ import annotations

import pytest

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from harness.memo import MemoEngine
from systems.api import GenerationRequest
from systems.engines import create_engine
from systems.sampling import SamplingParams

LINKS = [LinkProfile("lan", 0.001, 1e9, 1e9), LinkProfile("wan", 0.05, 1e7, 1e7),
         LinkProfile("slow", 0.2, 1e6, 1e6), LinkProfile("sat", 0.6, 5e6, 5e7)]


@pytest.mark.parametrize("system", ["vanilla", "cloud_only", "edge_only"])
def test_sweep_replays_model_calls_and_keeps_tokens(system):
    kw = dict(vocab_size=32, seed=2)
    draft, target = create_engine("toy", role="draft", agreement=0.7, **kw), create_engine("toy", role="target", **kw)
    reqs = [GenerationRequest(f"r{i}", [1, 2, 3 + i], 30, SamplingParams(), seed=i) for i in range(3)]
    plain = [run_system(system, draft, target, reqs, options=RunOptions(link=link, edge_cost=lambda op: 0.03,
                                                                        cloud_cost=lambda op: 0.01)) for link in LINKS]
    md, mt = MemoEngine(draft), MemoEngine(target)
    memo, misses = [], []
    for link in LINKS:
        memo.append(run_system(system, md, mt, reqs, options=RunOptions(link=link, edge_cost=lambda op: 0.03,
                                                                        cloud_cost=lambda op: 0.01)))
        misses.append(md.misses + mt.misses)
    for a, b in zip(plain, memo):
        assert [r.output_tokens for r in a] == [r.output_tokens for r in b]
        assert [r.e2e for r in a] == pytest.approx([r.e2e for r in b])
    assert misses[0] > 0 and misses[-1] == misses[0], "later profiles must not run the model again"
    assert md.hits + mt.hits >= 3 * misses[0]


def test_systems_share_rows_scored_in_other_blocks():
    """Rows are kept per prefix: a system that splits the same text into other blocks replays them."""
    kw = dict(vocab_size=64, seed=4, sharpness=4.0)
    draft, target = create_engine("toy", role="draft", agreement=0.8, **kw), create_engine("toy", role="target", **kw)
    reqs = [GenerationRequest(f"r{i}", [1, 2, 3 + i], 40, SamplingParams(), seed=i) for i in range(3)]
    md, mt = MemoEngine(draft), MemoEngine(target)
    first = run_system("vanilla", md, mt, reqs, {"gamma": 5})
    before = mt.misses
    second = run_system("vanilla", md, mt, reqs, {"gamma": 3})  # other verification blocks
    assert [r.output_tokens for r in first] == [r.output_tokens for r in second]
    assert mt.misses - before < before / 2, f"{mt.misses - before} new target calls after {before}"
