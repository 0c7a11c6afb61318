"""The Hydra entry point: ``specwan run key=value ...`` (= ``python -m harness.run ...``).

Composes ``conf/config.yaml`` with its groups (system, pair, network, device, workload),
checks every choice before any model loads, runs the workload, and prints a summary.
Multirun (``-m system=vanilla,cloud_only network=lan,slow_wan``) runs one job per
combination; ``hydra/launcher=joblib`` (or ``ray``) runs them in parallel worker processes.
``experiment=bench`` is ``make bench``: a multirun of every system over four networks.

Each job writes its run folder as requests finish and marks it complete at the end; rerun
into the same folder, a complete run is skipped and an unfinished one resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from harness.edges import EdgesError, EdgesPlan, edges_plan, slo_met
from harness.energy.select import EnergyConfig, energy_config
from harness.faults import (
    LINK_FAULTS,
    PROCESS_FAULTS,
    FaultError,
    WallOptions,
    liveness_timeout,
    parse_faults,
    wall_options,
    with_link_faults,
)
from harness.link import LinkProfile
from harness.profiles import RoleProfile, require_target_costs, role_profile
from netem.profile import NetworkProfile, ProfileError, parse_profile
from systems.api import SystemSpec, get_system
from systems.sampling import SamplingParams

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
MODES = ("virtual", "wall")  # wall: cloud and edge as separate processes, wall clock
LEFT_OUT = "left_out.txt"  # in a sweep's job folder: why the combination could not run


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


class NotRunnable(ConfigError):
    """The system cannot run on this pair or device profile (a sweep leaves the combination out)."""


@dataclass
class Plan:
    """Everything a run needs, checked before any model is loaded."""

    system: SystemSpec
    system_config: object
    pair: object
    link: LinkProfile
    edge: RoleProfile
    cloud: RoleProfile
    mode: str
    sampling: SamplingParams
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    workload: object = None  # workloads.WorkloadSpec, checked here; its prompts load after the models
    network: NetworkProfile | None = None  # what the wall-mode link backends realise
    edges: EdgesPlan | None = None  # the edge devices (None: one, the run's device and network)
    faults: list = field(default_factory=list)  # harness.faults.Fault: injected on purpose
    wall: WallOptions = field(default_factory=WallOptions)
    fleet: object = None  # harness.fleet_plan.FleetPlan: the fleet simulator's devices (None: not a fleet run)


def network_spec(node) -> NetworkProfile:
    """The :class:`netem.profile.NetworkProfile` of a ``network`` config node (rates in Mbit/s, RTT in ms)."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    try:
        return parse_profile(data)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from exc


def conf_option(group: str, name: str) -> dict:
    """The mapping of one option of a config group (``conf/<group>/<name>.yaml``)."""
    path = Path(CONF_DIR) / group / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"unknown {group} {name!r}; valid: {', '.join(options)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def network_profile(node) -> LinkProfile:
    """The virtual link model of a ``network`` config node (the profile the real backends realise)."""
    return LinkProfile.from_network(network_spec(node))


def system_params(cfg: DictConfig) -> dict:
    params = cfg.system.get("params")
    return {} if params is None else OmegaConf.to_container(params, resolve=True)


