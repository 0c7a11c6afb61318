"""PicoSpec on the toy pair: bytes, timeline, pre-drafts, truncation, the performance model
and the sparse split's exactness, each checked against hand-computed figures."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from systems.api import GenerationRequest, get_system
from systems.engines import create_engine
from systems.picospec.model import ModelInputs, expected_length_eq5, inputs, predict
from systems.sampling import SamplingParams, probabilities
from tests.support import chi2_against, exact_sequence_probs, greedy_decode

PROMPT = [1, 2, 3]


def _pair(seed=1, agreement=0.6, vocab=8, sharpness=2.0):
    kw = dict(vocab_size=vocab, seed=seed, sharpness=sharpness)
    return (create_engine("toy", role="draft", agreement=agreement, **kw),
            create_engine("toy", role="target", **kw))


def _costs(t_draft=0.02, t_verify=0.01):
    """Edge: t_draft per draft token, nothing else; cloud: t_verify per verification pass."""
    return (lambda op: t_draft if op.kind == "draft" else 0.0,
            lambda op: t_verify if op.kind == "verify" else 0.0)


def _run(config, requests, draft, target, rtt=0.08, t_draft=0.02, t_verify=0.01):
    edge_cost, cloud_cost = _costs(t_draft, t_verify)
    options = RunOptions(link=LinkProfile("wan", rtt_s=rtt), edge_cost=edge_cost, cloud_cost=cloud_cost)
    return run_system("picospec", draft, target, requests, config, options)


# ---- bytes on the wire -----------------------------------------------------------------------
# msgpack sizes of the messages (systems/messages.py), with ids and positions below 128 (one
# byte each), a q(x) scalar a float64 (9 bytes) and a session name of L characters:
#   Upload under the sparse rule:        15 + L + f + 10 n   (n drafts, f fixed corrections)
#   Upload with full fp16 rows, V = 8:   32 + L + 17 n       (1 id + 16 bytes of row per draft)
#   (the Upload counts include its SLO slack field: one byte, msgpack nil, when unset)
#   PicoVerdict:                         69 + L + 10 k       (k top-K pairs: an id and a float64)
SERIAL = {"parallel_draft": False, "fast_verify": False}  # one upload per round


@pytest.mark.parametrize("k", [3, 5])
def test_sparse_split_bytes_per_round(k):
    draft, target = _pair()
    params = SamplingParams(temperature=1.0, top_k=k)
    reqs = [GenerationRequest(f"r{i}", PROMPT, 16, params, seed=i) for i in range(8)]
    records = _run({**SERIAL, "sparse_k": k}, reqs, draft, target)
    rejected = accepted_all = 0
    for rec in records:
        name = len(f"c0-{rec.request_id}")
        fixed = 0
        for r in rec.rounds:
            assert r.n_uploads == 1
            assert r.bytes_up == 15 + name + fixed + 10 * r.uploaded, r
            rejection = r.accepted < r.verified
            assert r.bytes_down == 69 + name + (10 * k if rejection else 0), r
            assert r.extra["correction"] == ("resampled" if rejection else "bonus")
            fixed = int(rejection)  # the resampled correction rides on the next upload
            rejected += rejection
            accepted_all += not rejection
    assert rejected > 5 and accepted_all > 5


def test_full_rows_without_split_rejection():
    draft, target = _pair()
    reqs = [GenerationRequest(f"r{i}", PROMPT, 16, SamplingParams(temperature=1.0), seed=i) for i in range(4)]
    records = _run({**SERIAL, "split_rejection": False}, reqs, draft, target)
    for rec in records:
        name = len(f"c0-{rec.request_id}")
        for r in rec.rounds:
            assert r.bytes_up == 32 + name + 17 * r.uploaded, r
            assert r.bytes_down == 69 + name, r  # the cloud resamples: one id down, no pairs
            assert r.extra["correction"] in ("bonus", "cloud")


# ---- the pipeline's timeline ----------------------------------------------------------------------
def test_parallel_drafting_timeline_when_every_draft_is_accepted():
    """Draft = target, greedy: every round is a hit. Edge 20 ms a token, RTT 80 ms, a
    verification pass 10 ms, n = 4. Round 0 drafts 4 tokens (0-80 ms) and is submitted at
    80 ms; its verdict is back at 80 + 40 + 10 + 40 = 170 ms. Round 1 drafts its lead and 4
    tokens from 80 ms (overlapping round 0's link and verification), done at 180 ms, and is
    submitted then; each later round likewise: a cycle of max(5 x 20, 90) = 100 ms for 5 tokens."""
    draft, target = _pair(agreement=1.0)
    req = GenerationRequest("g", PROMPT, 20, SamplingParams())
    (rec,) = _run({"fast_verify": False}, [req], draft, target)
    assert rec.output_tokens == greedy_decode(target, PROMPT, 20)[0]
    r = rec.rounds
    assert [x.emitted for x in r] == [5, 5, 5, 5]
    # the lead of a kept pre-drafted round is the verdict's own token: drafted, never uploaded
    assert [x.drafted for x in r] == [4, 5, 5, 5] and [x.uploaded for x in r] == [4, 4, 4, 4]
    assert [x.verified for x in r] == [4, 4, 4, 4]
    assert [x.start for x in r] == pytest.approx([0.0, 0.08, 0.18, 0.28])
    # settled after the draft in hand; the last round has nothing drafted beyond it
    assert [x.end for x in r] == pytest.approx([0.18, 0.28, 0.38, 0.47])
    assert r[0].t_uplink == pytest.approx(0.04) and r[0].t_downlink == pytest.approx(0.04)
    assert r[0].t_verify == pytest.approx(0.01) and r[0].t_queue == pytest.approx(0.0)
    verdict_0 = 0.08 + r[0].t_uplink + r[0].t_verify + r[0].t_downlink
    assert r[1].start < verdict_0 == pytest.approx(0.17)  # round 1 was drafted while round 0 was in flight
    for x in r[:-1]:
        assert x.extra["predraft"]["kept"] and x.extra["predraft"]["discarded"] == 0
    assert rec.e2e == pytest.approx(0.47)
    (serial,) = _run({"fast_verify": False, "parallel_draft": False}, [req], draft, target)
    assert serial.output_tokens == rec.output_tokens
    assert serial.e2e == pytest.approx(4 * (0.08 + 0.09))  # stop-and-wait: draft, link, verify, link


def test_predrafts_kept_only_under_the_rule_and_discards_are_waste():
    draft, target = _pair(agreement=0.7)
    reqs = [GenerationRequest(f"p{i}", p, 24, SamplingParams(), seed=i) for i, p in enumerate([[1, 2, 3], [5], [4, 6]])]
    records = _run({"fast_verify": False}, reqs, draft, target, t_draft=0.03)
    kept = discarded = 0
    for rec, req in zip(records, reqs):
        assert rec.output_tokens == greedy_decode(target, req.prompt, 24)[0]
        rounds = rec.rounds
        for i, r in enumerate(rounds):
            pre = r.extra.get("predraft")
            if pre is None:
                continue
            rule = r.accepted == r.verified and pre["first"] == pre["verdict_token"]
            assert pre["kept"] == rule, r
            if pre["kept"]:
                kept += 1
            else:
                discarded += 1
                if i + 1 < len(rounds):  # the discarded drafts are carried into the next round's record as waste
                    nxt = rounds[i + 1]
                    assert nxt.drafted >= pre["discarded"] + nxt.uploaded
                    assert nxt.wasted >= pre["discarded"]
    assert kept > 2 and discarded > 2


def test_fast_verification_scores_streamed_tokens_early():
    """Each drafted token goes up at once. A cloud pass costs 2 ms + 10 ms a token. Once the
    cloud has seen a round's request arrive (so it can predict the next one's), it scores
    each streamed token of the pre-drafted round as it arrives (12 ms, while the request is
    still to come); the request then carries the last token only: a late part of 12 ms
    against 42 ms for the whole block."""
    draft, target = _pair(agreement=1.0)
    req = GenerationRequest("f", PROMPT, 30, SamplingParams())
    cloud_cost = lambda op: 0.002 + 0.01 * op.tokens if op.kind == "verify" else 0.0  # noqa: E731
    runs = {}
    for fast in (True, False):
        options = RunOptions(link=LinkProfile("wan", rtt_s=0.08), edge_cost=_costs()[0], cloud_cost=cloud_cost)
        (runs[fast],) = run_system("picospec", draft, target, [req], {"fast_verify": fast}, options)
    fast, slow = runs[True], runs[False]
    assert fast.output_tokens == slow.output_tokens == greedy_decode(target, PROMPT, 30)[0]
    assert fast.rounds[1].n_uploads == 6 and fast.rounds[1].extra["upload_sizes"] == [1, 1, 1, 1, 1, 0]
    for r in fast.rounds[2:]:
        assert r.extra["early_tokens"] == 3 and r.extra["t_verify_early"] == pytest.approx(3 * 0.012)
        assert r.t_verify == pytest.approx(0.012)
    assert all(r.t_verify == pytest.approx(0.042) and r.extra["t_verify_early"] == 0.0 for r in slow.rounds)
    assert fast.e2e == pytest.approx(0.716) and slow.e2e == pytest.approx(0.812)


def test_latency_aware_truncation():
    """Edge 50 ms a token, RTT 80 ms, verification 10 ms: round 0 (4 tokens, 0-200 ms) is back
    at 290 ms, so 90 ms is the predicted round trip. Round 1 began at 200 ms; at 300 ms, with
    its lead and one draft, round 0's verdict is in and 100 ms >= 90 ms: it goes at once."""
    draft, target = _pair(agreement=1.0)
    req = GenerationRequest("t", PROMPT, 20, SamplingParams())
    (rec,) = _run({"fast_verify": False}, [req], draft, target, t_draft=0.05)
    note = rec.rounds[1].extra["truncated"]
    assert note["drafts"] == 1 and rec.rounds[1].verified == 1
    assert note["drafting_s"] == pytest.approx(0.10) and note["predicted_rtt_s"] == pytest.approx(0.09)
    (full,) = _run({"fast_verify": False, "truncation": False}, [req], draft, target, t_draft=0.05)
    assert all("truncated" not in r.extra for r in full.rounds)
    assert [r.verified for r in full.rounds[:3]] == [4, 4, 4]
    assert rec.output_tokens == full.output_tokens == greedy_decode(target, PROMPT, 20)[0]


