"""Per-round overhead of the interface beyond model calls, in one process.

Runs vanilla speculative decoding on toy engines with the real pair's vocabulary size
(151,936), an instant link and no device costs, and subtracts the time spent inside the
engines' forward passes. What remains is the interface: drafting bookkeeping, sampling
rules, message encoding and decoding, the cloud's buffering and the event loop.
Reports the median over repeats (this machine is shared and noisy).

    python benchmarks/round_overhead.py [--repeats 7] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

from harness.inprocess import run_system
from systems.api import GenerationRequest
from systems.engines import create_engine
from systems.sampling import SamplingParams
from _timing import ForwardTimer  # noqa: E402  (a sibling script module)


def measure(vocab: int, tokens: int, params: SamplingParams, config: dict) -> float:
    """Seconds of interface overhead per verification round for one request."""
    kw = dict(vocab_size=vocab, seed=1)
    draft = create_engine("toy", role="draft", agreement=0.8, **kw)
    target = create_engine("toy", role="target", **kw)
    # Warm the toy model's cache so model work is cheap and stable, then time.
    req = GenerationRequest("warm", [1, 2, 3], tokens, params, seed=0)
    run_system("vanilla", draft, target, [req], config)
    timers = ForwardTimer(draft), ForwardTimer(target)
    t0 = time.perf_counter()
    rec = run_system("vanilla", draft, target, [req], config)[0]
    total = time.perf_counter() - t0
    model = sum(t.seconds for t in timers)
    return (total - model) / max(1, len(rec.rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--gamma", type=int, default=4)
    args = ap.parse_args()
    print(f"interface overhead per round beyond model calls (vanilla, γ={args.gamma}, V={args.vocab}, "
          f"{args.tokens} tokens, median of {args.repeats}; measured, in-process, this CPU)")
    t1 = SamplingParams(temperature=1.0)
    for label, params, extra in [("greedy (ids on the wire)", SamplingParams(), {}),
                                 ("T=1, full distributions", t1, {}),
                                 ("T=1, sparse split", t1, {"verification": "sparse"})]:
        config = {"gamma": args.gamma, **extra}
        samples = [measure(args.vocab, args.tokens, params, config) for _ in range(args.repeats)]
        med = statistics.median(samples)
        print(f"  {label:26s} median {med * 1e3:7.3f} ms/round"
              f"   (min {min(samples) * 1e3:.3f}, max {max(samples) * 1e3:.3f})")


if __name__ == "__main__":
    main()