def make_plan(cfg: DictConfig) -> Plan:
    """Validate a composed config into a :class:`Plan`; every error names its key."""
    from harness.pairs import pair_from_mapping

    if cfg.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {cfg.max_new_tokens!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    if not isinstance(cfg.temperature, (int, float)) or cfg.temperature < 0:
        raise ConfigError(f"temperature must be a number >= 0, got {cfg.temperature!r}")
    system = get_system(cfg.system.name)
    params = system_params(cfg)
    try:
        system_config = system.make_config(params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc).replace(f"system={system.name}", f"system.params ({system.name})")) from exc
    pair = pair_from_mapping(OmegaConf.to_container(cfg.pair, resolve=True), origin="pair (config)")
    device = OmegaConf.to_container(cfg.device, resolve=True)
    try:
        edge, cloud = role_profile(device["edge"]), role_profile(device["cloud"])
    except KeyError as exc:
        raise ConfigError(f"device: missing the {exc.args[0]!r} profile") from exc
    except ValueError as exc:
        raise ConfigError(f"device: {exc}") from exc
    if cfg.mode == "wall" and any(spec.engine == "fitted" for spec in pair.roles().values()):
        raise ConfigError(f"pair={pair.name} is a fitted pair, a statistical model for virtual time (its rows are "
                          "a few hundred ids wide, not the real vocabulary): use mode=virtual, or a real pair")
    if cfg.mode == "virtual" and system.edge_model == "target":
        try:
            require_target_costs(edge, system.name)
        except ValueError as exc:
            raise NotRunnable(f"device: {exc}") from exc
    energy_node = cfg.get("energy")
    try:
        energy = energy_config(None if energy_node is None else OmegaConf.to_container(energy_node, resolve=True))
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc) if str(exc).startswith("energy") else f"energy: {exc}") from exc
    from workloads import WorkloadError, workload_spec

    try:
        workload = workload_spec(cfg.workload)
    except WorkloadError as exc:
        raise ConfigError(str(exc)) from exc
    network = network_spec(cfg.network)
    try:
        faults = parse_faults(_plain(cfg.get("fault")))
        wall = wall_options(_plain(cfg.get("wall")))
        if cfg.mode == "virtual":
            if any(f.kind in PROCESS_FAULTS for f in faults):
                raise FaultError(f"fault={cfg.fault.name}: cloud_kill and cloud_stall act on the cloud process, "
                                 "which only mode=wall has; use mode=wall, or a link fault (outage, bandwidth_collapse)")
            network = with_link_faults(network, faults)  # wall mode applies them to the live link
    except FaultError as exc:
        raise ConfigError(str(exc)) from exc
    link = LinkProfile.from_network(network)
    edges_node = cfg.get("edges")
    try:
        edges = edges_plan(None if edges_node is None else OmegaConf.to_container(edges_node, resolve=True),
                           run_device=edge, run_network=network.name, run_link=link, option=conf_option)
    except EdgesError as exc:
        raise ConfigError(str(exc)) from exc
    if edges.shared_time and (workload.turns or 1) > 1:
        raise ConfigError("a multi-edge or open-loop run serves first turns only: set workload.turns=1")
    if cfg.mode == "wall" and edges.shared_time and (
            edges.arrivals.get("kind") != "closed" or any(e.device_option or e.network != network.name
                                                          for e in edges.edges)):
        raise ConfigError("mode=wall runs edges.n edge processes on this machine's link, closed loop: leave "
                          "edges.devices, edges.networks and edges.arrivals at their defaults, or use mode=virtual")
    fleet = fleet_plan_of(cfg, edges, edge, network, link, workload)
    return Plan(system, system_config, pair, link, edge, cloud, cfg.mode,
                SamplingParams(temperature=float(cfg.temperature)), energy, workload, network, edges, faults, wall,
                fleet)


def fleet_plan_of(cfg: DictConfig, edges: EdgesPlan, edge: RoleProfile, network: NetworkProfile, link: LinkProfile,
                  workload):
    """The run's :class:`harness.fleet_plan.FleetPlan` when the config selects the fleet
    (``fleet=default``, or an experiment that sets ``fleet.*``), else None."""
    node = cfg.get("fleet")
    if node is None:
        return None
    from harness.fleet_plan import FleetError, fleet_plan

    if cfg.mode != "virtual":
        raise ConfigError("the fleet simulator runs in virtual time: set mode=virtual (or leave fleet unset)")
    if edges.shared_time:
        raise ConfigError("fleet.* replaces the edges group: leave edges at edges=one (the fleet draws its own "
                          "devices, networks and arrivals), or drop fleet")
    if (workload.turns or 1) > 1:
        raise ConfigError("the fleet serves first turns only: set workload.turns=1")
    try:
        return fleet_plan(_plain(node) or {}, run_device=edge, run_network=network.name, run_link=link,
                          run_slo=(workload.slo_ttft_s, workload.slo_tpot_s), run_seed=int(cfg.seed),
                          option=conf_option)
    except FleetError as exc:
        raise ConfigError(str(exc)) from exc


