"""Validate a fitted pair against the real pair it was fitted to, at N = 1..4 edge devices.

    python benchmarks/fitted_validation.py [--pair qwen25coder] [--system sled] [--ns 1 2 3 4]

1. **Fit.** Greedy runs of the real pair (vanilla and HSL, virtual time) on one sample of
   HumanEval prompts; ``specwan fit-pair`` turns them into ``fitted_<pair>``.
2. **Validate.** The same configuration, on another sample of prompts, run with the real pair
   and with the fitted one: ``--system`` with N edge devices (``edges=mixed``: a laptop, a
   phone and an IoT board on a WAN, 4G and a LAN), each serving ``--requests-per-edge``
   requests, under the wisp_capacity preset's SLO. Same devices, links and arrivals.
3. **Compare**, per N: time per output token (the run's summed latency over its tokens), SLO
   goodput (good tokens per second of makespan, :mod:`analysis.capacity`) and the acceptance
   at each window position, with the errors. The issue's bar: time per token and goodput
   within 10 %, per-position acceptance within 0.03.

Every figure is modelled (virtual time, the device profiles price the work); the real pair's
tokens and acceptance are computed by its models, the fitted pair's drawn from its statistics.
Writes ``<out>/validation.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIT_SYSTEMS = ("vanilla", "hsl")
COMMON = ["workload=humaneval", "workload.turns=1", "energy=none"]
SLO = ["workload.slo.ttft_s=3.0", "workload.slo.tpot_s=0.25"]


def specwan(*args: str, log: Path, reuse: Path | None = None) -> None:
    """Run ``specwan`` with ``args``; a failure stops the script with the command's tail.
    ``reuse``: a run folder that, if already complete, is kept instead."""
    if reuse is not None and (reuse / "manifest.json").exists() and json.loads(
            (reuse / "manifest.json").read_text()).get("complete"):
        print(f"  {reuse.relative_to(reuse.parent.parent)}: complete, reused", flush=True)
        return
    cmd = [sys.executable, "-m", "analysis.cli", *args]
    t0 = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ specwan {' '.join(args)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    print(f"  specwan {' '.join(a for a in args if not a.startswith('hydra.'))}  ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    if done.returncode != 0:
        sys.exit(f"fitted_validation: a run failed (exit {done.returncode}); see {log}")


def figures(run_dir: Path) -> dict:
    """A run's time per token, goodput and per-position acceptance."""
    from analysis.capacity import run_metrics
    from harness.fit_pair import window_stats
    from harness.results import load_run

    _, requests, rounds = load_run(run_dir)
    metrics = run_metrics(requests.assign(run=run_dir.name), per_device=False).iloc[0]
    live = rounds[rounds["verified"] > 0]
    stats = window_stats(zip(live["verified"], live["accepted"]), positions=6)
    return {"tpt_ms": 1e3 * float(requests["end"].sub(requests["start"]).sum()) / float(requests["n_tokens"].sum()),
            "goodput": float(metrics["goodput"]), "attainment": float(metrics["attainment"]),
            "acceptance": stats.acceptance, "per_position": stats.per_position, "per_position_n": stats.per_position_n,
            "requests": int(len(requests)), "tokens": int(requests["n_tokens"].sum())}


