"""How fast the fleet simulator runs: simulated output tokens per wall second, wall seconds and
peak memory for N edge devices over a span of virtual time, and where the time goes.

Each N runs as ``specwan run fleet=default ...`` in its own child process (the full path:
plan, engines, the fleet, the run folder), so its peak RSS is its own; the wall time is the
simulation's (the manifest's ``fleet.totals.wall_s``; loading and the final parquet files
are counted apart). Then one N runs again in this process under cProfile: the top functions
by own time, and the time by area (the runner in harness/, the plug-ins' policy code and
protocol in systems/, the engine, asyncio, numpy, writing records). Everything is written to
``results/fleet-speed-<pair>-<system>/`` (speed.json, profile.txt).

    python benchmarks/fleet_speed.py [--pair paper_pipesd] [--system sled] [--n 10,100,1000]
                                     [--duration 60] [--rate 0.05] [--verifiers 1] [--workers W]
                                     [--profile-n 100] [--repeat 1]

The load is the fleet default's: each device draws a laptop, phone or IoT board on a WAN, 4G
or LAN, and issues Poisson requests at ``--rate`` per second (64 new tokens each). The
issue's goal: 1,000 devices x 10 minutes of virtual time in <= 60 s on 2 cores. With
``--verifiers`` k > 1 the k islands run in the fleet's worker processes (``--workers``); peak
RSS is then the largest process's (each worker holds its islands' state).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AREAS = (("records (harness/fleet_writer, results)", ("harness/fleet_writer", "harness/results", "pyarrow", "json")),
         ("the runner (harness/)", ("harness/",)),
         ("engine (systems/engines/)", ("systems/engines/",)),
         ("plug-ins and protocol (systems/)", ("systems/",)),
         ("asyncio", ("asyncio/",)),
         ("numpy", ("numpy/",)))


def overrides(args, n: int, workers: int | None = None) -> list[str]:
    workers = args.workers if workers is None else workers
    out = [f"pair={args.pair}", f"system={args.system}", "fleet=default", f"fleet.n={n}",
           f"fleet.duration_s={args.duration}", f"fleet.arrivals=[{{kind: poisson, rate: {args.rate}}}]",
           f"max_new_tokens={args.tokens}", "workload.chat_template=false",
           f"fleet.verifiers={min(args.verifiers, n)}", f"fleet.workers={'null' if workers is None else workers}"]
    return out + (["fleet.rounds=false"] if not args.rounds else [])


def run_child(args, n: int, folder: Path) -> dict:
    """One N in a child process: its totals, simulation wall time and peak RSS."""
    cmd = [sys.executable, "-m", "harness.run", *overrides(args, n), f"hydra.run.dir={folder}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"fleet run N={n} failed ({proc.returncode}):\n{err[-2000:]}")
    totals = json.loads((folder / "manifest.json").read_text())["fleet"]["totals"]
    wall = totals["wall_s"]
    return {"n": n, "virtual_s": round(totals["virtual_s"], 1), "requests": totals["requests"],
            "output_tokens": totals["output_tokens"], "wall_s": wall, "process_s": round(total, 1),
            "tokens_per_wall_s": round(totals["output_tokens"] / wall), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "batches": sum(totals["batches_per_verifier"]), "workers": totals.get("workers", 1)}


def median_row(rows: list[dict]) -> dict:
    """One N's runs as one row: the median wall time (tokens per wall second from it) and peak
    RSS; every run's wall seconds under ``walls_s``. The simulation is deterministic, so the
    runs differ only in how fast the machine ran them."""
    wall = statistics.median(r["wall_s"] for r in rows)
    return {**rows[0], "wall_s": round(wall, 3), "tokens_per_wall_s": round(rows[0]["output_tokens"] / wall),
            "process_s": round(statistics.median(r["process_s"] for r in rows), 1),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rows), 1),
            "walls_s": [r["wall_s"] for r in rows]}


def profile(args, n: int, folder: Path) -> tuple[str, dict]:
    """One N in this process under cProfile: the report's text and the seconds per area."""
    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, execute

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=overrides(args, n, workers=1))  # the profile sees one process
    prof = cProfile.Profile()
    prof.enable()
    execute(cfg, folder)
    prof.disable()
    stats = pstats.Stats(prof)
    areas: Counter = Counter()
    for (path, _, _), (_, _, own, _, _) in stats.stats.items():
        path = path.replace(str(ROOT) + "/", "")
        area = next((name for name, keys in AREAS if any(k in path for k in keys)), "other (builtins, stdlib)")
        areas[area] += own
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(25)
    return buf.getvalue(), {k: round(v, 2) for k, v in areas.most_common()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="paper_pipesd", help="a fitted pair (cheap per token) or toy")
    p.add_argument("--system", default="sled")
    p.add_argument("--n", default="10,100,1000", help="numbers of edge devices (comma-separated)")
    p.add_argument("--duration", type=float, default=60.0, help="virtual seconds of arrivals")
    p.add_argument("--rate", type=float, default=0.05, help="requests per second per device (Poisson)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--rounds", action=argparse.BooleanOptionalAction, default=True, help="write per-round rows")
    p.add_argument("--verifiers", type=int, default=1, help="verifiers (each an island; at most N)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes for the islands (default: the fleet's, one per CPU)")
    p.add_argument("--profile-n", type=int, default=100, help="the N profiled in this process (0: none)")
    p.add_argument("--repeat", type=int, default=1, help="runs per N (the Ns interleaved); the medians are reported")
    p.add_argument("--out", default=None, help="folder for the figures (default results/fleet-speed-<pair>-<system>)")
    args = p.parse_args()
    out = Path(args.out or ROOT / "results" / f"fleet-speed-{args.pair}-{args.system}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"fleet speed: {args.system} on {args.pair}, {args.duration:g} s of virtual time, Poisson {args.rate}/s "
          f"per device, {args.tokens} tokens per request, {args.verifiers} verifier(s), {os.cpu_count()} CPU(s)")
    print(f"{'N':>6} {'requests':>9} {'tokens':>9} {'virtual s':>9} {'wall s':>7} {'tok/wall s':>10} "
          f"{'peak RSS MB':>11} {'workers':>7}")
    ns = [int(x) for x in args.n.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in ns}
    with tempfile.TemporaryDirectory(prefix="specwan-fleet-speed-") as tmp:
        for rep in range(args.repeat):  # the Ns in turn, then again: a noisy machine's drift hits each alike
            for n in ns:
                row = run_child(args, n, Path(tmp) / f"n{n}-{rep}")
                runs[n].append(row)
                print(f"{n:>6} {row['requests']:>9} {row['output_tokens']:>9} {row['virtual_s']:>9} "
                      f"{row['wall_s']:>7.1f} {row['tokens_per_wall_s']:>10} {row['peak_rss_mb']:>11} "
                      f"{row['workers']:>7}", flush=True)
        text, areas = profile(args, args.profile_n, Path(tmp) / "profiled") if args.profile_n else ("", {})
    for n in ns:
        rows.append(median_row(runs[n]))
    if args.repeat > 1:
        print(f"medians of {args.repeat} runs:")
        for row in rows:
            print(f"{row['n']:>6} {row['requests']:>9} {row['output_tokens']:>9} {row['virtual_s']:>9} "
                  f"{row['wall_s']:>7.1f} {row['tokens_per_wall_s']:>10} {row['peak_rss_mb']:>11} {row['workers']:>7}")
    big = max(rows, key=lambda r: r["n"])
    scale = 600.0 / args.duration
    print(f"goal: 1,000 devices x 10 min in <= 60 s; at N={big['n']} this rate gives "
          f"{big['wall_s'] * scale:.0f} s for 10 min of virtual time")
    if areas:
        total = sum(areas.values())
        print(f"where the time goes (N={args.profile_n}, cProfile, own time):")
        for name, sec in areas.items():
            print(f"  {100 * sec / total:5.1f}%  {name}")
    (out / "speed.json").write_text(json.dumps({"pair": args.pair, "system": args.system, "duration_s": args.duration,
                                                "verifiers": args.verifiers,
                                                "rate_per_device": args.rate, "tokens": args.tokens,
                                                "cpus": os.cpu_count(), "rows": rows, "profile_n": args.profile_n,
                                                "profile_areas_s": areas}, indent=2) + "\n")
    (out / "profile.txt").write_text(text)
    print(f"-> {out}/speed.json, profile.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
