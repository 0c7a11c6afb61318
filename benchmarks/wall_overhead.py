"""Harness overhead per verification round in wall mode, over loopback gRPC.

Runs vanilla speculative decoding on the toy pair (conf/pair/toy.yaml) with the cloud and
one edge as separate processes (:func:`harness.wall.run_wall`). The toy engines memoize
their logits per context, and every timed request repeats the warm-up request's prompt and
seed, so the timed requests cost (almost) no model time in either process. What a round
still costs is the harness: drafting bookkeeping, message encoding, gRPC over loopback both
ways, the cloud's queueing and the hand-offs between each process's event loop and its
compute thread. The model time that remains (cached forward passes, measured on the same
engines in this process) is subtracted; it is reported too. Work that short runs on each
process's event loop rather than its compute thread (see :class:`harness.wall.WallCompute`),
so the figure leaves out the thread hand-off that every op of a real model pays (about
0.1-0.2 ms each on a busy 2-core machine).

Reports the median over the timed requests of each run and the median over runs (the
machine is shared and noisy), with the per-round timeline the records carry, and the same
requests served in one process (instant link, no threads) for comparison.

    python benchmarks/wall_overhead.py [--runs 3] [--repeats 7] [--tokens 128] [--gamma 4] [--pin both]
"""

from __future__ import annotations

import argparse
import statistics

from harness.inprocess import RunOptions, run_system
from harness.pairs import ensure_pair, load_pair, open_engines
from harness.wall import run_wall
from systems.api import GenerationRequest
from _timing import ForwardTimer  # noqa: E402  (a sibling script module)

TARGET_MS = 2.0


def _requests(n: int, tokens: int) -> list[GenerationRequest]:
    # Same prompt and seed: the first warms both processes' logit caches.
    return [GenerationRequest(f"r{i}", [1, 2, 3], tokens, seed=0) for i in range(n)]


def model_seconds_per_round(tokens: int, config: dict) -> tuple[float, int]:
    """Forward-pass time per round of one warm request, measured here on the same engines."""
    pair = load_pair("toy")
    draft, target = open_engines(pair, ensure_pair(pair, progress=False))
    req = _requests(1, tokens)
    run_system("vanilla", draft, target, req, config)  # warm the caches
    timers = ForwardTimer(draft), ForwardTimer(target)
    rec = run_system("vanilla", draft, target, req, config)[0]
    return sum(t.seconds for t in timers) / len(rec.rounds), len(rec.rounds)


def inprocess_per_round(repeats: int, tokens: int, config: dict) -> float:
    """Seconds per round of the same requests in one process (wall clock, instant link)."""
    pair = load_pair("toy")
    draft, target = open_engines(pair, ensure_pair(pair, progress=False))
    recs = run_system("vanilla", draft, target, _requests(repeats + 1, tokens), config,
                      RunOptions(virtual=False))[1:]
    return statistics.median(r.e2e / len(r.rounds) for r in recs)


def one_run(repeats: int, tokens: int, config: dict, pin: bool) -> dict:
    recs = run_wall("vanilla", "toy", _requests(repeats + 1, tokens), config, clients=1, pin=pin)[1:]
    rounds = [r for rec in recs for r in rec.rounds]

    def med(key):
        values = [getattr(r, key) for r in rounds if getattr(r, key) is not None]
        return statistics.median(values) if values else float("nan")

    return {
        "per_round": statistics.median(r.e2e / len(r.rounds) for r in recs),
        "rounds": statistics.median(len(r.rounds) for r in recs),
        **{k: med(k) for k in ("t_draft", "t_uplink", "t_queue", "t_verify", "t_downlink")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="wall-mode runs per setting (each starts fresh processes)")
    ap.add_argument("--repeats", type=int, default=7, help="timed requests per run")
    ap.add_argument("--tokens", type=int, default=128, help="max_new_tokens per request")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--pin", choices=["both", "on", "off"], default="both",
                    help="pin cloud and edge to their own cores (wall mode's default), not, or both")
    args = ap.parse_args()
    config = {"gamma": args.gamma}
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.pin]

    model, n_rounds = model_seconds_per_round(args.tokens, config)
    inproc = inprocess_per_round(args.repeats, args.tokens, config)
    ms = 1e3
    print(f"wall-mode harness overhead per round (vanilla, γ={args.gamma}, toy pair, {args.tokens} tokens, "
          f"~{n_rounds} rounds/request; median of {args.repeats} requests x {args.runs} runs; loopback gRPC, "
          f"cloud and edge as separate processes; measured on this machine)")
    print(f"  model time per round {model * ms:.3f} ms (cached toy forward passes, measured in-process); "
          f"same requests in one process, instant link: {inproc * ms:.3f} ms/round")
    for pin in settings:
        runs = [one_run(args.repeats, args.tokens, config, pin) for _ in range(args.runs)]
        per_round = statistics.median(r["per_round"] for r in runs)
        overhead = per_round - model
        print(f"  {'pinned (cloud and edge on their own cores)' if pin else 'not pinned'}:")
        for i, r in enumerate(runs):
            print(f"    run {i}: {r['per_round'] * ms:6.3f} ms/round; timeline medians (ms): "
                  f"draft {r['t_draft'] * ms:.3f}, uplink {r['t_uplink'] * ms:.3f}, queue {r['t_queue'] * ms:.3f}, "
                  f"verify {r['t_verify'] * ms:.3f}, downlink {r['t_downlink'] * ms:.3f}")
        print(f"    harness overhead per round {overhead * ms:6.3f} ms (wall {per_round * ms:.3f} - model "
              f"{model * ms:.3f}); target <= {TARGET_MS:g} ms: {'met' if overhead * ms <= TARGET_MS else 'NOT met'}")


if __name__ == "__main__":
    main()