def _plain(node):
    """A config node as plain containers (None stays None)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


#: per-request columns every run folder gets (see :func:`request_context`)
EDGE_COLUMNS = {"edge": "string", "edge_device": "string", "edge_network": "string", "n_edges": "int64",
                "arrival": "float64", "slo_ttft_s": "float64", "slo_tpot_s": "float64", "slo_met": "bool"}


def request_context(plan: Plan, request, record, edge_index: int = 0) -> dict:
    """The edge a request ran on, its arrival, its SLO and whether it met it."""
    e = plan.edges.edges[edge_index] if plan.edges is not None else None
    return {"edge": e.name if e else "e0", "edge_device": e.device.name if e else plan.edge.name,
            "edge_network": e.network if e else plan.link.name, "n_edges": plan.edges.n if plan.edges else 1,
            "arrival": request.arrival, "slo_ttft_s": request.slo_ttft_s, "slo_tpot_s": request.slo_tpot_s,
            "slo_met": slo_met(record.ttft, record.tpot, request.slo_ttft_s, request.slo_tpot_s)}


WALL_ENERGY_SOURCE = ("mode=wall: each process meters itself (energy=auto: NVML, RAPL, else its CPU time); "
                      "the edge per request, the cloud per run (it serves every request from one process)")


def energy_plan(plan: Plan):
    """The energy model of a virtual-time run (None in wall mode) and the manifest's entry per role."""
    from harness.energy.virtual import VirtualEnergy

    if plan.mode != "virtual":
        return None, {role: {"kind": None, "source": WALL_ENERGY_SOURCE, "reason": None} for role in ("edge", "cloud")}
    energy = VirtualEnergy.from_profiles(plan.edge, plan.cloud, plan.energy.mode)
    return energy, energy.describe()


def build_workload(cfg: DictConfig, target, progress: bool = True):
    """The workload (``workloads.Workload``) and its first turns (``workloads.Turn``), rendered for ``target``.

    Prompt sets are fetched and verified on first use. A multi-turn conversation's next turn
    is ``workload.next_turn(turn, output_tokens, target)``, built from the model's own answer.
    """
    from workloads import WorkloadError, load_workload, workload_spec
    from workloads.workload import describe

    try:
        workload = load_workload(workload_spec(cfg.workload), int(cfg.max_new_tokens),
                                 SamplingParams(temperature=float(cfg.temperature)), seed=int(cfg.seed),
                                 progress=progress)
        if workload.spec.chat_template and not has_chat_template(target):
            workload.spec = workload.spec.with_(chat_template=False)
            if progress:
                print(f"specwan: workload {workload.spec.name}: {target.info.model} has no chat template; "
                      "prompts go as raw text", file=sys.stderr, flush=True)
        turns = workload.first_turns(target)
    except WorkloadError as exc:
        raise ConfigError(str(exc)) from exc
    if progress:
        print(f"specwan: {describe(workload)}", file=sys.stderr, flush=True)
    return workload, turns


def has_chat_template(engine) -> bool:
    """Whether ``engine``'s model renders chat messages (a toy or base model may not)."""
    from systems.engines import EngineError

    try:
        engine.apply_chat_template([{"role": "user", "content": "hello"}])
    except EngineError:
        return False
    return True


_SHARED_ENGINES: dict[str, tuple] = {}


SHARED_TIME_SEQUENCES = 16


def with_sequences(pair, n_edges: int):
    """The pair with room for ``n_edges`` concurrent sessions per llama.cpp model (one process
    serves every edge in a shared-time run): ``n_seq_max`` at least 16 where the pair leaves it
    unset, so a sweep over N up to 15 keeps one loaded engine (and its memory of model calls)."""
    roles = {}
    for role, spec in pair.roles().items():
        if spec.engine == "llamacpp" and "n_seq_max" not in spec.options:
            spec = dataclasses.replace(spec, options={**spec.options,
                                                      "n_seq_max": max(SHARED_TIME_SEQUENCES, n_edges + 1)})
        roles[role] = spec
    return dataclasses.replace(pair, **roles)


