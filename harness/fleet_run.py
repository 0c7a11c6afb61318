"""A fleet run through ``specwan run``: the plan's fleet simulated, its records streamed to the
run folder (the files every run writes: manifest, requests, rounds, batches), and a summary.

:func:`execute_fleet` is what :func:`harness.run.execute` calls when the config selects the
fleet (``fleet=default`` or an experiment's ``fleet.*``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.fleet import FleetOptions, run_fleet
from harness.fleet_plan import describe_fleet
from harness.run import (
    EDGE_COLUMNS,
    NotRunnable,
    Plan,
    build_workload,
    energy_plan,
    fit_context,
    link_manifest,
    shared_engines,
)
from harness.edges import slo_met

#: per-request columns of a fleet run: the multi-edge ones and the verifier that served it
FLEET_COLUMNS = {**EDGE_COLUMNS, "verifier": "int64"}
PROGRESS_EVERY_S = 10.0
#: engines a forked worker may share: pure Python and numpy, no threads of their own
FORK_SAFE_BACKENDS = ("fitted", "toy")


def fleet_workers(fleet, engines) -> int:
    """The processes the fleet's verifiers are spread over: ``fleet.workers``, else one per CPU
    this process may use, at most one per verifier. A real model's engine keeps threads that a
    forked process cannot share safely, so with one the fleet runs in this process (said once)."""
    from harness.sysinfo import usable_cpus

    wanted = fleet.workers if fleet.workers is not None else usable_cpus()
    workers = max(1, min(wanted, fleet.verifiers))
    real = sorted({e.info.backend for e in engines if e is not None} - set(FORK_SAFE_BACKENDS))
    if workers > 1 and real:
        if fleet.workers is not None:
            print(f"specwan: fleet.workers={fleet.workers} ignored: the {', '.join(real)} engine(s) cannot be "
                  "shared with forked workers, so the fleet runs in this process (a fitted pair can)", file=sys.stderr)
        return 1
    return workers


def fleet_row(plan: Plan, item, record) -> dict:
    """A fleet request's edge, verifier, arrival, SLO and verdict (its row's context)."""
    e, req = item.edge, item.request
    return {"edge": e.name, "edge_device": e.device.name, "edge_network": e.network, "n_edges": plan.fleet.n,
            "verifier": e.verifier, "arrival": req.arrival, "slo_ttft_s": req.slo_ttft_s,
            "slo_tpot_s": req.slo_tpot_s,
            "slo_met": slo_met(record.ttft, record.tpot, req.slo_ttft_s, req.slo_tpot_s)}


def execute_fleet(cfg: DictConfig, plan: Plan, run_dir: str | Path | None):
    """Simulate the plan's fleet; returns its :class:`harness.fleet.FleetTotals` (records go
    to ``run_dir`` as they happen, none are kept)."""
    from harness.contention import check_before_run, planned_threads
    from harness.energy.virtual import VirtualEnergy
    from harness.fleet_writer import FleetWriter, restart
    from harness.inprocess import check_engines
    from harness.pairs import ensure_pair
    from harness.results import build_manifest

    fleet = plan.fleet
    paths = ensure_pair(plan.pair)
    draft, target = shared_engines(plan.pair, paths, memo=False)
    try:
        check_engines(plan.system, plan.system_config, draft, target)
    except ValueError as exc:
        raise NotRunnable(str(exc)) from exc
    _, turns = build_workload(cfg, target)
    turns, too_long = fit_context(turns, [e for e in (draft, target) if e is not None])
    context = {"system": plan.system.name, "pair": plan.pair.name, "network": plan.link.name,
               "workload": str(cfg.workload.name), "clock": "virtual", "seed": int(cfg.seed)}
    energy, energy_manifest = energy_plan(plan)
    by_option: dict[str, VirtualEnergy | None] = {}
    for e in fleet.edges:
        if e.device_option and e.device_option not in by_option:
            by_option[e.device_option] = VirtualEnergy.from_profiles(e.device, plan.cloud, plan.energy.mode)
    edge_energy = [by_option.get(e.device_option) for e in fleet.edges]
    writer = None
    if run_dir is not None:
        if restart(run_dir):
            print(f"specwan: {run_dir} held an unfinished fleet run: its records are cleared and the fleet runs "
                  "again from virtual time 0 (its edges share one time, so it cannot resume)", file=sys.stderr)
        config = OmegaConf.to_container(cfg, resolve=True)
        devices = {e.device_option: e.device.as_dict() for e in fleet.edges if e.device_option}
        profiles = {"edge": plan.edge.as_dict(), "cloud": plan.cloud.as_dict(), "fleet_edges": devices}
        manifest = build_manifest(config, {"clock": "virtual", "device_profiles": profiles,
                                           "link": link_manifest(plan, None, None), "energy": energy_manifest,
                                           "contention": check_before_run(planned_threads(plan.pair))}, models=paths)
        writer = FleetWriter(run_dir, manifest, extra_context=FLEET_COLUMNS, rounds=fleet.rounds)
        writer.update_manifest({"fleet": fleet.describe()})
        if too_long:
            writer.update_manifest({"left_out_requests": too_long})
    turn_context = [t.context() for t in turns]
    shown = [time.monotonic()]

    def finished(rec, item) -> None:
        if writer is not None:
            writer.append(rec, {**context, **turn_context[item.template], **fleet_row(plan, item, rec)},
                          energy=rec.energy)
        if time.monotonic() - shown[0] > PROGRESS_EVERY_S:
            shown[0] = time.monotonic()
            print(f"specwan: fleet at {rec.end:.1f} s of virtual time on verifier {item.edge.verifier} "
                  f"({fleet.duration_s:g} s of arrivals)", file=sys.stderr, flush=True)

    def batch(rec, verifier: int) -> None:
        if writer is not None:
            writer.append_batch(rec, {"system": plan.system.name, "network": plan.link.name, "verifier": verifier})

    workers = fleet_workers(fleet, (draft, target))
    options = FleetOptions(cloud_cost=plan.cloud.cost, energy=energy, edge_energy=edge_energy,
                           on_request=finished, on_batch=batch, workers=workers)
    wall = time.perf_counter()
    try:
        totals = run_fleet(plan.system, plan.system_config, draft, target, fleet, [t.request for t in turns], options)
        wall = time.perf_counter() - wall
        if writer is not None:
            writer.update_manifest({"fleet": {"totals": {
                "requests": totals.requests, "output_tokens": totals.tokens, "rounds": totals.rounds,
                "batches_per_verifier": totals.batches, "virtual_s": totals.virtual_s,
                "dropped_replies": totals.dropped_replies, "wall_s": round(wall, 3), "workers": workers}}})
            writer.mark_complete()
    finally:
        if writer is not None:
            writer.close()
    where = f" -> {run_dir}" if run_dir is not None else ""
    print(f"{plan.system.name}: {describe_fleet(fleet)}; cloud {plan.cloud.name} [{plan.cloud.kind}]: "
          f"{totals.requests} requests, {totals.tokens} tokens in {totals.virtual_s:.1f} s of virtual time "
          f"(modelled), simulated in {wall:.1f} s ({totals.tokens / max(wall, 1e-9):.0f} tokens per wall second"
          f"{f', {workers} workers' if workers > 1 else ''})"
          f"{where}")
    return totals