# ---- the performance model (paper §3.4) -----------------------------------------------------------
def test_performance_model_by_hand():
    m = ModelInputs(alpha=0.8, gamma=4, t_draft=0.1, t_rtt=0.05, t_verify=0.03, expected_length=3.0)
    out = predict(m)
    p_hit = 0.8 ** 4  # 0.4096
    assert out["p_hit"] == pytest.approx(p_hit)
    assert out["e_t_async_s"] == pytest.approx(p_hit * 0.1 + (1 - p_hit) * 0.18)
    assert out["throughput_async"] == pytest.approx(3.0 / (p_hit * 0.1 + (1 - p_hit) * 0.18))
    assert out["throughput_sync"] == pytest.approx(3.0 / 0.18)
    assert expected_length_eq5(0.8, 4) == pytest.approx((1 - 0.8 ** 4) / 0.2)
    assert expected_length_eq5(1.0, 4) == 4


def test_performance_model_inputs_from_the_run_records():
    """The all-hit run above: α = 1, γ = 4, T_draft = 20 ms x 19/4 uploaded tokens a round,
    T_RTT = 80 ms, T_verify = 10 ms, E[L] = 5: E[T_async] = max(95, 90) ms."""
    draft, target = _pair(agreement=1.0)
    recs = _run({"fast_verify": False}, [GenerationRequest("g", PROMPT, 20, SamplingParams())], draft, target)
    m = inputs(recs)
    assert (m.alpha, m.gamma, m.expected_length) == (1.0, 4.0, 5.0)
    assert m.t_draft == pytest.approx(0.02 * 19 / 4)
    assert m.t_rtt == pytest.approx(0.08) and m.t_verify == pytest.approx(0.01)
    rep = get_system("picospec").report(recs)
    assert rep["e_t_async_s"] == pytest.approx(0.095) and rep["throughput_async"] == pytest.approx(5 / 0.095)
    assert rep["expected_length_eq5"] == 4 and rep["throughput_async_eq5"] == pytest.approx(4 / 0.095)
    assert rep["measured_throughput"] == pytest.approx(20 / 0.47)
    assert rep["model_error"] == pytest.approx((5 / 0.095) / (20 / 0.47) - 1)
    assert "measured" in rep["summary"] and "modelled" in rep["summary"]