def shared_engines(pair, paths, memo: bool = True) -> tuple:
    """The pair's ``(draft, target)`` engines, opened once per process and kept for the next run.

    The jobs of a sweep that one process serves (Hydra's basic launcher runs them all; a joblib
    or Ray worker runs several) share the loaded models. Each is wrapped in
    :class:`harness.memo.MemoEngine`: a forward pass a later job repeats (the same prefix, on
    another network or device profile) is replayed from memory, so in virtual time every
    network after the first costs little. Only one pair is kept at a time. ``memo=False``: the
    engines as they are (the fleet: a memory of every pass would grow with simulated tokens).
    """
    from harness.memo import MemoEngine
    from harness.pairs import open_engines

    key = repr((pair.roles(), sorted((role, str(path)) for role, path in paths.items()), memo))
    if key not in _SHARED_ENGINES:
        _SHARED_ENGINES.clear()
        draft, target = open_engines(pair, paths)
        _SHARED_ENGINES[key] = (MemoEngine(draft), MemoEngine(target)) if memo else (draft, target)
    return _SHARED_ENGINES[key]


def execute(cfg: DictConfig, run_dir: str | Path | None = None) -> list:
    """Run one configuration: plan, load the pair, serve the workload, write and summarise.

    With ``run_dir`` the records go to that run folder as each request finishes; a rerun
    into the same folder skips the requests already recorded.
    """
    from harness.results import completed_run

    plan = make_plan(cfg)
    if run_dir is not None and completed_run(run_dir, OmegaConf.to_container(cfg, resolve=True)):
        print(f"specwan: {plan.system.name} on {plan.link.name}: already complete in {run_dir}, skipped "
              "(a new folder measures it again)", file=sys.stderr, flush=True)
        return []
    if plan.fleet is not None:
        from harness.fleet_run import execute_fleet

        return execute_fleet(cfg, plan, run_dir)
    with contextlib.ExitStack() as stack:
        link = wall_link(plan, stack) if plan.mode == "wall" else None
        return _execute(cfg, plan, run_dir, link)


def wall_link(plan: Plan, stack: contextlib.ExitStack):
    """Bring up the run's link (torn down when ``stack`` closes) and probe it; ``(link, probe)``."""
    from netem.backends import LinkError, open_link
    from netem.kernel import BackendUnavailable
    from netem.probe import probe_link

    try:
        link = stack.enter_context(open_link(plan.network))
    except (BackendUnavailable, LinkError) as exc:
        raise ConfigError(str(exc)) from exc
    print(f"specwan: link {plan.network.name} on backend {link.backend} ({link.level}); probing it",
          file=sys.stderr, flush=True)
    try:
        return link, probe_link(link)
    except LinkError as exc:
        from harness.wall import WallRunError

        raise WallRunError(str(exc)) from exc


def link_manifest(plan: Plan, link, probe: dict | None) -> dict:
    """The manifest's ``link`` entry: backend, configured and measured figures side by side."""
    from netem.probe import summary

    if link is None:
        return {"backend": "model (in-process)", "configured": plan.network.describe() if plan.network else None}
    return {**link.describe(), "configured": plan.network.describe(),
            "measured": summary(probe) if probe else None, "details": "link.json"}


