"""Split inference (PicoSpec's baseline): the target cut by layers, hidden states up, tokens down.

The engine-level split is checked against the unsplit model: a small randomly initialised
Qwen2 model built from a ``Qwen2Config`` (real transformers code, no download) and the toy
engine's layered form. The plug-in's bytes and virtual time are checked against figures
computed by hand; the wall-mode test (slow) runs the real target in two processes.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from harness.profiles import RoleProfile
from systems.api import GenerationRequest, Op, get_system
from systems.engines import create_engine
from systems.engines.base import EngineError
from systems.engines.toy import ToyEngine
from systems.sampling import SamplingParams
from tests.support import greedy_decode

PROMPT = [3, 5, 7, 11, 13]


@pytest.fixture(scope="module")
def qwen():
    """A 6-layer Qwen2 with random weights, sharp enough that greedy choices are not near-ties."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from systems.engines.hf import TransformersEngine

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.5, bos_token_id=None, eos_token_id=None)
    return TransformersEngine.from_model(Qwen2ForCausalLM(config), name="tiny-qwen2", n_ctx=512)


def _blocks(tokens, sizes):
    """``tokens`` cut into blocks of ``sizes`` (the last size repeats until they run out)."""
    out, i = [], 0
    sizes = list(sizes)
    while i < len(tokens):
        n = sizes.pop(0) if len(sizes) > 1 else sizes[0]
        out.append(tokens[i:i + n])
        i += n
    return out


def _reference_rows(engine, tokens, sizes):
    """The unsplit model's logits after each position, the sequence run in blocks of ``sizes``."""
    torch = pytest.importorskip("torch")
    from transformers import DynamicCache

    model = engine._model
    cache = DynamicCache(config=model.config)
    rows, start = [], 0
    with torch.inference_mode():
        for block in _blocks(tokens, sizes):
            pos = torch.arange(start, start + len(block))[None]
            out = model(input_ids=torch.tensor([block]), position_ids=pos, past_key_values=cache, use_cache=True)
            rows += list(out.logits[0].float().numpy())
            start += len(block)
    return np.stack(rows)


def _split_rows(engine, tokens, sizes, cut):
    """The same through two parts cut after layer ``cut``; every position's logits."""
    split = engine.layer_split()
    edge, cloud = split.open_part(0, cut), split.open_part(cut, split.n_layers)
    rows = [cloud.run(edge.run(block), logits_to_keep=len(block)) for block in _blocks(tokens, sizes)]
    assert edge.length == cloud.length == len(tokens)
    return np.concatenate(rows)


# ---- (a) the split forward equals the unsplit one ----------------------------------------------
@pytest.mark.parametrize("cut", [1, 3, 5])
@pytest.mark.parametrize("sizes", [(5, 1), (5, 3, 1)], ids=["prefill-then-one", "a-block-after-the-prompt"])
def test_split_forward_equals_unsplit_at_every_position(qwen, cut, sizes):
    tokens = PROMPT + [42, 17, 88, 1, 60, 2]
    want = _reference_rows(qwen, tokens, sizes)
    got = _split_rows(qwen, tokens, sizes, cut)
    assert got.shape == want.shape == (len(tokens), 97)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # and against the engine's own scoring path (the one every other system uses)
    session = qwen.new_session()
    np.testing.assert_allclose(got[len(PROMPT) - 1], session.prefill(tokens[: len(PROMPT)]), atol=1e-5, rtol=0)
    session.close()


def test_three_parts_chain_like_two(qwen):
    tokens = PROMPT + [9, 30, 71]
    split = qwen.layer_split()
    a, b, c = split.open_part(0, 2), split.open_part(2, 4), split.open_part(4, 6)
    rows = [c.run(b.run(a.run(tokens[:5])), logits_to_keep=5)] + [c.run(b.run(a.run([t]))) for t in tokens[5:]]
    np.testing.assert_allclose(np.concatenate(rows), _reference_rows(qwen, tokens, (5, 1)), atol=1e-5, rtol=0)


def test_hidden_states_are_the_models_own(qwen):
    """What the edge part sends is the residual stream after its last layer, as transformers
    reports it (``output_hidden_states``: entry k is the input of layer k)."""
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        out = qwen._model(input_ids=torch.tensor([PROMPT]), output_hidden_states=True)
    for cut in (1, 3):
        part = qwen.layer_split().open_part(0, cut)
        np.testing.assert_allclose(part.run(PROMPT), out.hidden_states[cut][0].numpy(), atol=1e-5, rtol=0)
    assert qwen.layer_split().n_layers == 6 and qwen.layer_split().hidden_size == 32


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_toy_layers_give_the_toy_logits(cut):
    engine = ToyEngine(vocab_size=8, seed=2, n_layers=6, order=4)
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(0, 8, 14)]
    got = _split_rows(engine, tokens, (6, 3, 1), cut)
    want = np.stack([engine.logits_for(tokens[: i + 1]) for i in range(len(tokens))])
    assert np.array_equal(got, want)


