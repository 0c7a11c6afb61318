"""Comparison grids: methods x scenarios x datasets in virtual time, beside a paper's table.

An experiment preset with a ``grid:`` section (``specwan run experiment=pipesd_table1``)
runs every method of every dataset in every scenario (a network profile and a device
profile), each stopped at the same number of accepted (output) tokens, into one run folder:
the records carry the cell (context columns ``scenario``, ``dataset``, ``method``) and the
manifest each cell's parameters and system report (``grid_cells``). The table (time per
accepted token, speedups and modelled cloud energy per 100 accepted tokens next to the
figures the paper printed, with the ratios) is :mod:`analysis.grid`'s, from the run folder:
``python -m analysis.report <run folder>`` prints it. Methods whose system has thresholds r1/r2
listed under ``grid.tune`` are tuned offline first, per scenario and dataset, on prompts
held out of the evaluation (the workload's last ``grid.tune.prompts``).

Each cell is one continuous run: one edge device serves the cell's prompts one after the
other, keeping its state across them (a rate trace keeps running too).

A method may name its own ``pair`` (a conf/pair option) when its system needs an engine the
run's pair does not offer (split inference needs a target that runs a range of layers:
``pair: qwen25coder-hf``); its engines load once, beside the run's.

Greedy decoding makes every method emit the same tokens for a prompt, so stopping at N
accepted tokens serves the same prompts to every method; forward passes are memoized
(:class:`harness.memo.MemoEngine`), so scenarios after the first mostly replay them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from harness.profiles import require_target_costs, role_profile
from harness.run import ConfigError, conf_option, network_profile, system_report
from systems.api import get_system

CONTEXT = {"scenario": "string", "dataset": "string", "method": "string"}


@dataclass(frozen=True)
class Method:
    """One column of the table: a registered system with its parameters for a dataset, and
    the pair it runs on when not the run's (a system needing an engine the run's pair lacks)."""

    name: str
    system: str
    params: dict
    pair: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A workload (a conf/workload option) with its methods and the paper's figures."""

    name: str
    workload: str
    methods: tuple[Method, ...]
    paper: dict = field(default_factory=dict)
    workload_params: dict = field(default_factory=dict)  # overrides of the workload's keys

    def workload_config(self) -> dict:
        return {**_conf("workload", self.workload), **self.workload_params}


@dataclass(frozen=True)
class Scenario:
    """A network profile and a device profile (conf/network and conf/device options)."""

    name: str
    network: str
    device: str
    network_params: dict = field(default_factory=dict)  # overrides of the network profile's keys

    def network_config(self) -> dict:
        return {**_conf("network", self.network), **self.network_params}


@dataclass(frozen=True)
class GridSpec:
    """A whole comparison grid, checked before any model loads."""

    name: str
    accepted_tokens: int
    max_new_tokens: int
    scenarios: tuple[Scenario, ...]
    datasets: tuple[Dataset, ...]
    tune: dict | None
    source: str = ""


def _pair(name: str, where: str):
    from harness.pairs import PairError, load_pair

    try:
        return load_pair(name)
    except PairError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _conf(group: str, name: str) -> dict:
    try:
        return conf_option(group, name)
    except ConfigError as exc:
        raise ConfigError(f"grid: {exc}") from None