def _execute(cfg: DictConfig, plan: Plan, run_dir, wall) -> list:
    from harness.contention import check_before_run, planned_threads
    from harness.inprocess import RunOptions, check_engines, run_system
    from harness.pairs import ensure_pair
    from harness.results import RunWriter, build_manifest

    link, probe = wall if wall is not None else (None, None)
    if plan.mode == "virtual" and plan.edges is not None and plan.edges.shared_time:
        plan = dataclasses.replace(plan, pair=with_sequences(plan.pair, plan.edges.n))
    paths = ensure_pair(plan.pair)
    if plan.mode == "wall":
        draft, target = _tokenizer_engine(plan.pair, paths), None
    else:
        draft, target = shared_engines(plan.pair, paths)
        try:
            check_engines(plan.system, plan.system_config, draft, target)
        except ValueError as exc:
            raise NotRunnable(str(exc)) from exc
    engine = target or draft
    calls = _model_calls(draft, target)
    workload, turns = build_workload(cfg, engine)
    if plan.edges is not None:
        turns = plan.edges.expand(turns)
    turns, too_long = fit_context(turns, [e for e in (draft, target) if e is not None])
    context = {"system": plan.system.name, "pair": plan.pair.name, "network": plan.link.name,
               "workload": str(cfg.workload.name), "clock": plan.mode, "seed": int(cfg.seed)}
    energy, energy_manifest = energy_plan(plan)
    writer, done, done_outputs = None, set(), {}
    if run_dir is not None:
        config = OmegaConf.to_container(cfg, resolve=True)
        profiles = {"edge": plan.edge.as_dict(), "cloud": plan.cloud.as_dict()} if plan.mode == "virtual" else None
        contention = check_before_run(planned_threads(plan.pair))
        manifest = build_manifest(config, {"clock": plan.mode, "device_profiles": profiles,
                                           "link": link_manifest(plan, link, probe),
                                           "energy": energy_manifest, "contention": contention}, models=paths)
        writer = RunWriter(run_dir, manifest, extra_context=EDGE_COLUMNS)
        if plan.edges is not None and plan.edges.shared_time:
            writer.update_manifest({"edges": plan.edges.describe()})
        if too_long:
            writer.update_manifest({"left_out_requests": too_long})
        if plan.faults or plan.mode == "wall":
            writer.update_manifest({"faults": fault_manifest(plan)})
        if link is not None:
            from netem.kernel import capabilities
            from netem.probe import side_by_side

            writer.write_link({"configured": plan.network.describe(), "measured": probe,
                               "side_by_side": side_by_side(plan.network, probe), "backend": link.describe(),
                               "capabilities": capabilities().describe()})
        done = writer.done_keys()
        if done:  # resuming: a later turn is built from the recorded answer of the one before
            from harness.results import load_run

            _, previous, _ = load_run(run_dir)
            done_outputs = {rid: list(ids) for rid, ids in zip(previous["request_id"], previous["output_ids"])}
    records = []
    shared = plan.edges is not None and plan.edges.shared_time
    bar = tqdm(total=len(turns), desc=f"{plan.system.name} on {f'{plan.edges.n} edges' if shared else plan.link.name}",
               unit="request", file=sys.stderr, dynamic_ncols=True)
    try:
        wave = list(turns)
        while wave:
            todo, later = [], []
            for t in wave:
                if writer is not None and writer.key({**context, **t.context()}, t.request_id) in done:
                    bar.update(1)
                    if (out := done_outputs.get(t.request_id)) is not None and (
                            nxt := workload.next_turn(t, out, engine)) is not None:
                        later.append(nxt)
                else:
                    todo.append(t)
            if plan.mode == "wall":
                served = _run_wall(plan, cfg, todo, writer, context, link)
            elif plan.edges is not None and plan.edges.shared_time:
                served = _serve_shared(plan, cfg, todo, writer, context, draft, target, energy, bar)
            else:
                options = RunOptions(virtual=True, link=plan.link, edge_cost=plan.edge.cost,
                                     cloud_cost=plan.cloud.cost, energy=energy)
                served = []
                for t in todo:  # one request at a time, so each is on disk as soon as it finishes
                    (rec,) = run_system(plan.system, draft, target, [t.request], system_params(cfg), options)
                    served.append(rec)
                    if writer is not None:
                        writer.append(rec, {**context, **t.context(), **request_context(plan, t.request, rec)},
                                      energy=rec.energy)
                    bar.update(1)
            if plan.mode == "wall":
                bar.update(len(served))
            records += served
            # multi-turn prompts: the next turn carries this system's own answer
            later += [nxt for t, rec in zip(todo, served)
                      if (nxt := workload.next_turn(t, rec.output_tokens, engine)) is not None]
            wave = later
            if later:  # a conversation's next turns join the total once the answers they follow are known
                bar.total += len(later)
                bar.refresh()
        if writer is not None:
            if (rep := system_report(plan.system, records)) is not None:
                if done:  # resumed: the system's own figures cover what this session served
                    rep = {**rep, "summary": f"{rep['summary']} (the requests served after resuming)"}
                writer.update_manifest({"system_report": rep})
            writer.mark_complete()
    finally:
        bar.close()
        if writer is not None:
            if link is not None and (counters := link.counters()) is not None:
                counters["note"] = "since the link came up: the probe's traffic is included"
                writer.update_manifest({"link": {"emulator_total": counters}})
            writer.close()
    tokens = sum(r.n_tokens for r in records)
    seconds = sum(r.e2e for r in records)
    verified = sum(sum(x.verified for x in r.rounds) for r in records)
    accepted = sum(r.accepted for r in records)
    where = f" -> {run_dir}" if run_dir is not None else ""
    acceptance = f", acceptance {accepted / verified:.3f}" if verified else ""
    devices = (f"edge {plan.edge.name} [{plan.edge.kind}], cloud {plan.cloud.name} [{plan.cloud.kind}]"
               if plan.mode == "virtual" else f"separate processes on this machine, link backend {link.backend}")
    if plan.edges is not None and plan.edges.shared_time and plan.mode == "virtual":
        from harness.edges import describe_edges

        devices = f"{describe_edges(plan.edges)}; cloud {plan.cloud.name} [{plan.cloud.kind}]"
    elif plan.edges is not None and plan.edges.n > 1:
        devices = f"{plan.edges.n} edge processes and a cloud process on this machine, link backend {link.backend}"
    kind = "modelled" if plan.mode == "virtual" else "measured"
    nets = sorted({e.network for e in plan.edges.edges}) if plan.edges is not None else [plan.link.name]
    where_net = "several networks" if len(nets) > 1 else nets[0]
    print(f"{plan.system.name} on {where_net} ({plan.mode} time; {devices}): {len(records)} requests, "
          f"{tokens} tokens, {1e3 * seconds / max(1, tokens):.1f} ms/token ({kind}){acceptance}{where}")
    if probe is not None:
        from netem.probe import summary

        m = summary(probe)
        print(f"  link (measured): RTT median {m['rtt_ms_median']:.2f} ms, goodput up "
              f"{m.get('up_goodput_mbps') or float('nan'):.3f} / down {m.get('down_goodput_mbps') or float('nan'):.3f} "
              f"Mbit/s, new connection {m['connect_ms_median']:.2f} ms")
    if (rep := system_report(plan.system, records)) is not None:
        print(f"  {rep['summary']}")
    if plan.mode == "virtual" and records:
        from harness.energy.report import describe_per_token

        print(f"  {describe_per_token(records)}")
        replayed, computed = _model_calls(draft, target)
        print(f"  model calls: {replayed - calls[0]} replayed from memory, {computed - calls[1]} computed")
    return records