def test_toy_cloud_part_reads_only_hidden_states():
    """A corrupted hidden state changes the cloud's answer or is refused: it carries the context."""
    engine = ToyEngine(vocab_size=8, seed=0)
    split = engine.layer_split()
    edge, cloud = split.open_part(0, 3), split.open_part(3, 6)
    h = edge.run([1, 2, 3, 4])
    assert h.shape == (4, 3) and h[3].tolist() == [4.0, 3.0, -1.0]  # slot 2: filled by the cloud's layer 4
    h[3, 0] = 5.0
    assert np.array_equal(cloud.run(h), engine.logits_for([1, 2, 3, 5])[None])
    with pytest.raises(EngineError, match="holds no token ids"):
        split.open_part(3, 6).run(np.full((1, 3), 0.5))


def test_parts_refuse_bad_ranges_and_inputs(qwen):
    split = qwen.layer_split()
    for first, last in ((0, 0), (3, 2), (0, 7), (-1, 2)):
        with pytest.raises(EngineError, match=r"0 <= first < last <= 6"):
            split.open_part(first, last)
    with pytest.raises(EngineError, match=r"take hidden states of shape \(positions, 32\)"):
        split.open_part(2, 6).run(np.zeros((1, 31)))
    with pytest.raises(EngineError, match="take a list of token ids"):
        split.open_part(0, 2).run(np.zeros((1, 32)))
    part = split.open_part(0, 2)
    part.close()
    with pytest.raises(EngineError, match="closed"):
        part.run([1])


# ---- (b) greedy split decoding is the target's own greedy decode ---------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("edge_layers", [1, 3, 5])
def test_greedy_split_decoding_equals_the_unsplit_targets(qwen, edge_layers, dtype):
    want, gaps = greedy_decode(qwen, PROMPT, 24)
    (rec,) = run_system("split_inference", None, qwen, [GenerationRequest("r", PROMPT, 24)],
                        {"edge_layers": edge_layers, "hidden_dtype": dtype})
    assert rec.output_tokens == want
    assert min(gaps) > 0.01  # float16 rounding moves these logits far less than their top-2 gaps


def test_sampled_split_decoding_equals_cloud_only(qwen):
    """Same seed, same logits: the cloud samples exactly the tokens cloud-only samples."""
    req = GenerationRequest("r", PROMPT, 16, SamplingParams(temperature=1.0), seed=5)
    (split,) = run_system("split_inference", None, qwen, [req], {"hidden_dtype": "float32"})
    (alone,) = run_system("cloud_only", None, qwen, [req])
    assert split.output_tokens == alone.output_tokens and len(set(split.output_tokens)) > 3


# ---- (c) bytes -------------------------------------------------------------------------------------
def test_uplink_carries_positions_times_hidden_size_times_two(qwen):
    req = GenerationRequest("r", PROMPT, 6)
    (half,) = run_system("split_inference", None, qwen, [req])
    (full,) = run_system("split_inference", None, qwen, [req], {"hidden_dtype": "float32"})
    positions = [5, 1, 1, 1, 1, 1]
    assert [r.extra["positions"] for r in half.rounds] == positions
    assert [r.extra["hidden_bytes"] for r in half.rounds] == [p * 32 * 2 for p in positions]
    assert [r.extra["hidden_bytes"] for r in full.rounds] == [p * 32 * 4 for p in positions]
    for rec, dtype in ((half, "float16"), (full, "float32")):  # what each round says it carried, and where
        assert {(r.extra["hidden_dtype"], r.extra["edge_layers"], r.extra["n_layers"]) for r in rec.rounds} == \
            {(dtype, 3, 6)}
    # The message around the states is the same in both runs: the difference is the states' own size.
    assert [f.bytes_up - h.bytes_up for f, h in zip(full.rounds, half.rounds)] == [p * 32 * 2 for p in positions]
    envelope = {r.bytes_up - r.extra["hidden_bytes"] for r in half.rounds[1:]}
    assert len(envelope) == 1 and 0 < envelope.pop() < 80
    # Downlink: one token a round, a few bytes; nothing else crosses.
    assert all(0 < r.bytes_down < 40 for r in half.rounds)
    assert half.bytes_up == sum(r.bytes_up for r in half.rounds) + _close_bytes(half)