def grid_spec(node) -> GridSpec:
    """Validate a ``grid`` config node; every error names its key."""
    g = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    allowed = {"name", "accepted_tokens", "max_new_tokens", "scenarios", "datasets", "tune", "source"}
    unknown = sorted(set(g) - allowed)
    if unknown:
        raise ConfigError(f"grid: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    for key in ("accepted_tokens", "max_new_tokens"):
        if not isinstance(g.get(key), int) or g[key] < 1:
            raise ConfigError(f"grid.{key} must be a positive integer, got {g.get(key)!r}")
    scenarios = []
    for name, s in (g.get("scenarios") or {}).items():
        if not {"network", "device"} <= set(s) <= {"network", "device", "network_params"}:
            raise ConfigError(f"grid.scenarios.{name} needs 'network' and 'device' (and optionally "
                              f"'network_params'), got {sorted(s)}")
        _conf("network", s["network"])
        _conf("device", s["device"])
        scenario = Scenario(name, s["network"], s["device"], dict(s.get("network_params") or {}))
        try:
            network_profile(scenario.network_config())
        except (ValueError, TypeError, ConfigError) as exc:
            raise ConfigError(f"grid.scenarios.{name}.network_params: {exc}") from None
        scenarios.append(scenario)
    datasets = []
    for name, d in (g.get("datasets") or {}).items():
        if "workload" not in d or not d.get("methods"):
            raise ConfigError(f"grid.datasets.{name} needs 'workload' and 'methods'")
        extra = sorted(set(d) - {"workload", "workload_params", "methods", "paper"})
        if extra:
            raise ConfigError(f"grid.datasets.{name}: unknown key(s) {', '.join(extra)}; valid: methods, paper, "
                              "workload, workload_params")
        _conf("workload", d["workload"])
        methods = []
        for mname, m in d["methods"].items():
            where = f"grid.datasets.{name}.methods.{mname}"
            extra = sorted(set(m) - {"system", "params", "pair"})
            if extra:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; valid: pair, params, system")
            try:
                system = get_system(m["system"])
                system.make_config(m.get("params") or {})
            except KeyError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if m.get("pair") is not None:
                _pair(m["pair"], where)
            for scenario in scenarios:
                if system.edge_model == "target":
                    try:
                        require_target_costs(role_profile(_conf("device", scenario.device)["edge"]), system.name)
                    except ValueError as exc:
                        raise ConfigError(f"{where} in grid.scenarios.{scenario.name}: {exc}") from None
            methods.append(Method(mname, m["system"], dict(m.get("params") or {}), m.get("pair")))
        datasets.append(Dataset(name, d["workload"], tuple(methods), dict(d.get("paper") or {}),
                                dict(d.get("workload_params") or {})))
    if not scenarios or not datasets:
        raise ConfigError("grid: needs at least one scenario and one dataset")
    tune = g.get("tune")
    if tune is not None:
        extra = sorted(set(tune) - {"systems", "method", "trials", "tokens", "prompts", "seed"})
        if extra:
            raise ConfigError(f"grid.tune: unknown key(s) {', '.join(extra)}; valid: method, prompts, seed, "
                              "systems, tokens, trials")
        for key in ("trials", "tokens", "prompts"):
            if key in tune and (not isinstance(tune[key], int) or tune[key] < 1):
                raise ConfigError(f"grid.tune.{key} must be a positive integer, got {tune[key]!r}")
    return GridSpec(str(g.get("name", "grid")), g["accepted_tokens"], g["max_new_tokens"], tuple(scenarios),
                    tuple(datasets), tune, str(g.get("source", "")))


# ---- running ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellRun:
    """One method run in one scenario on one dataset: what it ran with (``params``, tuned
    thresholds included), the tokens it produced and the system's own report over it
    (SystemSpec.report). The tables are computed from the run folder (:mod:`analysis.grid`)."""

    scenario: str
    dataset: str
    method: str
    system: str
    tokens: int
    params: dict
    system_report: dict | None = None

    @property
    def key(self) -> str:
        """The cell's key under the manifest's ``grid_cells``."""
        return f"{self.scenario}/{self.dataset}/{self.method}"


def tune_thresholds(system: str, params: dict, draft, target, requests, options, *, method: str = "bo",
                    trials: int = 16, tokens: int = 20, seed: int = 0, progress=None):
    """Offline tuning of a system's (r1, r2): each candidate is scored by the time per
    accepted token of runs that yield ``tokens`` accepted tokens on each of ``requests``
    (one request: the paper's protocol; several: the same score pooled over prompts)."""
    from harness.inprocess import run_system
    from systems.pipesd.tuner import tune

    probes = [replace(r, max_new_tokens=tokens) for r in requests]

    def objective(r1: float, r2: float) -> float:
        recs = run_system(system, draft, target, probes, {**params, "r1": r1, "r2": r2}, options)
        return sum(r.e2e for r in recs) / max(1, sum(r.n_tokens for r in recs))

    return tune(objective, method, trials, seed, progress)


def run_grid(cfg: DictConfig, run_dir: str | Path) -> list[CellRun]:
    """Run the grid of ``cfg.grid``; records go to ``run_dir`` as each request finishes, and
    each cell's parameters and system report to the manifest's ``grid_cells`` as it ends.
    Returns the cells in the order they ran; ``python -m analysis.report <run_dir>`` prints
    the table."""
    from harness.energy.virtual import VirtualEnergy
    from harness.inprocess import RunOptions, check_engines, run_system
    from harness.memo import MemoEngine
    from harness.pairs import ensure_pair, open_engines, pair_from_mapping
    from harness.contention import check_before_run, planned_threads
    from harness.results import DEFAULT_KEY_FIELDS, RunWriter, build_manifest
    from workloads import load_workload, workload_spec
    from workloads.workload import describe

    spec = grid_spec(cfg.grid)
    pair = pair_from_mapping(OmegaConf.to_container(cfg.pair, resolve=True), origin="pair (config)")
    scenarios = {s.name: (network_profile(s.network_config()), _conf("device", s.device))
                 for s in spec.scenarios}
    paths = ensure_pair(pair)
    t0 = time.perf_counter()
    draft, target = open_engines(pair, paths)
    print(f"grid {spec.name}: pair {pair.name} loaded in {time.perf_counter() - t0:.1f} s; "
          f"{len(spec.scenarios)} scenarios x {len(spec.datasets)} datasets, "
          f"{spec.accepted_tokens} accepted tokens per method", file=sys.stderr)
    engines = {pair.name: (MemoEngine(draft), MemoEngine(target))}  # pair name -> memoized engines
    for d in spec.datasets:
        for m in d.methods:
            if m.pair is not None and m.pair not in engines:
                other = _pair(m.pair, f"grid.datasets.{d.name}.methods.{m.name}")
                t0 = time.perf_counter()
                engines[m.pair] = tuple(MemoEngine(e) for e in open_engines(other, ensure_pair(other)))
                print(f"  method {m.name}: pair {other.name} loaded in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr)
            try:
                check_engines(get_system(m.system), get_system(m.system).make_config(m.params),
                              *engines[m.pair or pair.name])
            except ValueError as exc:
                raise ConfigError(f"grid.datasets.{d.name}.methods.{m.name}: {exc}") from None
    # A pair whose statistics depend on the workload (a fitted pair's categories, chosen by
    # ${workload.name}) is resolved again for each dataset whose workload it names differently.
    by_dataset: dict[str, tuple] = {}
    for d in spec.datasets:
        resolved = OmegaConf.to_container(OmegaConf.merge(cfg, {"workload": {"name": d.workload}}).pair, resolve=True)
        own = pair_from_mapping(resolved, origin="pair (config)")
        if own == pair:
            by_dataset[d.name] = engines[pair.name]
        else:
            by_dataset[d.name] = tuple(MemoEngine(e) for e in open_engines(own, paths))
            print(f"  dataset {d.name}: pair {own.name} resolved for workload {d.workload}", file=sys.stderr)
    tune = spec.tune or {}
    held_out = int(tune.get("prompts", 1)) if tune.get("systems") else 0
    turns_by_dataset = {}  # dataset -> (prompts to evaluate on, prompts held out for tuning)
    for d in spec.datasets:
        wl = load_workload(workload_spec(d.workload_config()), spec.max_new_tokens, progress=False)
        turns = wl.first_turns(target)
        if len(turns) < held_out + 1:
            raise ConfigError(f"grid.datasets.{d.name}: workload {d.workload} has {len(turns)} prompt(s); "
                              f"the grid needs {held_out} to tune on (grid.tune.prompts) and at least one "
                              "to evaluate")
        turns_by_dataset[d.name] = (turns[: len(turns) - held_out], turns[len(turns) - held_out:])
        print(f"  dataset {d.name}: {describe(wl)}", file=sys.stderr)

    config = OmegaConf.to_container(cfg, resolve=True)
    links = {name: _describe_link(link) for name, (link, _) in scenarios.items()}
    contention = check_before_run(planned_threads(pair), say=lambda line: print(line, file=sys.stderr))
    manifest = build_manifest(config, {"clock": "virtual", "grid": spec.name, "link": {"backend": "model (in-process)",
                              "scenarios": links}, "device_profiles": {n: dev for n, (_, dev) in scenarios.items()},
                              "contention": contention}, models=paths)
    cells: list[CellRun] = []
    jobs = [(s, d, m) for s in spec.scenarios for d in spec.datasets for m in d.methods]
    budgets: dict[str, list] = {}  # dataset -> [(turn, tokens to generate)]
    with RunWriter(run_dir, manifest, key_fields=(*DEFAULT_KEY_FIELDS, *CONTEXT), extra_context=CONTEXT) as writer:
        bar = tqdm(jobs, desc=spec.name, unit="cell", file=sys.stderr)
        for scenario, dataset, method in bar:
            link, device = scenarios[scenario.name]
            edge, cloud = role_profile(device["edge"]), role_profile(device["cloud"])
            options = RunOptions(virtual=True, link=link, edge_cost=edge.cost, cloud_cost=cloud.cost,
                                 energy=VirtualEnergy.from_profiles(edge, cloud, "auto"))
            turns, tuning_turns = turns_by_dataset[dataset.name]
            params = dict(method.params)
            if method.system in (tune.get("systems") or []):
                bar.set_postfix_str(f"tuning {method.name} in {scenario.name} on {dataset.name}")
                best = tune_thresholds(method.system, params, *by_dataset[dataset.name],
                                       [t.request for t in tuning_turns],
                                       options,
                                       method=tune.get("method", "bo"), trials=int(tune.get("trials", 16)),
                                       tokens=int(tune.get("tokens", 20)), seed=int(tune.get("seed", 0)))
                params.update(r1=best.r1, r2=best.r2)
            bar.set_postfix_str(f"{method.name} in {scenario.name} on {dataset.name}")
            if dataset.name not in budgets:
                budgets[dataset.name] = _token_budget(turns, spec.accepted_tokens, by_dataset[dataset.name][1])
            # One continuous run per cell: the edge device serves the prompts one after the
            # other, keeping its state (PipeSD's estimates and window history, EdgeLLM's R1),
            # as in the paper's runs of 1000 accepted tokens.
            requests = [replace(t.request, max_new_tokens=n) for t, n in budgets[dataset.name]]
            recs = run_system(method.system, *(engines[method.pair] if method.pair else by_dataset[dataset.name]),
                              requests, params, options)
            for (turn, _), rec in zip(budgets[dataset.name], recs):
                writer.append(rec, {"system": method.system, "pair": method.pair or pair.name, "network": link.name,
                                    "workload": dataset.workload, **turn.context(), "clock": "virtual", "seed": 0,
                                    "scenario": scenario.name, "dataset": dataset.name, "method": method.name},
                              energy=rec.energy)
            cell = CellRun(scenario.name, dataset.name, method.name, method.system, sum(r.n_tokens for r in recs),
                           params, system_report(get_system(method.system), recs))
            writer.update_manifest({"grid_cells": {cell.key: {"params": cell.params,
                                                              "system_report": cell.system_report}}})
            cells.append(cell)
    print(f"run folder: {run_dir}; its tables and report: python -m analysis.report {run_dir}")
    return cells


def _token_budget(turns, accepted_tokens: int, target) -> list:
    """The prompts and per-prompt token caps that make ``accepted_tokens`` outputs in all.

    Greedy outputs are the target's own, the same for every method (the memo gives every
    method the same logits), so the target's decode (the cloud-only system, no link)
    settles where each prompt stops; its forward passes are memoized for the methods.
    """
    from harness.inprocess import run_system

    budget, total = [], 0
    for turn in turns:
        if total >= accepted_tokens:
            break
        cap = min(turn.request.max_new_tokens, accepted_tokens - total)
        (rec,) = run_system("cloud_only", None, target, [replace(turn.request, max_new_tokens=cap)])
        budget.append((turn, cap))
        total += rec.n_tokens
    if total < accepted_tokens:
        print(f"grid: the evaluation prompts yield {total} of {accepted_tokens} tokens; cells stop there",
              file=sys.stderr)
    return budget


def _describe_link(link) -> dict:
    as_dict = getattr(link, "as_dict", None)
    if callable(as_dict):
        return as_dict()
    from dataclasses import asdict

    return asdict(link)
