"""The fleet simulator (harness/fleet.py): many edges and verifiers in one virtual time, on the
plug-ins' own code (toy pair), with records streamed and nothing kept per finished request."""

from __future__ import annotations

import dataclasses
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.energy.virtual import VirtualEnergy
from harness.fleet import FleetOptions, run_fleet
from harness.fleet_plan import FleetEdge, FleetPlan
from harness.inprocess import EdgeSpec, RunOptions, run_system
from harness.link import LinkProfile
from harness.profiles import RoleProfile
from harness.results import load_batches, load_run
from harness.run import CONF_DIR, ConfigError, conf_option, execute, make_plan
from systems.api import GenerationRequest, get_system
from systems.engines import create_engine
from workloads.arrivals import Poisson

TOY = ("pair=toy", "workload.chat_template=false", "max_new_tokens=16", "workload.size=4", "fleet=default")
CLOUD = RoleProfile("cloud", "declared", "test", step_s=0.015, prefill_s_per_token=0.0005, verify_s_per_token=0.002,
                    batch_s_per_session=0.003, active_w=300.0, idle_w=50.0)
DEVICE = RoleProfile("laptop", "declared", "test", step_s=0.036, prefill_s_per_token=0.005, active_w=45.0, idle_w=5.0)
LINK = LinkProfile("wan", rtt_s=0.05, up_bps=1e7, down_bps=1e7, jitter_s=0.002, seed=1)


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _pair(vocab: int = 64):
    kw = dict(vocab_size=vocab, seed=0)
    return create_engine("toy", role="draft", agreement=0.8, **kw), create_engine("toy", role="target", **kw)


def _templates(n: int = 5, max_new: int = 24):
    rng = np.random.default_rng(0)
    return [GenerationRequest(f"p{i}", [int(x) for x in rng.integers(1, 64, size=12)], max_new, seed=i)
            for i in range(n)]


def _plan(n: int, *, arrival=None, per_edge=None, duration=1e9, verifiers=1, slo=(2.0, 0.2)):
    arrival = arrival or {"kind": "poisson", "rate": 0.5}
    edges = tuple(FleetEdge(f"e{i}", DEVICE, "", "wan", LINK, arrival, slo, i % verifiers) for i in range(n))
    return FleetPlan(edges, verifiers, "round_robin", duration, per_edge, 0, True, {})


def _fleet(system: str, plan: FleetPlan, templates, draft=None, target=None, **kw):
    if draft is None:
        draft, target = _pair()
    spec = get_system(system)
    got, batches = [], []
    totals = run_fleet(spec, spec.make_config({}), draft, target, plan, templates,
                       FleetOptions(cloud_cost=CLOUD.cost, energy=VirtualEnergy.from_profiles(DEVICE, CLOUD),
                                    on_request=lambda r, item: got.append((r, item)),
                                    on_batch=lambda b, v: batches.append((b, v)), **kw))
    return got, batches, totals


@pytest.mark.parametrize("system", ["sled", "wisp", "centralized"])
def test_the_fleet_equals_the_shared_time_runner_on_the_same_edges_and_arrivals(system):
    """Same plug-in code, same link and devices: the same tokens, times, bytes and (streamed) energy."""
    n, k = 4, 3
    templates = _templates()
    got, _, _ = _fleet(system, _plan(n, per_edge=k), templates)
    requests = []
    for i in range(n * k):
        e, j = i % n, i // n
        t = templates[i % len(templates)]
        requests.append(dataclasses.replace(t, request_id=f"{t.request_id}@e{e}.{j}", slo_ttft_s=2.0, slo_tpot_s=0.2,
                                            arrival=float(Poisson(0.5, seed=e).times(k)[j])))
    draft, target = _pair()
    ref = run_system(system, draft, target, requests, {},
                     RunOptions(cloud_cost=CLOUD.cost, edges=[EdgeSpec(f"e{i}", LINK, DEVICE.cost, DEVICE.name)
                                                              for i in range(n)],
                                energy=VirtualEnergy.from_profiles(DEVICE, CLOUD)))
    mine = {r.request_id: r for r, _ in got}
    assert set(mine) == {r.request_id for r in ref}
    for r in ref:
        m = mine[r.request_id]
        assert m.output_tokens == r.output_tokens and m.token_times == r.token_times
        assert (m.start, m.end, m.bytes_up, m.bytes_down) == (r.start, r.end, r.bytes_up, r.bytes_down)
        timeline = ("round", "start", "end", "drafted", "accepted", "emitted", "bytes_up", "bytes_down", "t_queue")
        assert [[getattr(x, f) for f in timeline] for x in m.rounds] == \
               [[getattr(x, f) for f in timeline] for x in r.rounds]
        for key in ("edge_j", "cloud_j", "wasted_j"):
            assert m.energy[key] == pytest.approx(r.energy[key], rel=1e-9, abs=1e-9)


