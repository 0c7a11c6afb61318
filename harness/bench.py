"""``specwan bench`` (= ``make bench``): every system, a few networks, one pair, virtual time.

The prompts are a workload (``--workload``, default ``mixed``: a seeded few of every
category); besides the table per system and network, a second table (and
``summary_by_category.csv``) gives time per token, speedup and acceptance per category.

The real engines compute the real tokens; time comes from the device profile (edge and
cloud) and the link model, so the figures answer "what would this pair of devices joined by
this network do", not "how fast is this machine". Forward passes are memoized by prefix:
with greedy decoding the tokens do not depend on the network, so every network after the
first replays model calls instead of recomputing them.

Writes one run folder (manifest.json, requests.parquet, rounds.parquet, summary.csv,
comparison.png, energy.png) and prints the summary table. Energy is modelled from the
device profiles' power (busy and idle time on the virtual clock x ``active_w`` / ``idle_w``)
and labelled "estimated" in every column name and plot title.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from harness.energy.report import ROLES, joules_per_token
from harness.energy.virtual import VirtualEnergy
from harness.inprocess import RunOptions, run_system
from harness.memo import MemoEngine
from harness.pairs import DEFAULT_PAIR, ensure_pair, load_pair, open_engines
from harness.profiles import role_profile
from harness.run import conf_option, network_profile
from systems.api import get_system, system_names
from systems.sampling import SamplingParams
from workloads.workload import describe

DEFAULT_NETWORKS = "lan,pipesd_s1,wan_50ms_10mbit,slow_wan"
DEFAULT_WORKLOAD = "mixed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR, help=f"pair name or YAML file (default: {DEFAULT_PAIR})")
    p.add_argument("--systems", default=None, help="comma-separated systems (default: every registered one)")
    p.add_argument("--networks", default=DEFAULT_NETWORKS, help=f"comma-separated profiles (default: {DEFAULT_NETWORKS})")
    p.add_argument("--device", default="laptop_gpu_cloud", help="device profile in conf/device")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--workload", default=DEFAULT_WORKLOAD,
                   help=f"a workload in conf/workload or a JSON Lines prompt file (default: {DEFAULT_WORKLOAD})")
    p.add_argument("--prompts", type=int, default=None,
                   help="at most this many prompts of the workload (a seeded sample; default: all)")
    p.add_argument("--out", default="results", help="parent folder of the run folder")
    p.add_argument("--energy", default="auto", choices=("auto", "estimate", "none"),
                   help="energy per role (default auto; in virtual time: the device profiles' power x busy/idle "
                        "time, labelled estimated)")




def run(args: argparse.Namespace) -> int:
    from harness.contention import check_before_run, planned_threads
    from harness.results import RunWriter, build_manifest

    names = args.systems.split(",") if args.systems else system_names()
    for name in names:
        get_system(name)  # unknown names fail here, listing the valid ones, before models load
    links = [network_profile(conf_option("network", n)) for n in args.networks.split(",")]
    device = conf_option("device", args.device)
    edge, cloud = role_profile(device["edge"]), role_profile(device["cloud"])
    workload = _load_workload(args)  # prompt sets are fetched before the models load
    energy = VirtualEnergy.from_profiles(edge, cloud, args.energy)
    pair = load_pair(args.pair)
    paths = ensure_pair(pair)
    t0 = time.perf_counter()
    draft, target = open_engines(pair, paths)
    print(f"pair {pair.name}: draft {draft.info.model}, target {target.info.model} "
          f"(loaded in {time.perf_counter() - t0:.1f} s); devices: edge {edge.name} [{edge.kind}], "
          f"cloud {cloud.name} [{cloud.kind}]")
    if workload.spec.chat_template and not _has_chat_template(target):
        workload.spec = workload.spec.with_(chat_template=False)
        print(f"workload {workload.spec.name}: {target.info.model} has no chat template; prompts go as raw text")
    turns = workload.first_turns(target)
    print(describe(workload))
    names = _runnable(names, args.systems is not None, draft, target, edge)
    mdraft, mtarget = MemoEngine(draft), MemoEngine(target)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) / f"{stamp}-bench"
    config = {"pair": pair.name, "systems": names, "networks": [lk.name for lk in links], "device": args.device,
              "max_new_tokens": args.max_new_tokens, "workload": workload.spec.name, "prompts": [p.id for p in workload.prompts], "temperature": 0.0,
              "energy": args.energy}
    contention = check_before_run(planned_threads(pair))
    manifest = build_manifest(config, {"clock": "virtual", "device_profiles": {"edge": edge.as_dict(),
                              "cloud": cloud.as_dict()}, "link": {"backend": "model (in-process)"},
                              "energy": energy.describe(), "contention": contention}, models=paths)
    from harness.run import system_report

    rows, category_rows, sweep_seconds, reports = [], [], [], {}
    # one bar over every request of the sweep (a later turn of a conversation joins the total
    # when its answer is known), named by the system and network being served, with an ETA
    bar = tqdm(total=len(links) * len(names) * len(turns), unit="request", dynamic_ncols=True)
    with RunWriter(run_dir, manifest) as writer, bar:
        for link in links:
            t_net = time.perf_counter()
            for name in names:
                bar.set_description(f"{name} on {link.name}")
                records, served = _serve(name, mdraft, mtarget, workload, turns, RunOptions(
                    virtual=True, link=link, edge_cost=edge.cost, cloud_cost=cloud.cost, energy=energy,
                    on_request=lambda _record: bar.update(1)), more=_grow(bar))
                for turn, rec in zip(served, records):
                    writer.append(rec, {"system": name, "pair": pair.name, "network": link.name, "workload": workload.spec.name,
                                        **turn.context(), "clock": "virtual",
                                        "seed": 0}, energy=rec.energy)
                rows.append(_summarise(name, link.name, records))
                category_rows += _by_category(name, link.name, served, records)
                if (rep := system_report(get_system(name), records)) is not None:
                    reports[f"{name} on {link.name}"] = rep
            sweep_seconds.append(time.perf_counter() - t_net)
        if reports:
            writer.update_manifest({"system_reports": reports})
    _add_speedups(rows)
    energy_notes = _energy_columns(rows, energy)
    _print_table(rows, pair.name, energy_notes)
    for where, rep in reports.items():  # a system's own model beside its measurement
        print(f"{where}: {rep['summary']}")
    _add_speedups(category_rows, by=("network", "category"))
    _print_categories(category_rows, workload.spec.name)
    first, rest = sweep_seconds[0], sweep_seconds[1:]
    if rest:
        print(f"sweep: first network {first:.1f} s (model calls), each later one {sum(rest) / len(rest):.2f} s "
              f"(replayed: {mdraft.hits + mtarget.hits} calls from memory, {mdraft.misses + mtarget.misses} computed); "
              f"{len(links)} networks cost {sum(sweep_seconds) / (first * len(links)):.2f}x of {len(links)} independent runs")
    _write_summary(run_dir, rows)
    _write_category_summary(run_dir, category_rows)
    print(f"run folder: {run_dir}")
    return 0


def _runnable(names, named: bool, draft, target, edge) -> list[str]:
    """The systems that can run on this pair and edge profile. When every system was asked
    for, the others are left out with the reason; a system named on the command line is refused."""
    from harness.cli import UsageError
    from harness.inprocess import check_engines
    from harness.profiles import require_target_costs

    keep = []
    for name in names:
        spec = get_system(name)
        try:
            check_engines(spec, spec.make_config(), draft, target)
            if spec.edge_model == "target":
                require_target_costs(edge, name)
        except ValueError as exc:
            if named:
                raise UsageError(str(exc)) from exc
            print(f"left out {name}: {exc}")
            continue
        keep.append(name)
    return keep


def _load_workload(args: argparse.Namespace):
    """The workload named by ``--workload`` (a conf/workload name or a .jsonl file), sampled to ``--prompts``."""
    from workloads import WorkloadError, load_workload, workload_spec

    given = Path(args.workload).expanduser()
    if args.workload.endswith((".jsonl", ".json")) or given.is_file():
        spec = workload_spec({"name": given.stem, "set": "file", "path": str(given)})
    else:
        try:
            config = conf_option("workload", args.workload)
        except ValueError as e:
            raise WorkloadError(f"{e} (or give a JSON Lines prompt file)") from None
        spec = workload_spec(config)
    if args.prompts is not None:
        spec = spec.with_(size=args.prompts)
    return load_workload(spec, args.max_new_tokens, SamplingParams())


def _has_chat_template(engine) -> bool:
    from systems.engines import EngineError

    try:
        engine.apply_chat_template([{"role": "user", "content": "hello"}])
    except EngineError:
        return False
    return True


def _serve(name, draft, target, workload, turns, options, more=None):
    """Serve the first turns together, then each later turn built from this system's own answers.

    Returns the records and the turn each one served, in order. ``more(n)`` is told of each
    batch of later turns before they are served.
    """
    records, served, pending = [], [], list(turns)
    while pending:
        done = run_system(name, draft, target, [t.request for t in pending], options=options)
        records += done
        served += pending
        pending = [nxt for t, rec in zip(pending, done)
                   if (nxt := workload.next_turn(t, rec.output_tokens, target)) is not None]
        if pending and more is not None:
            more(len(pending))
    return records, served


def _grow(bar):
    """A callback adding ``n`` requests to a progress bar's total."""
    def more(n: int) -> None:
        bar.total += n
        bar.refresh()
    return more