def fit_context(turns, engines) -> tuple[list, list[dict]]:
    """The turns whose prompt plus ``max_new_tokens`` fits every model's context, and the
    others (request id, sizes, reason), each said in one line; none fitting is an error."""
    n_ctx = min((e.info.n_ctx for e in engines), default=None)
    if n_ctx is None:
        return list(turns), []
    kept, left = [], []
    for t in turns:
        need = len(t.request.prompt) + t.request.max_new_tokens
        if need <= n_ctx:
            kept.append(t)
            continue
        left.append({"request_id": t.request_id, "prompt_tokens": len(t.request.prompt),
                     "max_new_tokens": t.request.max_new_tokens,
                     "reason": f"prompt + max_new_tokens = {need} tokens exceed the models' context ({n_ctx})"})
    if kept:
        for x in left:
            print(f"specwan: leaving out {x['request_id']}: {x['reason']}", file=sys.stderr)
    elif turns:
        worst = min(left, key=lambda x: x["prompt_tokens"])
        raise ConfigError(f"no request fits the models' context of {n_ctx} tokens (the shortest prompt, "
                          f"{worst['prompt_tokens']} tokens, plus max_new_tokens {worst['max_new_tokens']}): lower "
                          "max_new_tokens, or raise the pair's n_ctx (pair.target.options.n_ctx=...)")
    return kept, left


