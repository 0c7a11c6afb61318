"""``specwan tune system=pipesd ...``: offline tuning of a system's thresholds (r1, r2).

Composes the run configuration from the same Hydra overrides as ``specwan run``, then
searches (r1, r2) in (0, 1)² with the chosen method (``bo``: Gaussian process + expected
improvement, ``grid``: 4 x 4, ``random``: uniform points), scoring each candidate by the
time per accepted token of a virtual-time run that yields ``--tokens`` accepted tokens on
each of the workload's last ``--prompts`` prompts (PipeSD §3.3: 16 evaluations of 20
accepted tokens, on one prompt by default). Prints every trial and the overrides to run
with the best pair.
"""

from __future__ import annotations

import argparse
import dataclasses

from harness.run import CONF_DIR, ConfigError, build_workload, make_plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides as for `specwan run` (system=pipesd network=...)")
    p.add_argument("--method", default="bo", choices=("bo", "grid", "random"))
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--tokens", type=int, default=20, help="accepted tokens per evaluation")
    p.add_argument("--prompts", type=int, default=1, help="held-out prompts each candidate is scored on "
                   "(the workload's last ones)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from hydra import compose, initialize_config_dir

    from harness.grid import tune_thresholds
    from harness.inprocess import RunOptions
    from harness.pairs import ensure_pair, open_engines

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=list(args.overrides))
    plan = make_plan(cfg)
    names = {f.name for f in dataclasses.fields(plan.system_config)}
    if not {"r1", "r2"} <= names:
        raise ConfigError(f"system {plan.system.name} has no thresholds r1/r2 to tune (systems with them: pipesd)")
    paths = ensure_pair(plan.pair)
    draft, target = open_engines(plan.pair, paths)
    _, turns = build_workload(cfg, target)
    if not 1 <= args.prompts <= len(turns):
        raise ConfigError(f"--prompts must be between 1 and the workload's {len(turns)} prompts, got {args.prompts}")
    options = RunOptions(virtual=True, link=plan.link, edge_cost=plan.edge.cost, cloud_cost=plan.cloud.cost)
    params = {k: v for k, v in dataclasses.asdict(plan.system_config).items() if k not in ("r1", "r2")}

    def progress(i, r1, r2, tpt):
        print(f"trial {i:2d}/{args.trials}: r1={r1:.4f} r2={r2:.4f}  TPT {1e3 * tpt:.1f} ms (modelled)", flush=True)

    requests = [t.request for t in turns[len(turns) - args.prompts:]]
    best = tune_thresholds(plan.system.name, params, draft, target, requests, options, method=args.method,
                           trials=args.trials, tokens=args.tokens, seed=args.seed, progress=progress)
    print(f"best ({args.method}, {len(best.trials)} evaluations of {args.tokens} accepted tokens x "
          f"{args.prompts} prompt(s) on {plan.link.name} / {plan.edge.name}): TPT {1e3 * best.tpt:.1f} ms")
    print(f"run with: system={plan.system.name} system.params.r1={best.r1:.4f} system.params.r2={best.r2:.4f}")
    return 0