# ---- the sparse split's exactness ------------------------------------------------------------------
@pytest.mark.statistical
def test_sampling_exact_when_target_truncated_to_top_k(report):
    draft, target = _pair(seed=3, agreement=0.6, vocab=8, sharpness=1.0)
    k, n, length = 3, 6000, 3
    params = SamplingParams(temperature=1.0, top_k=k)
    reqs = [GenerationRequest(f"x{i}", [1, 2], length, params, seed=i) for i in range(n)]
    records = run_system("picospec", draft, target, reqs, {"sparse_k": k})
    counts = Counter(tuple(r.output_tokens) for r in records)
    pvalue = chi2_against(counts, exact_sequence_probs(target, [1, 2], length, params), n)
    report(f"picospec K={k}, target top-{k}, V=8: chi2 p-value against the target = {pvalue:.3f} "
           f"({n} samples, measured)")
    assert pvalue > 1e-3


@pytest.mark.statistical
def test_untruncated_gap_is_measured_and_reported(report):
    """The first output token's distribution is min(p, q) + P(reject) x norm(max(0, p̂ - q))
    on the target's top K (p̂ = p there, 0 elsewhere): biased when p has more support."""
    draft, target = _pair(seed=3, agreement=0.6, vocab=8, sharpness=1.0)
    k, n = 2, 8000
    params = SamplingParams(temperature=1.0)
    p = probabilities(target.logits_for([1, 2]), params)
    q = probabilities(draft.logits_for([1, 2]), params)
    top = np.argsort(-p)[:k]
    p_hat = np.zeros_like(p)
    p_hat[top] = p[top]
    residual = np.maximum(p_hat - q, 0.0)
    residual = residual / residual.sum() if residual.sum() > 0 else p_hat / p_hat.sum()
    predicted = np.minimum(p, q) + (1.0 - np.minimum(p, q).sum()) * residual
    tv_gap = 0.5 * np.abs(predicted - p).sum()
    reqs = [GenerationRequest(f"u{i}", [1, 2], 2, params, seed=i) for i in range(n)]
    records = run_system("picospec", draft, target, reqs, {"sparse_k": k})
    counts = Counter((r.output_tokens[0],) for r in records)
    measured = np.array([counts.get((v,), 0) for v in range(p.size)]) / n
    report(f"picospec K={k}, untruncated target, V=8: total-variation gap of the first token = {tv_gap:.4f} "
           f"(modelled), {0.5 * np.abs(measured - p).sum():.4f} (measured over {n} samples)")
    assert chi2_against(counts, {(v,): float(predicted[v]) for v in range(p.size) if predicted[v] > 0}, n) > 1e-3
    assert tv_gap > 0.02
    assert chi2_against(counts, {(v,): float(p[v]) for v in range(p.size)}, n) < 1e-6