def _serve_shared(plan: Plan, cfg: DictConfig, turns, writer, context, draft, target, energy, bar) -> list:
    """Serve every turn in one shared virtual time: the run's edges (:mod:`harness.edges`)
    against one cloud. Each request is on disk as soon as it finishes, each cloud batch as
    soon as it runs."""
    from harness.energy.virtual import VirtualEnergy
    from harness.inprocess import EdgeSpec, RunOptions, run_system

    edges = plan.edges
    assign = edges.assign(len(turns))
    arrivals = edges.arrival_times(len(turns), int(cfg.seed))
    requests = [dataclasses.replace(t.request, arrival=a) for t, a in zip(turns, arrivals)]
    index = {r.request_id: i for i, r in enumerate(requests)}
    specs = [EdgeSpec(e.name, e.link, e.device.cost, e.device.name,
                      VirtualEnergy.from_profiles(e.device, plan.cloud, plan.energy.mode) if e.device_option else None)
             for e in edges.edges]

    def finished(rec) -> None:
        i = index[rec.request_id]
        if writer is not None:
            writer.append(rec, {**context, **turns[i].context(), **request_context(plan, requests[i], rec, assign[i])},
                          energy=rec.energy)
        bar.update(1)

    def batch(rec) -> None:
        if writer is not None:
            writer.append_batch(rec, {"system": plan.system.name, "network": plan.link.name})

    options = RunOptions(virtual=True, link=plan.link, cloud_cost=plan.cloud.cost, edges=specs, assign=assign,
                         on_request=finished, on_batch=batch, energy=energy)
    return run_system(plan.system, draft, target, requests, system_params(cfg), options)


def _model_calls(*engines) -> tuple[int, int]:
    """Forward-pass rows the shared engines replayed and computed so far (see :func:`shared_engines`)."""
    engines = [e for e in engines if e is not None]
    return sum(getattr(e, "hits", 0) for e in engines), sum(getattr(e, "misses", 0) for e in engines)


def system_report(spec, records) -> dict | None:
    """The system's own figures for a run (:attr:`systems.api.SystemSpec.report`), if it has any."""
    return spec.report(records) if spec.report is not None and records else None


def _tokenizer_engine(pair, paths):
    """The draft engine alone: enough to tokenize prompts (the vocabulary is shared)."""
    from harness.pairs import FILELESS_ENGINES
    from systems.engines import create_engine

    spec = pair.roles()["draft"]
    options = dict(spec.options)
    if spec.engine in FILELESS_ENGINES:
        options["role"] = "draft"
    else:
        options["model_path"] = str(paths["draft"])
    return create_engine(spec.engine, **options)


def wall_processes(n_edges: int) -> dict:
    """How a wall run's own processes share this machine's cores (the contention within the
    run, beside the other processes' load sampled before it): the cores each is pinned to."""
    import os

    from harness.wall import cpu_plan

    cloud, edges = cpu_plan(n_edges)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"processes": 1 + n_edges, "usable_cores": cores, "cloud_cores": cloud, "edge_cores": edges,
            "note": f"1 cloud process and {n_edges} edge process(es) on {cores} core(s); processes pinned to the "
                    "same cores take turns, so measured times include that sharing"}


def wall_liveness(plan: Plan) -> tuple[float, str]:
    """The edges' liveness timeout for a wall run and where it came from."""
    if plan.wall.liveness_timeout_s:
        return plan.wall.liveness_timeout_s, "wall.liveness_timeout_s"
    return liveness_timeout(plan.network)


def fault_manifest(plan: Plan, run=None) -> dict:
    """The manifest's ``faults`` entry: the faults configured, those that fired and when
    (wall mode; seconds after every edge had connected), and how the edges guarded against a
    lost cloud."""
    out = {"configured": [f.describe() for f in plan.faults]}
    if plan.mode == "virtual":
        out["fired"] = [{**f.describe(), "how": "the link model's rate trace (virtual time)"}
                        for f in plan.faults]
        return out
    seconds, how = wall_liveness(plan)
    out["fired"] = list(run.faults_fired) if run is not None else []
    out["liveness_timeout_s"], out["liveness_from"] = seconds, how
    out["on_cloud_lost"] = plan.wall.on_cloud_lost
    return out