CATEGORY_COLUMNS = ("category", "system", "network", "requests", "tokens", "ms_per_token", "speedup_vs_cloud_only",
                    "acceptance")


def _by_category(name, network, served, records) -> list[dict]:
    """One summary row per prompt category (in workload order)."""
    groups: dict[str, list] = {}
    for turn, rec in zip(served, records):
        groups.setdefault(turn.category, []).append(rec)
    out = []
    for category, recs in groups.items():
        row = _summarise(name, network, recs)
        row.pop("_energy", None)
        out.append({"category": category, "requests": len(recs), **row,
                    "_accepted": sum(r.accepted for r in recs),
                    "_verified": sum(sum(x.verified for x in r.rounds) for r in recs)})
    return out


def _print_categories(rows, workload: str) -> None:
    """Per category and system: acceptance (pooled over the networks) and the speedup on each network."""
    networks = list(dict.fromkeys(r["network"] for r in rows))
    table: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["system"] == "cloud_only":
            continue  # the baseline: speedup 1, nothing verified
        t = table.setdefault((r["category"], r["system"]), {"category": r["category"], "system": r["system"],
                                                            "requests": r["requests"], "_acc": [0, 0]})
        t["_acc"][0] += r["_accepted"]
        t["_acc"][1] += r["_verified"]
        t[f"speedup@{r['network']}"] = r["speedup_vs_cloud_only"]
    out = []
    for t in table.values():
        accepted, verified = t.pop("_acc")
        out.append({**{k: t[k] for k in ("category", "system", "requests")},
                    "acceptance": accepted / verified if verified else None,
                    **{f"speedup@{n}": t.get(f"speedup@{n}") for n in networks}})
    if not out:
        return
    cells = [["n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)) for v in r.values()]
             for r in out]
    cols = list(out[0])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\nper category (workload {workload}; speedup over cloud_only on each network, "
          "acceptance pooled over the networks):")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _write_category_summary(run_dir: Path, rows) -> None:
    import pandas as pd

    pd.DataFrame([{k: r[k] for k in CATEGORY_COLUMNS} for r in rows]).to_csv(
        run_dir / "summary_by_category.csv", index=False)


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
        "_energy": {role: joules_per_token(records, role) for role in ROLES},
    }