def test_speculation_past_a_resampled_correction_is_discarded():
    """K = 1 and a draft that often puts more mass than the target on the target's top token:
    the clipped residual is then empty and the correction falls back to p̂, so it can equal
    the very draft token the cloud rejected. The cloud has dropped everything drafted beyond
    the rejection; the edge must drop it too, pre-drafted round included, even though its
    first token matches. Keeping it would leave edge and cloud on different prefixes."""
    draft, target = _pair(seed=5, agreement=0.8, vocab=8, sharpness=1.0)
    reqs = [GenerationRequest(f"s{i}", [1, 2, 3], 12, SamplingParams(temperature=1.0), seed=i) for i in range(150)]
    records = _run({"sparse_k": 1}, reqs, draft, target)
    same = 0
    for rec in records:
        for r in rec.rounds:
            if r.extra.get("discarded"):
                continue
            assert r.edge_digest == r.cloud_digest
            if r.extra.get("correction") != "resampled":
                continue
            if "predraft" in r.extra:
                assert not r.extra["predraft"]["kept"], r
            if r.extra["resampled_token"] == r.extra["rejected_draft"] and r.verified > r.accepted + 1:
                same += 1
    assert same >= 3, f"only {same} resampled corrections equal to the rejected draft with drafts beyond it"


# ---- presets ---------------------------------------------------------------------------------------
def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_rtt_and_n_presets_are_complete():
    from harness.grid import grid_spec
    from harness.run import network_profile

    rtt = grid_spec(_compose("experiment=picospec_rtt").grid)
    rtts = [network_profile(s.network_config()).rtt_s for s in rtt.scenarios]
    assert rtts == pytest.approx([0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4])
    assert {s.device for s in rtt.scenarios} == {"picospec_qwen"}
    assert [m.system for m in rtt.datasets[0].methods] == ["cloud_only", "vanilla", "picospec"]
    n = grid_spec(_compose("experiment=picospec_n").grid)
    ns = [m.params["n"] for m in n.datasets[0].methods if m.system == "picospec"]
    assert sorted(set(ns)) == list(range(2, 9))