def test_verifiers_split_the_load_each_with_its_own_batches():
    got, batches, totals = _fleet("sled", _plan(6, verifiers=3, duration=6.0), _templates())
    served = {}
    for rec, item in got:
        served.setdefault(item.edge.verifier, set()).add(item.session)
    assert sorted(served) == [0, 1, 2] and all(len(totals.batches) == 3 and b > 0 for b in totals.batches)
    for b, v in batches:  # a verifier's passes hold its own edges' sessions only
        assert set(b.sessions) <= served[v]
    per_verifier = [sorted(b.index for b, v in batches if v == k) for k in range(3)]
    assert all(idx == list(range(len(idx))) for idx in per_verifier)  # each numbers its own passes


def _as_rows(got, batches):
    """A fleet's records as comparable rows, in a fixed order (workers interleave them)."""
    def row(record) -> str:
        return json.dumps(dataclasses.asdict(record), sort_keys=True, default=str)

    requests = sorted((row(r), item.edge_index, item.edge.name, item.template, item.session) for r, item in got)
    return requests, sorted((v, row(b)) for b, v in batches)


@pytest.mark.parametrize("system", ["sled", "centralized"])
def test_the_verifiers_islands_give_the_same_records_in_one_process_or_in_workers(system):
    """Each verifier and its edges run in a virtual time of their own: spread over two worker
    processes (one of them simulating two islands in turn) they give what one process gives,
    row for row, energy included, and the same totals."""
    plan = _plan(9, verifiers=3, duration=4.0)
    one = _fleet(system, plan, _templates())
    two = _fleet(system, plan, _templates(), workers=2)
    assert len(one[0]) > 9 and {item.edge.verifier for _, item in two[0]} == {0, 1, 2}
    assert all(r.energy and r.energy["edge_j"] > 0 for r, _ in two[0])
    assert _as_rows(*one[:2]) == _as_rows(*two[:2])
    assert one[2] == two[2] and one[2].batches[2] > 0
    totals = two[2]  # the islands' totals, summed
    assert totals.requests == len(two[0]) and totals.tokens == sum(r.n_tokens for r, _ in two[0])
    assert totals.rounds == sum(len(r.rounds) for r, _ in two[0]) and sum(totals.batches) == len(two[1])
    assert totals.virtual_s == pytest.approx(max(r.end for r, _ in two[0]))


class _FailsOnEdge1(get_system("sled").edge_cls):
    """SLED's edge, except that edge e1's first request fails (in its worker) as ``how`` says."""

    how, pid = "raise", os.getpid()

    async def generate(self, request, ctx):
        if "@e1." in request.request_id:
            if self.how == "raise":
                raise ValueError("boom on e1")
            if os.getpid() != self.pid:  # never the test's own process
                os.kill(os.getpid(), signal.SIGKILL)
        return await super().generate(request, ctx)