def pooled_positions(run_dirs):
    """The per-position acceptance of several runs' rounds together."""
    import pandas as pd

    from harness.fit_pair import window_stats
    from harness.results import load_run

    rounds = pd.concat([load_run(d)[2] for d in run_dirs])
    live = rounds[rounds["verified"] > 0]
    return window_stats(zip(live["verified"], live["accepted"]), positions=6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="qwen25coder")
    ap.add_argument("--system", default="sled")
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--requests-per-edge", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--fit-prompts", type=int, default=12)
    ap.add_argument("--out", default="results/fitted-validation")
    ap.add_argument("--reuse", action="store_true", help="keep run folders already complete in --out")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads per model of the real pair (1 on a busy machine: its threads wait "
                         "on each other when another process takes a core; virtual times do not change)")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    fitted = f"fitted_{args.pair}"
    budget = f"max_new_tokens={args.max_new_tokens}"
    threads = [f"+pair.{role}.options.n_threads={args.threads}" for role in ("draft", "target")] if args.threads else []

    print(f"1. fit: {', '.join(FIT_SYSTEMS)} on {args.fit_prompts} HumanEval prompts (seed 1), pair {args.pair}")
    fit_runs = []
    for system in FIT_SYSTEMS:
        run = out / "fit" / system
        specwan("run", f"pair={args.pair}", f"system={system}", *COMMON, *threads, f"workload.size={args.fit_prompts}",
                "workload.seed=1", budget, f"hydra.run.dir={run}", log=log, reuse=run if args.reuse else None)
        fit_runs.append(str(run))
    specwan("fit-pair", *fit_runs, "--name", args.pair, "--out", str(ROOT / "conf" / "pair" / f"{fitted}.yaml"), log=log)

    print(f"2. validate: {args.system}, N = {args.ns}, {args.requests_per_edge} requests per edge, prompts seed 2")
    rows = []
    for n in args.ns:
        row = {"n": n}
        for label, pair in (("real", args.pair), ("fitted", fitted)):
            run = out / "validate" / f"{label}-n{n}"
            if label == "fitted" or not args.reuse:
                shutil.rmtree(run, ignore_errors=True)  # the fit may have changed: a run folder keeps one config
            specwan("run", f"pair={pair}", f"system={args.system}", *COMMON, *SLO, *(threads if label == "real" else []),
                    "edges=mixed", f"edges.n={n}",
                    f"edges.requests_per_edge={args.requests_per_edge}", "workload.seed=2", budget,
                    f"hydra.run.dir={run}", log=log, reuse=run if args.reuse and label == "real" else None)
            row[label] = figures(run)
        real, fit = row["real"], row["fitted"]
        row["tpt_error"] = fit["tpt_ms"] / real["tpt_ms"] - 1
        row["goodput_error"] = fit["goodput"] / real["goodput"] - 1 if real["goodput"] else None
        k = min(len(real["per_position"]), len(fit["per_position"]))
        row["per_position_error"] = [fit["per_position"][i] - real["per_position"][i] for i in range(k)]
        rows.append(row)

    print(f"\n{args.system} on edges=mixed, real {args.pair} vs {fitted} (modelled times; virtual clock)")
    print(f"{'N':>2} {'tpt real':>9} {'fitted':>8} {'err':>7} {'goodput real':>13} {'fitted':>8} {'err':>7}  "
          "per-position acceptance real / fitted (max |error|)")
    ok = True
    for r in rows:
        real, fit = r["real"], r["fitted"]
        worst = max((abs(e) for e in r["per_position_error"]), default=float("nan"))
        good = r["goodput_error"]
        ok &= abs(r["tpt_error"]) <= 0.10 and good is not None and abs(good) <= 0.10 and worst <= 0.03
        pos = " ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(real["per_position"], fit["per_position"]))
        print(f"{r['n']:>2} {real['tpt_ms']:>8.1f}ms {fit['tpt_ms']:>6.1f}ms {r['tpt_error']:>+6.1%} "
              f"{real['goodput']:>12.2f}/s {fit['goodput']:>6.2f}/s "
              f"{'' if good is None else f'{good:+.1%}':>7}  {pos} ({worst:.3f})")
    pooled = {label: pooled_positions([out / "validate" / f"{label}-n{r['n']}" for r in rows])
              for label in ("real", "fitted")}
    k = min(len(pooled["real"].per_position), len(pooled["fitted"].per_position))
    pooled_error = [pooled["fitted"].per_position[i] - pooled["real"].per_position[i] for i in range(k)]
    print("per-position acceptance pooled over every N: " + " ".join(
        f"{a:.3f}/{b:.3f}" for a, b in zip(pooled["real"].per_position, pooled["fitted"].per_position))
        + f" (windows judged at each position: {pooled['real'].per_position_n}; max |error| "
        f"{max(abs(e) for e in pooled_error):.3f})")
    print(f"within the bar (10% time per token and goodput, 0.03 per position) at every N: {'yes' if ok else 'no'}")
    (out / "validation.json").write_text(json.dumps({
        "pair": args.pair, "fitted": fitted, "system": args.system, "kind": "modelled", "rows": rows,
        "pooled": {label: st.as_dict() for label, st in pooled.items()}, "pooled_per_position_error": pooled_error},
        indent=1))
    print(f"written: {out / 'validation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