def _energy_columns(rows, energy: VirtualEnergy) -> list[str]:
    """J/token per role, one column per (role, kind): measured and estimated never share one.

    Returns the table's footnotes (what each kind is, why a figure is missing).
    """
    notes: list[str] = []
    for role in ROLES:
        kinds = sorted({r["_energy"][role][1] for r in rows if r["_energy"][role][0] is not None})
        for kind in kinds or [None]:
            col = f"{role}_J_per_token_{kind}" if kind else f"{role}_J_per_token"
            for r in rows:
                value, k, _ = r["_energy"][role]
                r[col] = value if k == kind else None
        reasons = sorted({r["_energy"][role][2] for r in rows if r["_energy"][role][0] is None} - {None})
        if reasons:
            notes.append(f"{role} J/token n/a where: {'; '.join(reasons)}")
    for r in rows:
        del r["_energy"]
    described = energy.describe()
    for role in ROLES:
        d = described[role]
        if d["kind"] == "estimated":
            c = d["constants"]
            notes.append(f"{role} energy: estimated = modelled device {c['device']} at {c['active_w']:g} W busy, "
                         f"{c['idle_w']:g} W idle x its virtual busy/idle time (not measured)")
    return notes


def _add_speedups(rows, by=("network",)) -> None:
    base = {tuple(r[k] for k in by): r["ms_per_token"] for r in rows if r["system"] == "cloud_only"}
    for r in rows:
        b = base.get(tuple(r[k] for k in by))
        if b and r["ms_per_token"]:
            r["speedup_vs_cloud_only"] = b / r["ms_per_token"]


def _print_table(rows, pair: str, notes: list[str] = ()) -> None:
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
    for note in notes:
        print(note)


def _write_summary(run_dir: Path, rows) -> None:
    import pandas as pd

    from analysis.plots import plot_energy_per_token, plot_time_per_token

    summary = pd.DataFrame(rows)
    summary.to_csv(run_dir / "summary.csv", index=False)
    plot_time_per_token(summary, run_dir / "comparison.png")
    plot_energy_per_token(summary, run_dir / "energy.png")