def _close_bytes(rec) -> int:
    from systems.messages import CloseSession, encode

    return len(encode(CloseSession(f"c0-{rec.request_id}")))


# ---- (d) virtual time --------------------------------------------------------------------------------
EDGE = RoleProfile("jetson", "declared", "test", step_s=0.5, prefill_s_per_token=0.5,
                   target_step_s=0.060, target_prefill_s_per_token=0.012)
CLOUD = RoleProfile("gpu", "declared", "test", step_s=0.030, prefill_s_per_token=0.003, verify_s_per_token=9.0)


def _timed(edge, cloud, link, config=None, prompt=(1, 2, 3, 4), tokens=5):
    engine = ToyEngine(vocab_size=8, seed=0, n_layers=6)
    req = GenerationRequest("r", list(prompt), tokens)
    (rec,) = run_system("split_inference", None, engine, [req], config,
                        RunOptions(link=link, edge_cost=edge.cost, cloud_cost=cloud.cost))
    assert len(rec.rounds) == tokens
    return rec


def test_round_timing_is_the_profiles_share_of_a_forward_pass():
    # toy: 6 layers, the edge runs 3 of them, so each side runs half of a target pass
    rec = _timed(EDGE, CLOUD, LinkProfile("wan", rtt_s=0.040))
    first, rest = rec.rounds[0], rec.rounds[1:]
    assert first.extra["t_edge"] == pytest.approx(0.5 * 0.012 * 4)
    assert first.t_verify == pytest.approx(0.5 * 0.003 * 4)
    assert first.end - first.start == pytest.approx(0.024 + 0.020 + 0.006 + 0.020)
    for r in rest:
        assert r.extra["t_edge"] == pytest.approx(0.5 * 0.060)
        assert r.t_verify == pytest.approx(0.5 * 0.030)
        assert r.end - r.start == pytest.approx(0.030 + 0.020 + 0.015 + 0.020)
    assert rec.e2e == pytest.approx(0.070 + 4 * 0.085)


def test_declared_target_layers_set_the_share():
    """Profiles that describe a 12-layer target: the edge's 3 layers are 3/12 of a pass there
    and the cloud runs the other 9/12, whatever the loaded model's depth."""
    edge = RoleProfile(**{**EDGE.as_dict(), "target_layers": 12})
    cloud = RoleProfile(**{**CLOUD.as_dict(), "target_layers": 12})
    rec = _timed(edge, cloud, LinkProfile())
    for r in rec.rounds[1:]:
        assert r.extra["t_edge"] == pytest.approx(0.060 * 3 / 12)
        assert r.t_verify == pytest.approx(0.030 * 9 / 12)
        assert r.end - r.start == pytest.approx(0.015 + 0.0225)
    rec = _timed(edge, cloud, LinkProfile(), {"edge_layers": 1})
    assert rec.rounds[1].extra["t_edge"] == pytest.approx(0.060 / 12)
    assert rec.rounds[1].t_verify == pytest.approx(0.030 * 11 / 12)


def test_uplink_rate_prices_the_hidden_states():
    link = LinkProfile("slow", rtt_s=0.0, up_bps=8_000.0, overhead_bytes=26)
    rec = _timed(EDGE, CLOUD, link)
    for r in rec.rounds[1:]:
        serialise = (r.bytes_up + 26) * 8 / 8_000.0
        assert r.end - r.start == pytest.approx(0.030 + serialise + 0.015)


def test_profile_prices_a_slice_of_layers():
    assert EDGE.cost(Op("decode", 1, 0, layers=(0, 3, 28))) == pytest.approx(0.060 * 3 / 28)
    assert EDGE.cost(Op("prefill", 10, 0, layers=(0, 3, 28))) == pytest.approx(0.012 * 10 * 3 / 28)
    assert CLOUD.cost(Op("decode", 1, 0, layers=(3, 28, 28))) == pytest.approx(0.030 * 25 / 28)
    assert CLOUD.cost(Op("decode", 1, 0)) == pytest.approx(0.030)  # a whole pass: unchanged
    deep = RoleProfile(**{**CLOUD.as_dict(), "target_layers": 64})
    assert deep.cost(Op("decode", 1, 0, layers=(3, 28, 28))) == pytest.approx(0.030 * 61 / 64)
    shallow = RoleProfile(**{**CLOUD.as_dict(), "target_layers": 2})
    with pytest.raises(ValueError, match=r"layers \[3, 28\) of 28 do not fit the 2 layers"):
        shallow.cost(Op("decode", 1, 0, layers=(3, 28, 28)))
    with pytest.raises(ValueError, match="target_layers must be an integer >= 1"):
        RoleProfile(**{**CLOUD.as_dict(), "target_layers": 0})


