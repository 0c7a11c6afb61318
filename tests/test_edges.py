"""The edges config group: devices, networks and arrivals per edge, SLOs recorded per request,
and a multi-edge run written as each request finishes (toy pair, virtual time)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from harness.edges import edges_plan, slo_met
from harness.results import load_batches, load_run
from harness.run import CONF_DIR, ConfigError, conf_option, execute, make_plan

TOY = ("pair=toy", "workload.chat_template=false", "max_new_tokens=12")


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_edges_take_devices_and_networks_in_turn():
    plan = make_plan(_compose(*TOY, "edges=mixed", "edges.n=5"))
    assert [e.name for e in plan.edges.edges] == ["e0", "e1", "e2", "e3", "e4"]
    assert [e.device.name for e in plan.edges.edges] == ["laptop", "phone_2.5ghz", "iot_1.2ghz", "laptop",
                                                         "phone_2.5ghz"]
    assert [e.network for e in plan.edges.edges] == ["wan_50ms_10mbit", "4g", "lan", "wan_50ms_10mbit", "4g"]
    assert plan.edges.edges[1].link.rtt_s != plan.edges.edges[2].link.rtt_s
    assert plan.edges.shared_time and plan.edges.assign(7) == [0, 1, 2, 3, 4, 0, 1]


def test_switching_the_arrival_kind_keeps_only_the_keys_it_uses():
    plan = make_plan(_compose(*TOY, "edges=mixed", "edges.arrivals.kind=closed"))
    assert dict(plan.edges.arrivals) == {"kind": "closed"}


def test_one_edge_closed_loop_is_the_single_device_run():
    plan = make_plan(_compose(*TOY))
    assert plan.edges.n == 1 and not plan.edges.shared_time
    assert plan.edges.edges[0].device == plan.edge and plan.edges.arrival_times(3, 0) == [None] * 3


def test_each_edge_draws_its_own_seeded_poisson_arrivals():
    from workloads.arrivals import Poisson

    plan = make_plan(_compose(*TOY, "edges.n=2", "edges.arrivals.kind=poisson", "edges.arrivals.rate=2.0"))
    times = plan.edges.arrival_times(6, seed=5)
    assert times == plan.edges.arrival_times(6, seed=5)  # seeded
    assert times[0::2] == pytest.approx(list(Poisson(2.0, seed=5).times(3)))  # edge 0: seed + 0
    assert times[1::2] == pytest.approx(list(Poisson(2.0, seed=6).times(3)))  # edge 1: seed + 1


@pytest.mark.parametrize("overrides,message", [
    (("edges.n=0",), "edges.n must be a positive integer"),
    (("edges.devices=[nosuch]",), "unknown device 'nosuch'"),
    (("edges.networks=[lann]",), "unknown network 'lann'"),
    (("edges.arrivals.kind=burst",), "edges.arrivals.kind must be one of closed, poisson, gamma"),
    (("edges.arrivals.kind=poisson", "edges.arrivals.rate=-1"), "rate must be a positive number"),
    (("edges.n=2", "workload.turns=2"), "first turns only: set workload.turns=1"),
    (("edges=mixed", "mode=wall"), "mode=wall runs edges.n edge processes"),
    (("workload.slo.ttft_s=-2",), "workload.slo.ttft_s must be a positive number"),
])
def test_edges_mistakes_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        make_plan(_compose(*TOY, *overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_slo_met_needs_both_targets_met():
    assert slo_met(0.5, 0.1, 1.0, 0.2) is True
    assert slo_met(1.5, 0.1, 1.0, 0.2) is False
    assert slo_met(0.5, 0.3, 1.0, 0.2) is False
    assert slo_met(0.5, None, 1.0, 0.2) is True  # a one-token answer has no TPOT
    assert slo_met(None, None, 1.0, 0.2) is False
    assert slo_met(0.5, 0.1, None, None) is None


def test_a_multi_edge_run_records_edges_slos_and_batches(tmp_path):
    cfg = _compose(*TOY, "system=sled", "system.params.batch_window_s=0.05", "workload.size=6", "edges=mixed",
                   "edges.n=3", "edges.arrivals.rate=4.0",
                   "workload.slo.ttft_s=1.0", "workload.slo.tpot_s=0.3")
    records = execute(cfg, tmp_path)
    manifest, requests, rounds = load_run(tmp_path)
    assert manifest["complete"] and manifest["edges"]["n"] == 3
    edge_of = dict(zip(requests["request_id"], requests["edge"]))
    assert [edge_of[r.request_id] for r in records] == ["e0", "e1", "e2", "e0", "e1", "e2"]  # dealt in turn
    assert set(requests["edge_device"]) == {"laptop", "phone_2.5ghz", "iot_1.2ghz"}
    assert (requests["n_edges"] == 3).all() and requests["arrival"].notna().all()
    rows = {row["request_id"]: row for _, row in requests.iterrows()}
    for rec in records:
        row = rows[rec.request_id]
        assert row["start"] == pytest.approx(row["arrival"])  # timed from its arrival
        ttft, tpot = rec.ttft, rec.tpot
        assert row["slo_met"] == (ttft <= 1.0 and (tpot is None or tpot <= 0.3))
    assert requests["energy_edge_j"].notna().all()  # written as each request ended, with its joules
    batches = load_batches(tmp_path)
    assert len(batches) and batches["sessions"].map(len).max() > 1 and (batches["system"] == "sled").all()
    served = {s for ss in batches["sessions"] for s in ss}
    assert served == {f"{e}-{r}" for e, r in zip(requests["edge"], requests["request_id"])}


def test_unknown_edges_option_is_one_line_at_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", *TOY, "edges.devices=[nosuch]",
                          f"out={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown device 'nosuch'" in out.stderr
    assert "Traceback" not in out.stderr


def test_conf_option_lists_the_valid_names():
    with pytest.raises(ConfigError) as err:
        conf_option("device", "nosuch")
    assert "laptop_gpu_cloud" in str(err.value)
    assert edges_plan(None, run_device=make_plan(_compose(*TOY)).edge, run_network="loopback",
                      run_link=make_plan(_compose(*TOY)).link, option=conf_option).n == 1


def test_requests_per_edge_gives_every_edge_its_own_load(tmp_path):
    cfg = _compose(*TOY, "system=centralized", "workload.size=2", "edges.n=3", "edges.requests_per_edge=2")
    records = execute(cfg, tmp_path)
    _, requests, _ = load_run(tmp_path)
    assert len(records) == 6 and requests["request_id"].is_unique
    ids = [r.request_id for r in records]
    assert [i.split("@")[1] for i in ids] == ["e0.0", "e1.0", "e2.0", "e0.1", "e1.1", "e2.1"]
    edge_of = dict(zip(requests["request_id"], requests["edge"]))
    assert [edge_of[i] for i in ids] == ["e0", "e1", "e2", "e0", "e1", "e2"]
    # the workload's two prompts taken in turn: the same prompt gives the same (greedy) answer
    assert records[0].output_tokens == records[2].output_tokens == records[4].output_tokens
    assert records[1].output_tokens == records[3].output_tokens