def test_rtt_preset_reports_the_model_beside_the_measurement(tmp_path):
    """The preset's grid on the toy pair, three RTTs: PicoSpec's rows carry the model."""
    from omegaconf import OmegaConf

    from analysis.grid import grid_rows
    from harness.grid import run_grid

    cfg = _compose("experiment=picospec_rtt", "pair=toy", "grid.accepted_tokens=24", "grid.max_new_tokens=12",
                   "+grid.datasets.math.workload_params={chat_template: false}")
    OmegaConf.set_struct(cfg, False)
    cfg.grid.scenarios = {k: v for k, v in cfg.grid.scenarios.items() if k in ("rtt0", "rtt100", "rtt400")}
    run_grid(cfg, tmp_path / "run")
    rows = {(r["scenario"], r["method"]): r for r in grid_rows(tmp_path / "run")}
    for scenario in ("rtt0", "rtt100", "rtt400"):
        pico = rows[(scenario, "picospec")]
        assert pico["model_tok_s"] > 0 and pico["tok_s"] == pytest.approx(1e3 / pico["tpt_ms"])
        assert pico["model_error"] == pytest.approx(pico["model_tok_s"] / pico["tok_s"] - 1)
        assert "model_tok_s" not in rows[(scenario, "vanilla")]
    # stop-and-wait loses with every step of RTT
    vanilla = [rows[(s, "vanilla")]["tpt_ms"] for s in ("rtt0", "rtt100", "rtt400")]
    assert vanilla[0] < vanilla[1] < vanilla[2]
    # the curves, from the run folder alone
    from analysis.latency import latency_sweep, plot_latency_sweep

    sweep = latency_sweep(tmp_path / "run")
    pico = sweep[sweep["method"] == "picospec"]
    assert list(pico["rtt_ms"]) == [0.0, 100.0, 400.0]
    assert list(pico["model_tok_s"]) == pytest.approx([rows[(s, "picospec")]["model_tok_s"]
                                                       for s in ("rtt0", "rtt100", "rtt400")])
    assert sweep[sweep["method"] == "vanilla"]["model_tok_s"].isna().all()
    assert plot_latency_sweep(sweep, tmp_path / "latency.png").stat().st_size > 0


def test_every_picospec_run_reports_the_model(tmp_path, capsys):
    import json

    from harness.run import execute

    cfg = _compose("pair=toy", "workload.chat_template=false", "workload.size=2", "max_new_tokens=12",
                   "system=picospec", "network=picospec_wan", "device=picospec_qwen")
    records = execute(cfg, run_dir=tmp_path / "run")
    rep = json.loads((tmp_path / "run" / "manifest.json").read_text())["system_report"]
    tokens, seconds = sum(r.n_tokens for r in records), sum(r.e2e for r in records)
    assert rep["measured_throughput"] == pytest.approx(tokens / seconds)
    assert rep["inputs"] == pytest.approx(inputs(records).__dict__)
    assert rep["summary"] in capsys.readouterr().out


def test_table1_preset_carries_the_papers_figures():
    from harness.grid import grid_spec

    spec = grid_spec(_compose("experiment=picospec_table1").grid)
    assert [s.device for s in spec.scenarios] == ["picospec_qwen", "picospec_llama"]
    paper_speedup = {"humaneval": {"qwen": (0.44, 1.13, 0.53), "llama": (1.45, 2.90, 0.66)},
                     "math": {"qwen": (0.58, 1.45, 0.54), "llama": (1.35, 2.51, 0.63)}}  # vanilla, PicoSpec, split
    for d in spec.datasets:
        names = [m.name for m in d.methods]
        assert names == ["ar", "vanilla", "picospec", "wo_parallel_draft", "wo_fast_verify", "wo_split_rejection",
                         "split"]
        split = d.methods[-1]
        assert (split.system, split.params, split.pair) == ("split_inference", {"edge_layers": 3}, "qwen25coder-hf")
        for scenario, (vanilla, pico, split_inf) in paper_speedup[d.name].items():
            tpt = d.paper["tpt_ms"][scenario]
            assert tpt[0] / tpt[1] == pytest.approx(vanilla, abs=0.01)
            assert tpt[0] / tpt[2] == pytest.approx(pico, abs=0.01)
            assert tpt[0] / tpt[6] == pytest.approx(split_inf, abs=0.005)


def test_a_sweep_prints_and_records_the_model_for_picospec(tmp_path):
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "harness.cli", "run", "experiment=bench", "pair=toy",
                          "system=picospec,vanilla", "network=lan", "workload.size=2", "max_new_tokens=12",
                          f"out={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "bench-toy"
    report = json.loads((sweep / "picospec-lan" / "manifest.json").read_text())["system_report"]
    assert "system_report" not in json.loads((sweep / "vanilla-lan" / "manifest.json").read_text())
    assert f"  {report['summary']}" in res.stdout