# ---- errors a user can make: one line, at config time -----------------------------------------------
class _Unsplittable(ToyEngine):
    """A toy without the layered form: stands for any engine that cannot run a range of layers."""

    def layer_split(self):
        return None


def test_an_engine_without_layers_is_refused_before_anything_runs():
    with pytest.raises(ValueError) as err:
        run_system("split_inference", None, _Unsplittable(), [GenerationRequest("r", [1], 2)])
    assert str(err.value) == ("split_inference: toy-target-v8-s0-a0.8 (toy engine) cannot run a range of its layers; "
                              "run the target on the transformers engine (e.g. pair=qwen25coder-hf) or the toy engine")


@pytest.mark.parametrize("edge_layers", [6, 9])
def test_edge_layers_must_leave_the_cloud_a_layer(edge_layers):
    with pytest.raises(ValueError) as err:
        run_system("split_inference", None, ToyEngine(), [GenerationRequest("r", [1], 2)],
                   {"edge_layers": edge_layers})
    assert str(err.value) == (f"split_inference: edge_layers={edge_layers} leaves the cloud no layer of "
                              "toy-target-v8-s0-a0.8 (toy engine), which has 6; set system.params.edge_layers "
                              "between 1 and 5")


@pytest.mark.parametrize("overrides,message", [
    ({"edge_layers": 0}, "split_inference: edge_layers must be >= 1 (the edge runs at least the first layer), got 0"),
    ({"hidden_dtype": "int8"},
     "split_inference: hidden_dtype must be a float type (float16, float32, float64), got 'int8'"),
    ({"hidden_dtype": "half-ish"},
     "split_inference: hidden_dtype must be a float type (float16, float32, float64), got 'half-ish'"),
])
def test_bad_settings_are_refused_at_config_time(overrides, message):
    with pytest.raises(ValueError) as err:
        get_system("split_inference").make_config(overrides)
    assert str(err.value) == message


def test_specwan_run_refuses_an_edge_profile_without_target_costs(tmp_path):
    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, ConfigError, make_plan

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=["system=split_inference", "pair=toy", "device=phone_gpu_cloud",
                                           "workload=smoke"])
        cfg_ok = compose("config", overrides=["system=split_inference", "pair=toy", "device=picospec_qwen",
                                              "workload=smoke"])
    with pytest.raises(ConfigError, match="edge profile 'phone_2.5ghz' must price the target there"):
        make_plan(cfg)
    assert make_plan(cfg_ok).edge.prices_target


