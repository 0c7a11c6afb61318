"""``specwan bench``: run every registered system on a pair over a few prompts, side by side.

Runs in one process on this machine's wall clock with both models on the same CPU, so the
times are *measured here* and say nothing yet about an edge device and a GPU cloud joined
by a WAN (virtual-time runs with device and link profiles do). Acceptance, tokens per
verification round and bytes per token are properties of the pair and the system, and
carry over.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from harness.inprocess import RunOptions, run_system
from harness.pairs import DEFAULT_PAIR, ensure_pair, load_pair, open_engines
from systems.api import GenerationRequest, get_system, system_names
from systems.sampling import SamplingParams
from workloads.smoke import SMOKE_PROMPTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR, help=f"pair name or YAML file (default: {DEFAULT_PAIR})")
    p.add_argument("--systems", default=None, help="comma-separated systems (default: every registered one)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=len(SMOKE_PROMPTS), help="how many of the smoke prompts")


def run(args: argparse.Namespace) -> int:
    names = args.systems.split(",") if args.systems else system_names()
    for name in names:
        get_system(name)  # unknown names fail here, listing the valid ones, before models load
    pair = load_pair(args.pair)
    paths = ensure_pair(pair)
    t0 = time.perf_counter()
    draft, target = open_engines(pair, paths)
    print(f"pair {pair.name}: draft {draft.info.model}, target {target.info.model} "
          f"(loaded in {time.perf_counter() - t0:.1f} s)")
    prompts = [_render(target, p) for p in SMOKE_PROMPTS[: args.prompts]]
    requests = [GenerationRequest(p["id"], toks, args.max_new_tokens, SamplingParams(), seed=i)
                for i, (p, toks) in enumerate(zip(SMOKE_PROMPTS, prompts))]
    rows, outputs = [], {}
    for name in tqdm(names, desc="systems", unit="system"):
        records = run_system(name, draft, target, requests, options=RunOptions(virtual=False))
        outputs[name] = [r.output_tokens for r in records]
        rows.append(_summarise(name, records))
    _print_table(rows)
    if "cloud_only" in outputs:
        ref = outputs["cloud_only"]
        for name, outs in outputs.items():
            if get_system(name).reference == "target" and name != "cloud_only":
                same = sum(a == b for a, b in zip(outs, ref))
                print(f"{name}: {same}/{len(ref)} outputs identical to the target's own greedy decode "
                      "(llama.cpp logits depend on batch shape; differences are near-ties)")
    return 0


def _render(engine, prompt: dict) -> list[int]:
    messages = [{"role": "user", "content": prompt["turns"][0]}]
    try:
        text = engine.apply_chat_template(messages)
    except Exception:  # an engine without a template gets the raw text
        text = prompt["turns"][0]
    return engine.tokenize(text)


def _summarise(name, records) -> dict:
    tokens = sum(r.n_tokens for r in records)
    seconds = sum(r.e2e for r in records)
    verified = sum(sum(x.verified for x in r.rounds) for r in records)
    accepted = sum(r.accepted for r in records)
    rounds = sum(len(r.rounds) for r in records)
    return {
        "system": name,
        "tokens": tokens,
        "ms/token": 1e3 * seconds / tokens if tokens else None,
        "acceptance": accepted / verified if verified else None,
        "tokens/round": tokens / rounds if rounds else None,
        "B up/token": sum(r.bytes_up for r in records) / tokens if tokens else None,
        "B down/token": sum(r.bytes_down for r in records) / tokens if tokens else None,
    }


def _print_table(rows) -> None:
    cols = list(rows[0])
    fmt = {c: (lambda v: "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))) for c in cols}
    cells = [[fmt[c](r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    print("times: measured, wall clock, in one process with both models on this CPU")
