"""``specwan bench`` (= ``make bench``): every system, a few networks, one pair, virtual time.

The real engines compute the real tokens; time comes from the device profile (edge and
cloud) and the link model, so the figures answer "what would this pair of devices joined by
this network do", not "how fast is this machine". Forward passes are memoized by prefix:
with greedy decoding the tokens do not depend on the network, so every network after the
first replays model calls instead of recomputing them.

Writes one run folder (manifest.json, requests.parquet, rounds.parquet, summary.csv,
comparison.png) and prints the summary table.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from harness.inprocess import RunOptions, run_system
from harness.memo import MemoEngine
from harness.pairs import DEFAULT_PAIR, ensure_pair, load_pair, open_engines
from harness.profiles import role_profile
from harness.run import CONF_DIR, network_profile
from systems.api import GenerationRequest, get_system, system_names
from systems.sampling import SamplingParams
from workloads.smoke import SMOKE_PROMPTS

DEFAULT_NETWORKS = "lan,pipesd_s1,wan_50ms_10mbit,slow_wan"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR, help=f"pair name or YAML file (default: {DEFAULT_PAIR})")
    p.add_argument("--systems", default=None, help="comma-separated systems (default: every registered one)")
    p.add_argument("--networks", default=DEFAULT_NETWORKS, help=f"comma-separated profiles (default: {DEFAULT_NETWORKS})")
    p.add_argument("--device", default="laptop_gpu_cloud", help="device profile in conf/device")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=len(SMOKE_PROMPTS), help="how many of the smoke prompts")
    p.add_argument("--out", default="results", help="parent folder of the run folder")


def _conf(group: str, name: str) -> dict:
    path = Path(CONF_DIR) / group / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown {group} {name!r}; valid: {', '.join(options)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def run(args: argparse.Namespace) -> int:
    from harness.results import RunWriter, build_manifest

    names = args.systems.split(",") if args.systems else system_names()
    for name in names:
        get_system(name)  # unknown names fail here, listing the valid ones, before models load
    links = [network_profile(_conf("network", n)) for n in args.networks.split(",")]
    device = _conf("device", args.device)
    edge, cloud = role_profile(device["edge"]), role_profile(device["cloud"])
    pair = load_pair(args.pair)
    paths = ensure_pair(pair)
    t0 = time.perf_counter()
    draft, target = open_engines(pair, paths)
    print(f"pair {pair.name}: draft {draft.info.model}, target {target.info.model} "
          f"(loaded in {time.perf_counter() - t0:.1f} s); devices: edge {edge.name} [{edge.kind}], "
          f"cloud {cloud.name} [{cloud.kind}]")
    prompts = SMOKE_PROMPTS[: args.prompts]
    requests = [GenerationRequest(p["id"], _render(target, p), args.max_new_tokens, SamplingParams(), seed=i)
                for i, p in enumerate(prompts)]
    mdraft, mtarget = MemoEngine(draft), MemoEngine(target)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) / f"{stamp}-bench"
    config = {"pair": pair.name, "systems": names, "networks": [lk.name for lk in links], "device": args.device,
              "max_new_tokens": args.max_new_tokens, "prompts": [p["id"] for p in prompts], "temperature": 0.0}
    manifest = build_manifest(config, {"clock": "virtual", "device_profiles": {"edge": edge.as_dict(),
                              "cloud": cloud.as_dict()}, "link": {"backend": "model (in-process)"}}, models=paths)
    rows, sweep_seconds = [], []
    with RunWriter(run_dir, manifest) as writer:
        for link in tqdm(links, desc="networks", unit="network"):
            t_net = time.perf_counter()
            for name in names:
                records = run_system(name, mdraft, mtarget, requests, options=RunOptions(
                    virtual=True, link=link, edge_cost=edge.cost, cloud_cost=cloud.cost))
                for p, rec in zip(prompts, records):
                    writer.append(rec, {"system": name, "pair": pair.name, "network": link.name, "workload": "smoke",
                                        "prompt_id": p["id"], "category": p["category"], "clock": "virtual",
                                        "seed": 0})
                rows.append(_summarise(name, link.name, records))
            sweep_seconds.append(time.perf_counter() - t_net)
    _add_speedups(rows)
    _print_table(rows, pair.name)
    first, rest = sweep_seconds[0], sweep_seconds[1:]
    if rest:
        print(f"sweep: first network {first:.1f} s (model calls), each later one {sum(rest) / len(rest):.2f} s "
              f"(replayed: {mdraft.hits + mtarget.hits} calls from memory, {mdraft.misses + mtarget.misses} computed); "
              f"{len(links)} networks cost {sum(sweep_seconds) / (first * len(links)):.2f}x of {len(links)} independent runs")
    _write_summary(run_dir, rows)
    print(f"run folder: {run_dir}")
    return 0


def _render(engine, prompt: dict) -> list[int]:
    try:
        text = engine.apply_chat_template([{"role": "user", "content": prompt["turns"][0]}])
    except Exception:  # an engine without a template gets the raw text
        text = prompt["turns"][0]
    return engine.tokenize(text)


def _summarise(name, network, records) -> dict:
    tokens = sum(r.n_tokens for r in records)
    seconds = sum(r.e2e for r in records)
    verified = sum(sum(x.verified for x in r.rounds) for r in records)
    accepted = sum(r.accepted for r in records)
    return {
        "system": name,
        "network": network,
        "tokens": tokens,
        "ms_per_token": 1e3 * seconds / tokens if tokens else None,
        "speedup_vs_cloud_only": None,
        "acceptance": accepted / verified if verified else None,
        "bytes_up_per_token": sum(r.bytes_up for r in records) / tokens if tokens else None,
        "bytes_down_per_token": sum(r.bytes_down for r in records) / tokens if tokens else None,
    }


def _add_speedups(rows) -> None:
    base = {r["network"]: r["ms_per_token"] for r in rows if r["system"] == "cloud_only"}
    for r in rows:
        b = base.get(r["network"])
        if b and r["ms_per_token"]:
            r["speedup_vs_cloud_only"] = b / r["ms_per_token"]


def _print_table(rows, pair: str) -> None:
    cols = list(rows[0])

    def fmt(v):
        return "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    print(f"times: modelled (virtual clock: device profiles + link model); tokens and acceptance: "
          f"measured with pair {pair}; bytes: real message encodings")


def _write_summary(run_dir: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(run_dir / "summary.csv", index=False)
    pivot = df.pivot(index="network", columns="system", values="ms_per_token").reindex(
        list(dict.fromkeys(df["network"])))
    ax = pivot.plot(kind="bar", figsize=(8, 4.5), rot=0)
    ax.set_ylabel("time per output token, ms (modelled)")
    ax.set_xlabel("network profile")
    ax.set_title("SpecWAN: time per token by system and network (virtual time)")
    plt.tight_layout()
    plt.savefig(run_dir / "comparison.png", dpi=120)
    plt.close()
