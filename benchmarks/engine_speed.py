"""Prompt and decode speed of each model of a pair with the installed llama.cpp build.

Each model is run in its own child process (the self-check worker, so a crashing build is
named rather than fatal), ``--repeats`` times: load, prefill a short code prompt, then
decode greedily one token per forward pass. Prints the median prompt and decode tok/s per
model with the build's key and flags, and the contention seen before the first run (time
nothing on a busy machine: llama.cpp collapses when it shares its cores).

    python benchmarks/engine_speed.py [--pair qwen25coder] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics

from harness.contention import planned_threads, sample
from harness.pairs import ensure_pair, load_pair
from harness.selfcheck import pair_checks, run_check
from harness.sysinfo import cpu_info, llama_build


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="qwen25coder")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="runs per model; the median is reported (default 3)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    pair = load_pair(args.pair)
    paths = ensure_pair(pair)
    contention = sample(1.0, engine_threads=planned_threads(pair))
    build = llama_build()
    print(f"llama-cpp-python {build.version}, build {build.key}: CMAKE_ARGS='{build.cmake_args}'")
    print(f"CPU: {cpu_info().summary()}")
    print(f"before the runs: {contention.summary()}" + (" (CONTENDED)" if contention.contended else ""))
    rows = []
    for check in pair_checks(pair, paths):
        runs = [run_check(check, tokens=args.tokens) for _ in range(args.repeats)]
        row = {"role": check.role, "model": check.path.name if check.path else check.engine,
               "threads": runs[0]["threads"], "load_s": statistics.median(r["load_s"] for r in runs),
               "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
               "prompt_tokens": runs[0]["prompt_tokens"],
               "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
               "decode_tok_s_runs": [r["decode_tok_s"] for r in runs]}
        rows.append(row)
        print(f"{row['role']:<7} {row['model']:<44} threads {row['threads']}: load {row['load_s']:.2f} s, "
              f"prefill {row['prefill_tok_s']:.1f} tok/s ({row['prompt_tokens']} tokens), decode "
              f"{row['decode_tok_s']:.1f} tok/s (median of {args.repeats}: {row['decode_tok_s_runs']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"build": build.as_dict(), "cpu": cpu_info().as_dict(), "contention": contention.as_dict(),
                       "tokens": args.tokens, "repeats": args.repeats, "models": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