def _run_wall(plan: Plan, cfg: DictConfig, turns, writer, context, link=None) -> list:
    """Serve the turns' requests across real processes; record what finished even on failure."""
    from harness.pairs import load_pair
    from harness.wall import WallRunError, run_wall

    if not turns:
        return []
    if any(f.kind in LINK_FAULTS for f in plan.faults) and getattr(link, "backend", None) not in ("tun", "relay"):
        raise ConfigError(f"fault={cfg.fault.name} changes the link while it runs, which only the tun and relay "
                          f"backends can (this run's: {getattr(link, 'backend', 'none')}): set network.backend=tun "
                          "or relay, on a shaped network")
    by_id = {t.request_id: t for t in turns}
    position = {t.request_id: i for i, t in enumerate(turns)}
    n_edges = plan.edges.n if plan.edges is not None else 1
    started = []

    def row(rec) -> dict:
        t = by_id[rec.request_id]
        edge = position[rec.request_id] % n_edges  # run_wall deals requests to its edge processes in turn
        return {**context, **t.context(), **request_context(plan, t.request, rec, edge)}

    def batch(rec) -> None:
        if writer is not None:
            writer.append_batch(rec, {"system": plan.system.name, "network": plan.link.name})

    import tempfile

    written: set[str] = set()

    def record(rec) -> None:
        """On disk as soon as its edge reports it: a harness stopped mid-run loses only what is in flight."""
        if writer is not None and rec.request_id not in written:
            writer.append(rec, row(rec), energy=rec.energy)
            written.add(rec.request_id)

    try:
        # The processes load the pair as this run resolved it (pair.* overrides included), from a
        # file; with a run folder, that file and the processes' logs and outputs stay in it
        # (wall/), so nothing is left in /tmp even if the harness is killed.
        with contextlib.ExitStack() as stack:
            home = (writer.run_dir if writer is not None
                    else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="specwan-pair-"))))
            pair_file = home / "pair.yaml"
            pair_file.write_text(OmegaConf.to_yaml(cfg.pair, resolve=True))
            liveness = wall_liveness(plan)[0]
            records = run_wall(plan.system.name, load_pair(pair_file), [t.request for t in turns], system_params(cfg),
                               clients=n_edges, on_start=started.append, on_record=record, link=link, on_batch=batch,
                               workdir=home / "wall" if writer is not None else None, timeout_s=plan.wall.timeout_s,
                               liveness_timeout_s=liveness, on_cloud_lost=plan.wall.on_cloud_lost,
                               retry_within_s=plan.wall.retry_within_s, faults=plan.faults)
    except WallRunError as exc:
        for rec in exc.records:
            record(rec)
        if writer is not None and started:
            writer.update_manifest({"faults": fault_manifest(plan, started[0])})
        raise
    for rec in records:
        record(rec)
    if writer is not None:
        writer.update_manifest({"wall_processes": wall_processes(n_edges), "faults": fault_manifest(plan, started[0])})
        if started and started[0].energy:
            writer.update_manifest({"energy": started[0].energy})
    return records


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from hydra.types import RunMode

    from harness.results import ResultsError
    from harness.wall import WallRunError

    hydra_cfg = HydraConfig.get()
    try:
        if cfg.get("grid") is not None:  # an experiment preset with a comparison grid
            from harness.grid import run_grid

            run_grid(cfg, hydra_cfg.runtime.output_dir)
        else:
            execute(cfg, run_dir=hydra_cfg.runtime.output_dir)
    except NotRunnable as exc:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            print(f"specwan run: error: {exc}", file=sys.stderr)
            _discard_if_empty(Path(hydra_cfg.runtime.output_dir))
            sys.exit(2)
        # a sweep over every system meets some that cannot run on this pair or device: the
        # combination is left out, with the reason, and the sweep goes on
        print(f"specwan run: left out {cfg.system.name} on {cfg.network.name}: {exc}", file=sys.stderr, flush=True)
        Path(hydra_cfg.runtime.output_dir, LEFT_OUT).write_text(f"{exc}\n")
    except (ConfigError, WallRunError, ResultsError) as exc:
        # ResultsError: a refused resume (the folder holds another config, or another writer has it)
        print(f"specwan run: error: {' '.join(str(exc).split()) if isinstance(exc, ResultsError) else exc}",
              file=sys.stderr)
        _discard_if_empty(Path(hydra_cfg.runtime.output_dir))
        sys.exit(2)


def _discard_if_empty(run_dir: Path) -> None:
    """Remove the folder Hydra made for a run that was refused before recording anything (it
    holds only Hydra's empty log and its .hydra/ config copies), so a mistyped command leaves
    nothing behind."""
    import shutil

    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if all((e.name == "run.log" and e.is_file() and e.stat().st_size == 0) or (e.name == ".hydra" and e.is_dir())
           for e in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
