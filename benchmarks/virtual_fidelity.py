"""Does virtual time predict wall time? Calibrate here, then run both clocks and compare.

1. Calibrate the pair's engines the way wall mode runs them: one thread each, each pinned
   to its own core (the draft on the edge's core, the target on the cloud's).
2. Run each system in wall mode (separate processes over loopback gRPC, or over the
   emulated link of ``--network``) and in virtual time with the measured profiles and the
   same network profile's link model, on the same prompts.
3. Report time per output token from both and their ratio (virtual / wall), and where the
   time goes (model work recorded by the rounds, and the rest).

    python benchmarks/virtual_fidelity.py [--pair qwen25coder] [--prompts 2] [--max-new-tokens 32]
    python benchmarks/virtual_fidelity.py --network pipesd_s1 --workload humaneval \
        --systems vanilla,pipesd --params '{"vanilla": {"gamma": 6, "uplink_q": "full", "q_dtype": "float16"}}'

All figures are measured on this machine; it is shared and noisy, so repeat and compare
medians before drawing conclusions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics

from harness.calibrate import fit, measure_role
from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from harness.pairs import ensure_pair, load_pair, open_engines
from harness.run import conf_option, network_spec
from harness.wall import cpu_plan, run_wall
from netem.backends import open_link
from systems.api import GenerationRequest
from systems.sampling import SamplingParams
from workloads.smoke import SMOKE_PROMPTS


def _pinned(cpus, fn):
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        return fn()
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        return fn()
    finally:
        os.sched_setaffinity(0, before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="qwen25coder")
    ap.add_argument("--systems", default="vanilla,cloud_only")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--network", default="loopback", help="a conf/network profile (wall: its emulated link)")
    ap.add_argument("--workload", default=None, help="a conf/workload (default: the smoke prompts)")
    ap.add_argument("--params", default="{}", help="JSON: system name -> its parameters")
    args = ap.parse_args()
    params = json.loads(args.params)

    pair = load_pair(args.pair)
    for spec in pair.roles().values():
        if spec.engine == "llamacpp":
            spec.options["n_threads"] = 1
    paths = ensure_pair(pair)
    cloud_cpus, edge_cpus = cpu_plan(1)
    draft, target = open_engines(pair, paths)
    edge = _pinned(edge_cpus[0], lambda: fit("edge", measure_role(draft, "edge", args.repeats), "edge", "measured"))
    cloud = _pinned(cloud_cpus, lambda: fit("cloud", measure_role(target, "cloud", args.repeats), "cloud", "measured"))
    print(f"calibrated (1 thread, pinned): edge {edge}\n  cloud {cloud}")

    if args.workload:
        from workloads import load_workload, workload_spec

        wl = load_workload(workload_spec({**conf_option("workload", args.workload), "size": args.prompts}),
                           args.max_new_tokens, progress=False)
        requests = [t.request for t in wl.first_turns(target)]
    else:
        requests = []
        for i, p in enumerate(SMOKE_PROMPTS[: args.prompts]):
            text = target.apply_chat_template([{"role": "user", "content": p["turns"][0]}])
            requests.append(GenerationRequest(p["id"], target.tokenize(text), args.max_new_tokens, SamplingParams(),
                                              seed=i))
    network = network_spec(conf_option("network", args.network))
    model = LinkProfile.from_network(network)

    print(f"{'system':12s} {'wall ms/tok':>12s} {'virtual ms/tok':>15s} {'virtual/wall':>13s}  tokens identical")
    parts = []
    for system in args.systems.split(","):
        config = params.get(system, {})
        with contextlib.ExitStack() as stack:
            link = None if not network.shaped else stack.enter_context(open_link(network))
            wall = run_wall(system, pair, requests, config, link=link)
        virtual = run_system(system, draft, target, requests, config, options=RunOptions(
            virtual=True, link=model, edge_cost=edge.cost, cloud_cost=cloud.cost))
        w = statistics.median(r.e2e / r.n_tokens for r in wall)
        v = statistics.median(r.e2e / r.n_tokens for r in virtual)
        same = sum(a.output_tokens == b.output_tokens for a, b in zip(wall, virtual))
        print(f"{system:12s} {1e3 * w:12.1f} {1e3 * v:15.1f} {v / w:13.2f}  {same}/{len(requests)}")
        parts.append((system, _split(wall), _split(virtual)))
    # Where the time goes, per output token: the model work the rounds record (edge drafting,
    # cloud verification or decoding) and the rest (prefill, link, waits, harness).
    print(f"\nper token (ms)  {'draft':>14s} {'verify/decode':>16s} {'rest':>14s}   (wall / virtual)")
    for system, (wd, wv, wr), (vd, vv, vr) in parts:
        print(f"{system:12s} {1e3 * wd:7.1f}/{1e3 * vd:<6.1f} {1e3 * wv:8.1f}/{1e3 * vv:<7.1f} {1e3 * wr:7.1f}/{1e3 * vr:<6.1f}")


def _split(records) -> tuple[float, float, float]:
    """Seconds per output token: drafting, verification/decoding, and everything else."""
    tokens = sum(r.n_tokens for r in records)
    draft = sum(x.t_draft for r in records for x in r.rounds)
    verify = sum(x.t_verify or 0.0 for r in records for x in r.rounds)
    total = sum(r.e2e for r in records)
    return draft / tokens, verify / tokens, (total - draft - verify) / tokens


if __name__ == "__main__":
    main()
