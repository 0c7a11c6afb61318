"""Energy meters (NVML, RAPL, CPU-time estimate), the auto chain, and virtual-time attribution."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.energy import (
    ABSENT,
    ALREADY_CLAIMED,
    DEFAULT_W_PER_THREAD,
    NO_PERMISSION,
    UNSUPPORTED,
    CpuTimeMeter,
    EnergyUnavailable,
    NvmlMeter,
    RaplMeter,
    VirtualEnergy,
    energy_config,
    process_tree_cpu_seconds,
    select_meter,
    select_meters,
)
from harness.energy.estimate import _proc_cpu_seconds
from harness.energy.report import joules_per_token
from harness.inprocess import RunOptions, run_system
from harness.profiles import RoleProfile
from systems.api import GenerationRequest
from systems.engines import create_engine

MAX_UJ = 262143328850


# ---- RAPL: a fake powercap tree ------------------------------------------------------------------


def _zone(path: Path, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


@pytest.fixture
def powercap(tmp_path):
    root = tmp_path / "powercap"
    pkg0 = _zone(root / "intel-rapl:0", "package-0", 1_000_000)
    core = _zone(pkg0 / "intel-rapl:0:0", "core", 0)
    dram = _zone(pkg0 / "intel-rapl:0:1", "dram", 10)
    pkg1 = _zone(root / "intel-rapl:1", "package-1", MAX_UJ - 500_000)  # about to wrap
    psys = _zone(root / "intel-rapl:2", "psys", 0)  # the platform: contains the packages
    (root / "intel-rapl-mmio:0").mkdir()  # another interface, not read
    return SimpleNamespace(root=root, pkg0=pkg0, core=core, dram=dram, pkg1=pkg1, psys=psys)


def _set(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_packages_handles_wrap_and_keeps_subzones_apart(powercap):
    meter = RaplMeter("cloud", powercap.root)
    assert meter.kind == "measured" and meter.resources == ("rapl:package-0", "rapl:package-1")
    meter.begin("w")
    _set(powercap.pkg0, 3_000_000)  # +2 J
    _set(powercap.pkg1, 1_500_000)  # wrapped: (max - before) + after = +2 J
    _set(powercap.core, 1_500_000)  # +1.5 J, part of package-0: must not be added again
    _set(powercap.dram, 500_010)
    _set(powercap.psys, 9_000_000)
    r = meter.end("w")
    assert r.joules == pytest.approx(4.0) and r.kind == "measured" and r.reason is None
    assert r.detail["packages"] == {"package-0": pytest.approx(2.0), "package-1": pytest.approx(2.0)}
    assert r.detail["subzones"] == {"package-0/core": pytest.approx(1.5), "package-0/dram": pytest.approx(0.5)}
    assert r.detail["others"] == {"psys": pytest.approx(9.0)}
    assert "package-0+package-1" in r.source


def test_rapl_absent_and_no_permission_are_different_reasons(tmp_path, powercap):
    with pytest.raises(EnergyUnavailable) as absent:
        RaplMeter("edge", tmp_path / "nowhere")
    assert absent.value.code == ABSENT and "no powercap" in absent.value.reason
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnergyUnavailable) as empty:
        RaplMeter("edge", tmp_path / "empty")
    assert empty.value.code == ABSENT

    # Tests run as root, which reads a 0400 file anyway: simulate EACCES in the reader.
    def read(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return path.read_text()

    with pytest.raises(EnergyUnavailable) as denied:
        RaplMeter("edge", powercap.root, read=read)
    assert denied.value.code == NO_PERMISSION
    assert "no permission" in denied.value.reason and "energy_uj" in denied.value.reason


def test_rapl_wrap_with_unknown_range_is_null_with_reason(tmp_path):
    root = tmp_path / "pc"
    pkg = _zone(root / "intel-rapl:0", "package-0", 5_000_000)
    (pkg / "max_energy_range_uj").write_text("garbage\n")
    meter = RaplMeter("cloud", root)
    meter.begin("w")
    _set(pkg, 10)
    r = meter.end("w")
    assert r.joules is None and r.kind is None and "wrapped" in r.reason


# ---- NVML: a fake module -------------------------------------------------------------------------


class _NVMLError(Exception):
    def __init__(self, value):
        super().__init__({12: "NVML Shared Library Not Found", 3: "Not Supported"}.get(value, f"error {value}"))
        self.value = value


def fake_nvml(energy_mj=None, power_mw=None, init_error=None, count=1):
    """A pynvml stand-in: ``energy_mj`` / ``power_mw`` are lists consumed per call (None: not supported)."""
    calls = {"shutdown": 0}

    def init():
        if init_error is not None:
            raise _NVMLError(init_error)

    def energy(handle):
        if energy_mj is None:
            raise _NVMLError(3)
        return energy_mj.pop(0) if len(energy_mj) > 1 else energy_mj[0]

    def power(handle):
        if power_mw is None:
            raise _NVMLError(3)
        return power_mw.pop(0) if len(power_mw) > 1 else power_mw[0]

    def shutdown():
        calls["shutdown"] += 1

    return SimpleNamespace(
        NVMLError=_NVMLError, NVML_ERROR_NOT_SUPPORTED=3, NVML_ERROR_NO_PERMISSION=4, calls=calls,
        nvmlInit=init, nvmlShutdown=shutdown, nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}", nvmlDeviceGetName=lambda h: b"Fake GPU",
        nvmlDeviceGetTotalEnergyConsumption=energy, nvmlDeviceGetPowerUsage=power,
    )


def test_nvml_counter_is_differenced(monkeypatch, tmp_path):
    # probe, begin, end
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=[5, 1_000_000, 1_250_000]))
    meter = select_meter("cloud", {"mode": "auto", "powercap_root": str(tmp_path / "none")})
    assert isinstance(meter, NvmlMeter) and meter.tried == [{"meter": "nvml", "ok": True, "code": None, "reason": None}]
    with meter.window("req") as out:
        pass
    r = out["reading"]
    assert r.joules == pytest.approx(250.0) and r.kind == "measured" and "gpu0 counter" in r.source
    assert meter.describe()["constants"]["names"] == {0: "Fake GPU"}
    meter.close()


def test_nvml_without_counter_integrates_sampled_power():
    t = [0.0]
    nvml = fake_nvml(power_mw=[100_000, 100_000, 200_000, 200_000])  # probe, integrator start, samples
    meter = NvmlMeter("cloud", nvml=nvml, clock=lambda: t[0], start_sampler=False)
    assert meter.sampled == [0] and "power sampled at 20 Hz" in meter.source
    meter.begin("w")
    t[0] = 1.0
    meter._sampler.sample()  # 100 W -> 200 W over 1 s: 150 J (trapezoid)
    t[0] = 2.0
    meter._sampler.sample()  # 200 W for 1 s: 200 J
    t[0] = 2.5  # no sample yet: extended at the last power, 100 J
    r = meter.end("w")
    assert r.joules == pytest.approx(450.0) and r.kind == "measured"
    meter.close()
    assert nvml.calls["shutdown"] == 1


def test_nvml_sampler_thread_runs_at_least_10_hz():
    with pytest.raises(ValueError, match="sample_hz"):
        NvmlMeter("cloud", nvml=fake_nvml(power_mw=[50_000]), sample_hz=5)
    meter = NvmlMeter("cloud", nvml=fake_nvml(power_mw=[50_000]), sample_hz=50)
    meter.begin("w")
    time.sleep(0.3)
    r = meter.end("w")
    meter.close()
    assert meter_samples_ok(r, 50.0)


def meter_samples_ok(reading, watts):
    return reading.joules == pytest.approx(watts * reading.seconds, rel=0.05)


def test_nvml_absent_reasons(monkeypatch):
    with pytest.raises(EnergyUnavailable) as lib:
        NvmlMeter("cloud", nvml=fake_nvml(init_error=12))
    assert lib.value.code == ABSENT and "Shared Library Not Found" in lib.value.reason
    with pytest.raises(EnergyUnavailable) as none:
        NvmlMeter("cloud", nvml=fake_nvml(energy_mj=[1], count=0))
    assert "no GPU" in none.value.reason
    with pytest.raises(EnergyUnavailable) as nothing:
        NvmlMeter("cloud", nvml=fake_nvml())
    assert "no power reading" in nothing.value.reason and nothing.value.code == UNSUPPORTED
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with pytest.raises(EnergyUnavailable, match="nvidia-ml-py is not installed"):
        NvmlMeter("cloud")


def test_roles_on_one_machine_do_not_share_a_counter(monkeypatch, tmp_path, powercap):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=[0]))
    meters = select_meters({"powercap_root": str(powercap.root)}, cpu_seconds=lambda: 0.0)
    assert meters["cloud"].name == "nvml" and meters["edge"].name == "rapl"
    edge_tried = meters["edge"].tried
    assert [t["meter"] for t in edge_tried] == ["nvml", "rapl"] and edge_tried[0]["code"] == ALREADY_CLAIMED
    # with one counter only, the second role falls back to the estimate of its own processes
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=[0]))
    meters = select_meters({"powercap_root": str(tmp_path / "none")}, cpu_seconds=lambda: 0.0)
    assert meters["edge"].name == "estimate" and meters["edge"].kind == "estimated"
    assert [t["code"] for t in meters["edge"].tried] == [ALREADY_CLAIMED, ABSENT, None]


# ---- the estimate --------------------------------------------------------------------------------


def _fake_times(cpu, wall):
    """An injected CPU-time source and clock that step through the given values."""
    cpu, wall = list(cpu), list(wall)
    return (lambda: cpu.pop(0)), (lambda: wall.pop(0))


def test_estimate_formula_with_injected_clock():
    cpu, clock = _fake_times([0.0, 10.0, 13.0], [100.0, 104.0])  # probe, begin, end
    meter = CpuTimeMeter("edge", tdp_w=8.0, hw_threads=2, static_w=1.0, cpu_seconds=cpu, clock=clock)
    meter.begin("w")
    r = meter.end("w")
    # 3 CPU-s x 8 W / 2 threads + 1 W x 4 s
    assert r.joules == pytest.approx(16.0) and r.kind == "estimated" and r.seconds == 4.0
    assert r.model == "E = cpu_s * tdp_w / hw_threads + static_w * wall_s"
    assert r.constants["w_per_thread"] == 4.0 and r.detail["cpu_s"] == 3.0


def test_estimate_constants_default_profile_and_flag():
    cpu, clock = _fake_times([0.0, 0.0, 2.0], [0.0, 1.0])
    meter = CpuTimeMeter("edge", hw_threads=2, cpu_seconds=cpu, clock=clock)
    meter.begin("w")
    r = meter.end("w")
    assert r.joules == pytest.approx(2.0 * DEFAULT_W_PER_THREAD)
    assert "CodeCarbon" in r.constants["constants_from"] and r.constants["static_w"] == 0.0

    profile = RoleProfile("laptop", "declared", "test", 0.01, 0.001, tdp_w=45.0, hw_threads=22, idle_w=5.0)
    m = select_meter("edge", "estimate", profile=profile, cpu_seconds=lambda: 0.0)
    assert m.tried == [{"meter": "estimate", "ok": True, "code": None, "reason": None}]
    assert (m.constants["tdp_w"], m.constants["hw_threads"], m.constants["static_w"]) == (45.0, 22, 5.0)
    assert "device profile 'laptop'" in m.constants["constants_from"]
    m = select_meter("edge", {"mode": "estimate", "cpu_tdp_w": 10.0, "hw_threads": 4, "static_w": 0.0},
                     profile=profile, cpu_seconds=lambda: 0.0)
    assert (m.constants["w_per_thread"], m.constants["static_w"]) == (2.5, 0.0)
    assert "flag energy.cpu_tdp_w" in m.constants["constants_from"]


def test_estimate_of_this_process_over_a_busy_loop():
    meter = CpuTimeMeter("edge", hw_threads=2)
    meter.begin("busy")
    t0 = time.process_time()
    x = 0
    while time.process_time() - t0 < 0.1:
        x += 1
    r = meter.end("busy")
    assert r.kind == "estimated" and r.joules > 0 and r.detail["cpu_s"] >= 0.05
    psutil_s = process_tree_cpu_seconds()
    assert _proc_cpu_seconds(os.getpid()) == pytest.approx(psutil_s, abs=0.1)  # the /proc fallback agrees


def test_mode_none_and_bad_config():
    m = select_meter("edge", "none")
    m.begin("w")
    r = m.end("w")
    assert r.joules is None and r.kind is None and r.reason == "energy=none: not requested"
    with pytest.raises(ValueError, match="energy.mode"):
        energy_config({"mode": "sometimes"})
    with pytest.raises(ValueError, match="unknown key"):
        energy_config({"mode": "auto", "tdp": 3})
    with pytest.raises(ValueError, match="already open"):
        m.begin("x")
        m.begin("x")


# ---- the chain on this machine, and real counters where they exist -------------------------------


def _counters_here() -> dict[str, str | None]:
    """Why each hardware meter is unusable here (None: it works)."""
    out = {}
    for name, make in (("nvml", lambda: NvmlMeter("probe")), ("rapl", lambda: RaplMeter("probe"))):
        try:
            make().close()
            out[name] = None
        except EnergyUnavailable as exc:
            out[name] = exc.reason
    return out


def test_auto_chain_on_this_machine_says_why():
    why = _counters_here()
    meter = select_meter("edge", "auto")
    tried = meter.tried
    assert [t["meter"] for t in tried] == ["nvml", "rapl", "estimate"][: len(tried)]
    assert tried[-1]["ok"] and all(not t["ok"] and t["reason"] for t in tried[:-1])
    if why["nvml"] and why["rapl"]:  # no counter (this project's machines): the labelled estimate
        assert meter.name == "estimate" and meter.kind == "estimated"
        assert tried[0]["reason"] == why["nvml"] and tried[1]["reason"] == why["rapl"]
        assert meter.reason == f"nvml: {why['nvml']}; rapl: {why['rapl']}"
        assert meter.describe()["reason"] == meter.reason
    meter.close()


_WHY = _counters_here()


@pytest.mark.skipif(bool(_WHY["nvml"] and _WHY["rapl"]),
                    reason=f"no energy counter here: nvml: {_WHY['nvml']}; rapl: {_WHY['rapl']}")
def test_real_counter_over_a_busy_loop():
    meter = NvmlMeter("cloud") if _WHY["nvml"] is None else RaplMeter("cloud")
    meter.begin("busy")
    t0 = time.perf_counter()
    x = 0.0
    while time.perf_counter() - t0 < 0.5:
        x += 1.0
    r = meter.end("busy")
    meter.close()
    assert r.kind == "measured" and r.joules is not None
    assert 0.0 < r.joules and 0.1 < r.watts < 5000.0, r  # a package or a GPU, not a power plant


# ---- virtual time: attribution per request and per round -----------------------------------------


EDGE = RoleProfile("edge-dev", "declared", "test", step_s=0.01, prefill_s_per_token=0.001,
                   active_w=10.0, idle_w=1.0, power_source="test")
CLOUD = RoleProfile("cloud-dev", "declared", "test", step_s=0.02, prefill_s_per_token=0.0005,
                    verify_s_per_token=0.001, batch_s_per_session=0.002, active_w=300.0, idle_w=50.0)


def _pair():
    return (create_engine("toy", role="draft", vocab_size=8, seed=1),
            create_engine("toy", role="target", vocab_size=8, seed=1))


class _Costs:
    """A device cost that remembers what it charged."""

    def __init__(self, profile):
        self.profile, self.charged = profile, []

    def __call__(self, op):
        seconds = self.profile.cost(op)
        self.charged.append((op.kind, seconds))
        return seconds

    @property
    def busy(self):
        return sum(s for _, s in self.charged)


def _run(system, n=1, clients=1, energy=None, edge=EDGE, cloud=CLOUD, costs=True, **kw):
    draft, target = _pair()
    ec, cc = _Costs(edge), _Costs(cloud)
    reqs = [GenerationRequest(f"r{i}", [1, 2, 3, i % 5], 24, seed=i) for i in range(n)]
    energy = energy if energy is not None else VirtualEnergy.from_profiles(edge, cloud)
    options = RunOptions(edge_cost=ec if costs else None, cloud_cost=cc if costs else None, clients=clients,
                         energy=energy, **kw)
    return run_system(system, draft, target, reqs, options=options), ec, cc


def test_virtual_energy_per_request_is_busy_times_active_plus_idle_times_idle():
    from harness.link import LinkProfile

    (rec,), ec, cc = _run("vanilla", link=LinkProfile("wan", rtt_s=0.05))
    e = rec.energy
    assert e["edge_kind"] == e["cloud_kind"] == e["kind"] == "estimated" and e["reason"] is None
    assert e["edge_j"] == pytest.approx(ec.busy * 10.0 + (rec.e2e - ec.busy) * 1.0)
    assert e["cloud_j"] == pytest.approx(cc.busy * 300.0 + (rec.e2e - cc.busy) * 50.0)
    assert e["edge_idle_j"] == pytest.approx(rec.e2e - ec.busy) and e["cloud_idle_j"] > 0
    # per round: drafting at active power, waiting at idle power, verification at the cloud's
    prefill_s = ec.charged[0][1]
    assert ec.charged[0][0] == "prefill"
    for r in rec.rounds:
        assert r.energy_kind == "estimated" and r.energy_reason is None
        assert r.energy_draft_j == pytest.approx(r.t_draft * 10.0)
        assert r.energy_verify_j == pytest.approx(r.t_verify * 300.0 / r.batch_size)
        assert r.energy_wait_j > 0  # a 50 ms round trip per round, idle at 1 W
    tail = rec.end - max(r.end for r in rec.rounds)
    parts = prefill_s * 10.0 + sum(r.energy_draft_j + r.energy_wait_j for r in rec.rounds) + tail * 1.0
    assert parts == pytest.approx(e["edge_j"])  # rounds partition the edge's time, prefill and tail apart


def test_discarded_draft_tokens_cost_joules():
    (rec,), ec, _ = _run("vanilla")
    wasted = [r for r in rec.rounds if r.wasted]
    assert wasted, "the toy pair rejects some drafts"
    for r in rec.rounds:
        assert r.energy_wasted_j == pytest.approx(r.energy_draft_j * r.wasted / r.drafted if r.drafted else 0.0)
    assert all(r.energy_wasted_j > 0 for r in wasted)
    assert rec.energy["wasted_j"] > 0
    assert rec.energy["wasted_j"] == pytest.approx(sum(r.energy_wasted_j for r in rec.rounds))
    # every drafted token, accepted or not, was paid for at the edge's active power
    draft_s = sum(s for kind, s in ec.charged if kind == "draft")
    assert sum(r.energy_draft_j for r in rec.rounds) == pytest.approx(draft_s * 10.0)


def test_shared_cloud_time_is_split_not_double_counted():
    busy_only = RoleProfile("c", "declared", "t", step_s=0.02, prefill_s_per_token=0.0005, verify_s_per_token=0.001,
                            batch_s_per_session=0.002, active_w=1.0, idle_w=0.0)
    recs, _, cc = _run("vanilla", n=4, clients=2, cloud=busy_only)
    assert sum(r.energy["cloud_j"] for r in recs) == pytest.approx(cc.busy)  # 1 W: joules = seconds
    idle_only = RoleProfile("c", "declared", "t", step_s=0.02, prefill_s_per_token=0.0005, active_w=0.0, idle_w=1.0)
    recs, _, cc = _run("cloud_only", n=4, clients=2, cloud=idle_only)
    span = max(r.end for r in recs) - min(r.start for r in recs)
    assert sum(r.energy["cloud_j"] for r in recs) == pytest.approx(span - cc.busy)  # requests cover the run


def test_baselines_and_missing_models():
    (rec,), ec, _ = _run("edge_only")
    assert rec.energy["cloud_j"] == 0.0 and rec.energy["edge_j"] == pytest.approx(ec.busy * 10.0)
    (rec,), _, cc = _run("cloud_only")
    assert rec.energy["edge_j"] == pytest.approx(rec.e2e * 1.0)  # the edge only waits
    assert rec.energy["cloud_j"] == pytest.approx(cc.busy * 300.0 + (rec.e2e - cc.busy) * 50.0)
    # a profile without power: null with the reason, never 0
    bare = RoleProfile("bare", "declared", "t", step_s=0.01, prefill_s_per_token=0.001)
    (rec,), _, _ = _run("vanilla", edge=bare)
    assert rec.energy["edge_j"] is None and "declares no power" in rec.energy["reason"]
    assert rec.energy["cloud_j"] > 0 and rec.rounds[0].energy_draft_j is None
    # no device costs: no busy time to price
    (rec,), _, _ = _run("vanilla", costs=False)
    assert rec.energy["edge_j"] is None and rec.energy["cloud_j"] is None
    assert "instant compute" in rec.energy["reason"]
    # energy=none and no energy option at all
    (rec,), _, _ = _run("vanilla", energy=VirtualEnergy.from_profiles(EDGE, CLOUD, "none"))
    assert rec.energy["edge_j"] is None and rec.energy["reason"] == "energy=none: not requested"
    draft, target = _pair()
    (rec,) = run_system("vanilla", draft, target, [GenerationRequest("r", [1, 2], 8)],
                        options=RunOptions(edge_cost=EDGE.cost, cloud_cost=CLOUD.cost))
    assert rec.energy["edge_j"] is None and "no RunOptions.energy" in rec.energy["reason"]


def test_joules_per_token_keeps_kinds_apart():
    (rec,), _, _ = _run("vanilla")
    value, kind, reason = joules_per_token([rec], "edge")
    assert value == pytest.approx(rec.energy["edge_j"] / rec.n_tokens) and kind == "estimated" and reason is None
    other = SimpleNamespace(n_tokens=3, energy={"edge_j": 1.0, "edge_kind": "measured"})
    assert joules_per_token([rec, other], "edge")[0] is None
    assert "different kinds" in joules_per_token([rec, other], "edge")[2]


def test_records_carry_energy_to_disk(tmp_path):
    import pyarrow.parquet as pq

    from harness.results import ENERGY_NOT_MEASURED, RunWriter, build_manifest

    (rec,), _, _ = _run("vanilla")
    energy = VirtualEnergy.from_profiles(EDGE, CLOUD)
    manifest = build_manifest({"system": "vanilla"}, {"clock": "virtual", "energy": energy.describe()})
    assert manifest["energy"]["edge"]["kind"] == "estimated" and manifest["energy"]["edge"]["constants"]["active_w"] == 10
    with RunWriter(tmp_path / "run", manifest) as w:
        w.append(rec, {"system": "vanilla", "prompt_id": "a"})  # record.energy by default
        w.append(rec, {"system": "vanilla", "prompt_id": "b"},
                 energy={"edge_j": 2.0, "edge_kind": "estimated", "cloud_j": 5.0, "cloud_kind": "measured"})
        w.append(rec, {"system": "vanilla", "prompt_id": "c"}, energy={"reason": "energy=none"})
    rows = {r["prompt_id"]: r for r in pq.read_table(tmp_path / "run" / "requests.parquet").to_pylist()}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a["energy_edge_j"] == pytest.approx(rec.energy["edge_j"]) and a["energy_kind"] == "estimated"
    assert a["energy_wasted_j"] == pytest.approx(rec.energy["wasted_j"])
    assert (b["energy_edge_kind"], b["energy_cloud_kind"], b["energy_kind"]) == ("estimated", "measured", None)
    assert c["energy_edge_j"] is None and c["energy_edge_kind"] is None and c["energy_reason"] == "energy=none"
    rounds = pq.read_table(tmp_path / "run" / "rounds.parquet").to_pylist()
    assert all(r["energy_kind"] == "estimated" and r["energy_draft_j"] is not None for r in rounds)
    assert ENERGY_NOT_MEASURED.startswith("not measured")


def test_profiles_accept_power_fields_and_reject_bad_ones():
    assert RoleProfile("x", "declared", "t", 0.01, 0.001).active_w is None  # old profiles stay valid
    with pytest.raises(ValueError, match="active_w"):
        RoleProfile("x", "declared", "t", 0.01, 0.001, active_w=-1.0)
    with pytest.raises(ValueError, match="hw_threads"):
        RoleProfile("x", "declared", "t", 0.01, 0.001, hw_threads=0)


def test_run_config_energy_group(tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, ConfigError, execute, make_plan

    def cfg(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose(config_name="config", overrides=["pair=toy", "workload.chat_template=false",
                                                            "workload.size=1", "max_new_tokens=6", *overrides])

    assert make_plan(cfg()).energy.mode == "auto"
    with pytest.raises(ConfigError, match="energy.mode"):
        make_plan(cfg("energy.mode=sometimes"))
    (rec,) = execute(cfg(), run_dir=tmp_path / "auto")
    assert rec.energy["kind"] == "estimated" and rec.energy["edge_j"] > 0
    m = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert m["energy"]["cloud"]["kind"] == "estimated" and "virtual time" in m["energy"]["cloud"]["reason"]
    (rec,) = execute(cfg("energy=none"), run_dir=tmp_path / "none")
    assert rec.energy["edge_j"] is None
    m = json.loads((tmp_path / "none" / "manifest.json").read_text())
    assert m["energy"]["edge"]["kind"] is None and m["energy"]["edge"]["reason"] == "energy=none: not requested"