@pytest.mark.parametrize("how,error", [("raise", "boom on e1"), ("kill", "ended without finishing (exit code -9)")])
def test_a_worker_that_fails_stops_the_run_with_its_error_and_the_finished_requests_kept(how, error, monkeypatch):
    monkeypatch.setattr(_FailsOnEdge1, "how", how)
    spec = dataclasses.replace(get_system("sled"), edge_cls=_FailsOnEdge1)
    got, before = [], {p.pid for p in multiprocessing.active_children()}
    with pytest.raises((ValueError, RuntimeError), match=error.replace("(", r"\(").replace(")", r"\)")) as err:
        run_fleet(spec, spec.make_config({}), *_pair(), _plan(4, verifiers=2, duration=200.0), _templates(),
                  FleetOptions(cloud_cost=CLOUD.cost, on_request=lambda r, item: got.append(item), workers=2))
    notes = "".join(getattr(err.value, "__notes__", [])) + str(err.value)
    assert "verifier(s) [1]" in notes  # the failing worker is named
    if how == "raise":
        assert "generate" in notes  # with its traceback
    assert all(item.edge.verifier == 0 for item in got)
    assert not [p for p in multiprocessing.active_children() if p.is_alive() and p.pid not in before]


def test_the_worker_count_leaves_the_config_hash_alone():
    """Records carry the config's hash; the workers change nothing recorded, so not the hash."""
    from harness.results import config_hash

    def digest(*overrides):
        return config_hash(OmegaConf.to_container(_compose(*TOY, *overrides), resolve=True))

    assert digest("fleet.workers=1") == digest("fleet.workers=2") == digest()
    assert digest("fleet.n=7") != digest()


def test_forked_workers_only_for_engines_without_threads_of_their_own(capsys):
    from types import SimpleNamespace

    from harness.fleet_run import fleet_workers

    fitted = SimpleNamespace(info=SimpleNamespace(backend="fitted"))
    real = SimpleNamespace(info=SimpleNamespace(backend="llamacpp"))
    plan = _plan(8, verifiers=4)
    assert fleet_workers(dataclasses.replace(plan, workers=3), (fitted, fitted)) == 3
    assert fleet_workers(dataclasses.replace(plan, workers=9), (fitted, None)) == 4  # one per verifier at most
    assert fleet_workers(_plan(8, verifiers=1), (fitted, fitted)) == 1
    assert fleet_workers(plan, (fitted, fitted)) == min(4, len(os.sched_getaffinity(0)))
    assert fleet_workers(plan, (real, fitted)) == 1 and capsys.readouterr().err == ""
    assert fleet_workers(dataclasses.replace(plan, workers=2), (real, fitted)) == 1
    assert "fleet.workers=2 ignored: the llamacpp engine(s)" in capsys.readouterr().err


def test_mixes_are_drawn_as_declared_and_seeded():
    cfg = _compose(*TOY, "fleet.n=1000", "fleet.verifiers=4", "fleet.assign=blocks",
                   "fleet.devices=[{laptop_gpu_cloud: 3}, phone_gpu_cloud]",
                   "fleet.arrivals=[{weight: 1, kind: poisson, rate: 0.2}, {weight: 1, kind: closed}]")
    fleet = make_plan(cfg).fleet
    devices = [e.device_option for e in fleet.edges]
    assert set(devices) == {"laptop_gpu_cloud", "phone_gpu_cloud"}
    assert devices.count("laptop_gpu_cloud") / 1000 == pytest.approx(0.75, abs=0.05)
    assert sum(e.arrival["kind"] == "closed" for e in fleet.edges) / 1000 == pytest.approx(0.5, abs=0.05)
    networks = {e.network for e in fleet.edges}
    assert networks == {"wan_50ms_10mbit", "4g", "lan"}  # the default's three, equal weights
    assert [e.verifier for e in fleet.edges[:3]] == [0, 0, 0] and fleet.edges[-1].verifier == 3
    assert make_plan(cfg).fleet == fleet  # seeded: the same draws again
    other = make_plan(_compose(*TOY, "fleet.n=1000", "seed=1")).fleet
    assert [e.network for e in other.edges] != [e.network for e in fleet.edges]
    drawn = fleet.describe()["drawn"]
    assert sum(drawn["devices"].values()) == 1000 and drawn["verifiers"] == {f"v{k}": 250 for k in range(4)}