def test_a_virtual_run_records_that_its_times_are_modelled(tmp_path, capsys):
    """The run says where its split-inference times come from: the virtual clock, the device
    profiles with the edge's target costs and their declared source."""
    import json

    import pandas as pd
    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, execute

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=["system=split_inference", "pair=toy", "device=picospec_qwen",
                                           "network=picospec_wan", "workload=smoke", "workload.chat_template=false",
                                           "workload.size=1", "max_new_tokens=4"])
    (rec,) = execute(cfg, run_dir=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edge = manifest["device_profiles"]["edge"]
    assert manifest["clock"] == "virtual" and edge["kind"] == "declared"
    assert (edge["target_step_s"], edge["target_layers"]) == (1.332, 64)
    assert edge["target_source"].startswith("assumption")
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert set(rounds["clock"]) == {"virtual"} and len(rounds) == rec.n_tokens
    assert "ms/token (modelled)" in capsys.readouterr().out
    assert rec.rounds[1].extra["t_edge"] == pytest.approx(3 / 64 * 1.332)


def test_the_toy_needs_room_for_its_window():
    with pytest.raises(EngineError, match=r"n_layers must be >= max\(1, order - 1\) = 3"):
        create_engine("toy", order=4, n_layers=2)


# ---- the harness around it: grids, wall mode ---------------------------------------------
def _grid(**split):
    return {"name": "g", "accepted_tokens": 8, "max_new_tokens": 8,
            "scenarios": {"Q": {"network": "picospec_wan", "device": "picospec_qwen"}},
            "datasets": {"smoke": {"workload": "smoke", "workload_params": {"chat_template": False},
                                   "methods": {"ar": {"system": "cloud_only", "params": {}},
                                               "split": {"system": "split_inference", "params": {}, **split}}}}}


@pytest.mark.parametrize("grid,message", [
    (_grid(pair="nowhere"), r"grid.datasets.smoke.methods.split: unknown pair 'nowhere'"),
    (_grid(device="x"), r"grid.datasets.smoke.methods.split: unknown key\(s\) device; valid: pair, params, system"),
    ({**_grid(), "scenarios": {"P": {"network": "lan", "device": "phone_gpu_cloud"}}},
     r"methods.split in grid.scenarios.P: system split_inference runs target layers on the edge"),
])
def test_grid_checks_a_methods_pair_and_the_edge_profile(grid, message):
    from harness.grid import grid_spec
    from harness.run import ConfigError

    with pytest.raises(ConfigError, match=message):
        grid_spec(grid)


def test_grid_runs_a_method_on_its_own_pair(tmp_path):
    """The split row runs on the pair it names (here the toy pair again, loaded a second time);
    its round trip per token is the profiles' shares plus the link's RTT, by hand."""
    import pandas as pd
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.grid import run_grid
    from harness.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=["pair=toy"])
    OmegaConf.set_struct(cfg, False)
    cfg.grid = _grid(pair="toy")
    cells = run_grid(cfg, tmp_path / "run")
    split = next(c for c in cells if c.method == "split")
    assert split.tokens == 8
    rounds = pd.read_parquet(tmp_path / "run" / "rounds.parquet")
    decode = rounds[(rounds["method"] == "split") & (rounds["round"] > 0)]
    # toy: 6 layers; picospec_qwen prices a 64-layer target: edge 3/64 of 1.332 s, cloud 61/64 of 72 ms,
    # 20 ms RTT, the states (about 50 B) at 100 Mbit/s
    per_token = 3 / 64 * 1.332 + 61 / 64 * 0.072 + 0.020
    assert ((decode["end"] - decode["start"]) - per_token).abs().max() < 0.0002


def test_wall_mode_on_the_toy_pair(tmp_path):
    """Edge and cloud as separate processes over gRPC: the edge runs the toy target's first
    layers, its hidden states cross, the output is the target's own greedy decode."""
    from harness.wall import run_wall

    requests = [GenerationRequest(f"w{i}", [1 + i, 2, 3], 12, seed=i) for i in range(2)]
    target = ToyEngine(role="target", vocab_size=64, seed=0)  # conf/pair/toy.yaml's target
    records = run_wall("split_inference", "toy", requests, timeout_s=60, workdir=tmp_path)
    for req, rec in zip(requests, records):
        assert rec.error is None
        assert rec.output_tokens == greedy_decode(target, req.prompt, req.max_new_tokens)[0]
        assert [r.extra["hidden_bytes"] for r in rec.rounds] == [3 * 3 * 2] + [3 * 2] * (len(rec.rounds) - 1)


@pytest.mark.slow
def test_wall_mode_with_the_real_target(draft_model_path, target_model_path, report):
    """The default pair's 1.5B target on the transformers engine, cut after layer 3: the edge
    process runs layers 0-2, the cloud process the other 25; the output equals cloud-only's
    (the unsplit target in the cloud), and the uplink carries 1536 fp16 numbers a position."""
    from harness.pairs import load_pair
    from harness.wall import run_wall

    tokenizer = create_engine("llamacpp", model_path=str(draft_model_path), n_ctx=512)  # the shared vocabulary
    prompt = tokenizer.tokenize("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    tokenizer.close()
    requests = [GenerationRequest("fib", prompt, 4)]
    pair = load_pair("qwen25coder-hf")
    (split,) = run_wall("split_inference", pair, requests, timeout_s=1200)
    (alone,) = run_wall("cloud_only", pair, requests, timeout_s=900)
    assert split.error is None and alone.error is None
    assert split.output_tokens == alone.output_tokens and len(split.output_tokens) == 4
    positions = [len(prompt), 1, 1, 1]
    assert [r.extra["positions"] for r in split.rounds] == positions
    assert [r.extra["hidden_bytes"] for r in split.rounds] == [p * 1536 * 2 for p in positions]
    assert all(r.extra["n_layers"] == 28 and r.extra["edge_layers"] == 3 for r in split.rounds)
    assert all(0 < r.bytes_up - r.extra["hidden_bytes"] < 80 for r in split.rounds)
    report(f"split inference, real 1.5B target, wall mode on this machine: {split.n_tokens} tokens in "
           f"{split.e2e:.2f} s (cloud-only {alone.e2e:.2f} s); uplink {[r.bytes_up for r in split.rounds]} B a round")