def test_wall_mode_on_the_toy_pair_is_lossless(tmp_path):
    """Edge and cloud as separate processes over gRPC (wall clock): greedy output equals the
    target's own decode, edge and cloud agree after every verdict, and PicoSpec's records
    (early verification, pre-drafts) cross the process boundary."""
    from harness.pairs import ensure_pair, load_pair, open_engines
    from harness.wall import run_wall

    requests = [GenerationRequest(f"w{i}", [1 + i, 2, 3], 24, seed=i) for i in range(3)]
    pair = load_pair("toy")
    _, target = open_engines(pair, ensure_pair(pair, progress=False))
    records = run_wall("picospec", "toy", requests, clients=2, timeout_s=60, workdir=tmp_path)
    for req, rec in zip(requests, records):
        assert rec.error is None
        assert rec.output_tokens == greedy_decode(target, req.prompt, req.max_new_tokens)[0]
        live = [r for r in rec.rounds if not r.extra.get("discarded")]
        assert live and all(r.edge_digest == r.cloud_digest for r in live)
        assert all("t_verify_early" in r.extra for r in live)


def test_latency_immunity_on_the_toy_pair(report):
    """Every draft accepted (draft = target), 50 ms a draft token, a 10 ms verification pass,
    n = 4: n·t_d = 200 ms >= RTT + T_verify up to an RTT of 190 ms. PicoSpec keeps within
    10% of its zero-RTT throughput there (what it loses is each request's first and last
    round, which nothing overlaps) and falls beyond it; stop-and-wait falls from the first
    step. The model (§3.4, from each run's records) is printed beside each."""
    draft, target = _pair(agreement=1.0)
    reqs = [GenerationRequest(f"q{i}", p, 40, SamplingParams()) for i, p in enumerate([[1, 2, 3], [5], [4, 6]])]
    rtts = [0.0, 0.05, 0.1, 0.3, 0.4]
    thr = {"picospec": [], "vanilla": []}
    for rtt in rtts:
        for system in thr:
            edge_cost, cloud_cost = _costs(0.05, 0.01)
            options = RunOptions(link=LinkProfile("wan", rtt_s=rtt), edge_cost=edge_cost, cloud_cost=cloud_cost)
            recs = run_system(system, draft, target, reqs, {}, options)
            thr[system].append(sum(r.n_tokens for r in recs) / sum(r.e2e for r in recs))
            if system == "picospec":
                rep = get_system(system).report(recs)
                report(f"picospec, toy pair, RTT {1e3 * rtt:.0f} ms: {thr[system][-1]:.2f} tok/s measured "
                       f"(virtual time), {rep['throughput_async']:.2f} modelled (§3.4)")
    pico, vanilla = thr["picospec"], thr["vanilla"]
    report("toy pair latency sweep (virtual time, measured): RTT ms " + ", ".join(f"{1e3 * r:.0f}" for r in rtts)
           + "; picospec " + ", ".join(f"{x:.2f}" for x in pico)
           + "; vanilla " + ", ".join(f"{x:.2f}" for x in vanilla))
    assert all(x >= 0.9 * pico[0] for x in pico[:3])
    assert pico[3] < 0.9 * pico[0] and pico[4] < pico[3]
    assert all(b < a for a, b in zip(vanilla, vanilla[1:]))
    assert all(p > v for p, v in zip(pico[1:], vanilla[1:]))


def test_model_without_parallel_drafting_is_stop_and_wait():
    """Stop-and-wait, every draft accepted: a round is 4 x 20 ms drafting + 80 ms RTT + 10 ms
    verification = 170 ms for 5 tokens, which is what the run measures (4 rounds, 0.68 s)."""
    draft, target = _pair(agreement=1.0)
    recs = _run({"fast_verify": False, "parallel_draft": False}, [GenerationRequest("s", PROMPT, 20, SamplingParams())],
                draft, target)
    rep = get_system("picospec").report(recs)
    assert rep["pipelined"] is False
    assert rep["inputs"]["t_draft"] == pytest.approx(0.08) and rep["throughput_sync"] == pytest.approx(5 / 0.17)
    assert rep["measured_throughput"] == pytest.approx(20 / 0.68)
    assert rep["model_error"] == pytest.approx(0.0, abs=1e-9)
    assert "stop-and-wait: +0.0%" in rep["summary"]