@pytest.mark.parametrize("overrides,message", [
    (("fleet.n=0",), "fleet.n must be a positive integer"),
    (("fleet.verifiers=3", "fleet.n=2"), "fleet.verifiers (3) must not exceed fleet.n (2)"),
    (("fleet.assign=nearest",), "fleet.assign must be one of round_robin, blocks, random"),
    (("fleet.devices=[nosuch]",), "unknown device 'nosuch'"),
    (("fleet.devices=[{laptop_gpu_cloud: -1}]",), "fleet.devices.laptop_gpu_cloud must be a number >= 0"),
    (("fleet.arrivals=[{kind: burst}]",), "fleet.arrivals[0].kind must be one of closed, poisson, gamma"),
    (("fleet.arrivals=[{kind: poisson}]",), "fleet.arrivals[0] (poisson): needs a rate"),
    (("fleet.slos=[{ttft: 2}]",), "fleet.slos[0]: unknown key(s) ttft"),
    (("fleet.duration_s=0",), "fleet.duration_s must be a number > 0"),
    (("+fleet.nn=3",), "fleet: unknown key(s) nn; valid: n,"),
    (("fleet.rounds=maybe",), "fleet.rounds must be true or false"),
    (("fleet.workers=0",), "fleet.workers must be a positive integer (processes to spread the verifiers over"),
    (("edges.n=3",), "fleet.* replaces the edges group"),
    (("mode=wall",), "the fleet simulator runs in virtual time"),
])
def test_fleet_mistakes_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        make_plan(_compose(*TOY, *overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_fleet_run_writes_the_run_folder_with_its_verifier_column(tmp_path):
    cfg = _compose(*TOY, "system=sled", "fleet.n=12", "fleet.verifiers=2", "fleet.duration_s=20")
    totals = execute(cfg, tmp_path)
    manifest, requests, rounds = load_run(tmp_path, from_journals=False)  # the parquet files, current
    assert manifest["complete"] and manifest["fleet"]["n"] == 12 and len(manifest["fleet"]["edges"]) == 12
    assert manifest["fleet"]["totals"]["requests"] == totals.requests == len(requests) > 12
    assert "modelled" in manifest["fleet"]["figures"]
    assert set(requests["verifier"]) == {0, 1} and (requests["n_edges"] == 12).all()
    assert requests["request_id"].is_unique and requests["slo_met"].notna().all()
    assert requests["arrival"].max() < 20 and requests["energy_cloud_j"].notna().all()
    edge_verifier = {e["name"]: e["verifier"] for e in manifest["fleet"]["edges"]}
    assert all(edge_verifier[e] == v for e, v in zip(requests["edge"], requests["verifier"]))
    assert len(rounds) == requests["rounds"].sum()
    batches = load_batches(tmp_path)
    assert set(batches["verifier"]) == {0, 1} and len(batches) == sum(totals.batches)


def test_rounds_false_writes_no_round_rows(tmp_path):
    execute(_compose(*TOY, "system=sled", "fleet.n=4", "fleet.duration_s=10", "fleet.rounds=false"), tmp_path)
    _, requests, rounds = load_run(tmp_path)
    assert len(requests) and len(rounds) == 0 and (requests["rounds"] > 0).all()


def test_a_killed_fleet_run_keeps_the_requests_that_finished_and_leaves_no_worker(tmp_path):
    """Records are on disk as each request ends: a run killed mid-way leaves whole rows, and
    its worker processes end with it."""
    import psutil

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", *TOY, "system=sled", "fleet.n=50",
                             "fleet.verifiers=2", "fleet.workers=2", "fleet.duration_s=100000",
                             f"hydra.run.dir={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            journal = out / "requests.jsonl"
            if journal.exists() and journal.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the fleet wrote no 20 requests in time")
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, alive
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:
            if w.is_running():
                w.kill()
    manifest, requests, rounds = load_run(out)
    assert not manifest.get("complete") and len(requests) >= 20
    assert requests["n_tokens"].gt(0).all() and set(rounds["request_id"]) <= set(requests["request_id"])
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert all(json.loads(line)["request_id"] for line in lines)


class _MemoryWatch:
    """Reads tracemalloc every ``every`` requests of a fleet run: the memory still held once
    the garbage is collected (what a leak would grow) and the peak since the last reading
    (what the garbage between the fleet's own collections adds)."""

    def __init__(self, every: int):
        self.every, self.requests, self.held, self.peaks = every, 0, [], []

    def on_request(self, record, item) -> None:
        self.requests += 1
        if self.requests % self.every == 0:
            self.peaks.append(tracemalloc.get_traced_memory()[1])
            gc.collect()
            self.held.append(tracemalloc.get_traced_memory()[0])
            tracemalloc.reset_peak()


@pytest.mark.slow
def test_memory_does_not_grow_with_simulated_tokens(report):
    """Memory is set by the fleet's size, not by how long it runs. Four edges serve about
    2,400 requests, read every 128: the memory held after collection in the last third of the
    run is the first third's (a leak of 20 bytes a request would show), and the peak, garbage
    between the fleet's own collections (every max(GC_EVERY, 2 N) requests) included, is too.
    Few edges keep the requests in flight, which a reading catches at random, to some 30 KB."""
    draft, target = _pair()
    _fleet("sled", _plan(4, arrival={"kind": "closed"}, duration=2.0), _templates(), draft, target)  # warm caches
    watch = _MemoryWatch(128)
    spec = get_system("sled")
    gc.collect()
    tracemalloc.start()
    try:
        totals = run_fleet(spec, spec.make_config({}), draft, target,
                           _plan(4, arrival={"kind": "closed"}, duration=1200.0, slo=(2.0, 0.2)), _templates(),
                           FleetOptions(cloud_cost=CLOUD.cost, energy=VirtualEnergy.from_profiles(DEVICE, CLOUD),
                                        on_request=watch.on_request, on_batch=lambda b, v: None))
    finally:
        tracemalloc.stop()
    third = len(watch.held) // 3
    assert third >= 6 and totals.tokens > 2300 * 20, (len(watch.held), totals.tokens)
    held_first, held_last = np.median(watch.held[:third]), np.median(watch.held[-third:])
    peak_first, peak_last = max(watch.peaks[:third]), max(watch.peaks[-third:])
    report(f"fleet memory over {totals.requests} requests, {totals.tokens} tokens (tracemalloc, measured): "
          f"held {held_first:.0f} -> {held_last:.0f} B, peak {peak_first} -> {peak_last} B")
    assert held_last < held_first + 32 * 1024, (held_first, held_last)
    assert peak_last < 1.1 * peak_first, (peak_first, peak_last)


def test_the_fleet_capacity_preset_sweeps_the_three_systems_up_to_a_thousand_edges():
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=fleet_capacity"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["system"] == "centralized,sled,wisp" and params["fleet.n"].split(",")[-1] == "1000"
    assert "joblib" in cfg.hydra.launcher._target_ and cfg.fleet.duration_s > 0
    plan = make_plan(cfg).fleet
    assert plan.n == conf_option("fleet", "default")["n"] and not plan.rounds


# ---- what the simulator decides must not change when it gets faster ---------------------------
# Digests of a fixed fleet's records (every request's tokens and times, every round's timeline,
# bytes, energy and draft features, every verifier pass): first generated before the simulator's
# speed work (git bb24c8f), which left them as they were, and generated again when paper_pipesd was
# recalibrated, by code that still gave the old digests on the old pair. A change to the speed of
# the code must leave them as they are. They rest on conf/pair/paper_pipesd.yaml, its WISP
# controller, the fleet defaults, the device and network profiles and the prompts: a deliberate
# change to what is simulated regenerates them (run fleet_digest on the new code). The files' rows
# are hashed in sorted order since worker processes interleave them (the SLED run's records were
# the same row for row, so only its digest's form changed). WISP's two verifiers then became
# islands, each in its own virtual time: events at the same virtual time (devices alike, starting
# together) now run in another order, as the timer heap happens to break ties; with ties broken
# first scheduled, first run, one loop and two islands gave the same rows, so that is all that
# changed.
GOLDEN_FLEETS = {
    # one SLED verifier saturated by 60 devices (its queue grows), and WISP with its trained
    # controller on two verifiers
    "sled": (("system=sled", "fleet.n=60", "fleet.verifiers=1", "fleet.arrivals=[{kind: poisson, rate: 0.5}]"),
             "6170f3b2d3e4772e3ea2228f45b6830a12a20c1667035d132b423929c8a44599",
             {"energy_edge_j": 24101.60278791711, "energy_cloud_j": 13654.590625785395,
              "energy_edge_idle_j": 10762.44138791702, "energy_cloud_idle_j": 1228.140625785145,
              "energy_wasted_j": 875.0268000000077}),
    "wisp": (("system=wisp", "fleet.n=60", "fleet.verifiers=2", "fleet.arrivals=[{kind: poisson, rate: 0.4}]"),
             "9022a26d9bfe68b87e4c4b8de53ec5156599b011da96d204a0115f31b1a383d0",
             {"energy_edge_j": 14408.22777002126, "energy_cloud_j": 15176.170464218887,
              "energy_edge_idle_j": 3229.417370021286, "energy_cloud_idle_j": 1823.7704642189192,
              "energy_wasted_j": 379.11599999999925}),
}
_REQUEST_KEYS = ("request_id", "output_ids", "start", "end", "token_times", "bytes_up", "bytes_down", "rounds",
                 "drafted", "accepted", "verifier", "edge", "arrival")
_ROUND_KEYS = ("request_id", "round", "energy_draft_j", "energy_wasted_j", "energy_verify_j", "energy_wait_j",
               "start", "end", "drafted", "uploaded", "verified", "accepted", "emitted", "wasted", "bytes_up",
               "bytes_down", "t_draft", "t_uplink", "t_queue", "t_verify", "t_downlink", "batch_size", "committed",
               "edge_digest", "extra", "draft_conf", "draft_entropy")
_BATCH_KEYS = ("verifier", "index", "kind", "start", "end", "sessions", "rounds", "new_tokens", "context_tokens",
               "arrived", "actual_s", "predicted_s", "extra")


def fleet_digest(folder, overrides) -> tuple[str, dict]:
    """A fleet run on the paper_pipesd pair (10 s of arrivals, 32 tokens a request): the sha256 of
    its records, each file's rows in sorted order (worker processes interleave them), and its
    requests' energy summed per field."""
    import hashlib

    cfg = _compose("pair=paper_pipesd", "fleet=default", "fleet.duration_s=10", "max_new_tokens=32",
                   "workload.chat_template=false", *overrides)
    execute(cfg, folder)
    h, energy = hashlib.sha256(), {}
    for name, keys in (("requests.jsonl", _REQUEST_KEYS), ("rounds.jsonl", _ROUND_KEYS),
                       ("batches.jsonl", _BATCH_KEYS)):
        rows = [json.loads(line) for line in (folder / name).read_text().splitlines()]
        for text in sorted(json.dumps([row[k] for k in keys]) for row in rows):
            h.update(text.encode())
        if name == "requests.jsonl":
            for row in rows:
                for k in GOLDEN_FLEETS["sled"][2]:
                    energy[k] = energy.get(k, 0.0) + (row[k] or 0.0)
    return h.hexdigest(), energy


@pytest.mark.parametrize("system", sorted(GOLDEN_FLEETS))
def test_a_fixed_fleet_decides_exactly_as_before(system, tmp_path):
    """Same batches, same tokens, same virtual times, same bytes and features, bit for bit."""
    overrides, digest, energy = GOLDEN_FLEETS[system]
    got, got_energy = fleet_digest(tmp_path / "run", overrides)
    assert got == digest
    assert got_energy == pytest.approx(energy, rel=1e-9)


def test_the_compiled_field_checks_give_the_verdicts_of_the_annotation_walk():
    """check_fields works each message class's checks out once; every annotation the messages
    use (and a few odd ones) accepts and refuses exactly the values _conforms does."""
    from systems import messages
    from systems.protocol import _checker, _conforms

    annotations = {f.type for c in vars(messages).values() if dataclasses.is_dataclass(c) and isinstance(c, type)
                   for f in dataclasses.fields(c) if isinstance(f.type, str)}
    assert {"list[int]", "int", "float | None", "np.ndarray | None"} <= annotations
    annotations |= {"list[int | None]", "list[list[int]]", "Foo", "list[Foo]", "int | list[str]"}
    values = [0, -3, True, 1.5, float("nan"), "x", None, [], (), [1, 2], [1, True], [1.0, 2], (1, 2.5), [None],
              [[1], [2]], [[1], 2], ["a"], np.zeros(3), np.int64(3), [np.int64(1)], {1: 2}, b"x", [1, "a"]]
    for annotation in annotations:
        check = _checker(annotation)
        for v in values:
            assert (check is None or bool(check(v))) == _conforms(v, annotation), (annotation, v)


def test_the_rounds_idle_sweep_sums_exactly_what_the_scan_of_every_interval_sums():
    """A request's rounds' idle edge time, window by window, from a forward sweep over the busy
    intervals (linear) equals the full scan per window (quadratic) bit for bit, in and out of
    time order."""
    from harness.compute import Busy
    from harness.energy.virtual import _BusySweep, _overlap_busy

    rng = np.random.default_rng(3)
    for trial in range(200):
        t, ivs = float(rng.uniform(0, 2)), []
        for _ in range(int(rng.integers(0, 40))):
            t += float(rng.exponential(0.05))
            d = float(rng.choice([0.0, rng.exponential(0.03)]))
            ivs.append(Busy(t, t + d))
            t += d
        if trial % 5 == 0:
            rng.shuffle(ivs)
        bounds = np.sort(rng.uniform(0, t + 0.5, size=int(rng.integers(1, 20))))
        sweep, prev = _BusySweep(ivs), 0.0
        for b in bounds.tolist():
            assert sweep.overlap(prev, max(prev, b)) == _overlap_busy(ivs, prev, max(prev, b))
            prev = max(prev, b)


def test_a_verdicts_draft_statistics_in_one_block_are_those_of_each_row():
    """The judged tokens' confidence and entropy (rounds' draft_conf / draft_entropy, what
    fit-pair reads) worked out for the block equal systems.sampling's per-row figures."""
    from systems.api import DraftToken
    from systems.protocol import _draft_stats
    from systems.sampling import confidence, entropy
    from tests.test_wisp_controller import _rows_of_every_kind

    n = 0
    for block in _rows_of_every_kind():
        tokens = [DraftToken(0, 1.0, None, row) for row in block]
        _draft_stats(tokens)
        for d, row in zip(tokens, block):
            with np.errstate(invalid="ignore"):  # a masked row's entropy is NaN either way
                got, want = (d.confidence, d.entropy), (confidence(row), entropy(row))
            assert np.allclose(got, want, rtol=0.0, atol=1e-12, equal_nan=True)
            n += 1
    assert n > 400
