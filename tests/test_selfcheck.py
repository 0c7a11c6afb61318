"""The set-up self-check and the portable llama.cpp build it guards.

The real engine is broken on purpose (a truncated model file, a worker killed by a signal)
and the self-check's message must name the cause and the fix.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.selfcheck import (
    ModelCheck,
    SelfCheckError,
    check_pair,
    diagnose,
    finish_worker,
    run_check,
    start_worker,
    worker_command,
)
from harness.sysinfo import cpu_info, exit_description, llama_build, llama_system_info, parse_cmake_options

PORTABLE = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
            "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX512=OFF")


# ---- the build ------------------------------------------------------------------------------------


def test_installed_llama_cpp_is_the_portable_wheel_built_by_the_makefile():
    build = llama_build()
    assert build.problems == [], build.problems
    options = parse_cmake_options(build.cmake_args)
    assert options["GGML_NATIVE"] is False
    assert options["GGML_AVX2"] and options["GGML_FMA"] and options["GGML_F16C"]
    assert not any(options.get(o, False) for o in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_AVX512"))
    # the wheel pip installed lies in the wheelhouse whose name carries the flags' key
    assert Path(build.installed_from).parent == Path(build.wheelhouse)
    assert build.key in Path(build.wheelhouse).name and build.version in Path(build.wheelhouse).name


def test_llama_cpp_reports_avx2_and_no_amx_or_avx512_compiled_in():
    info = llama_system_info()
    assert info["error"] is None, info["error"]
    features = info["features"]
    assert features.get("AVX2") and features.get("FMA") and features.get("F16C"), info["text"]
    assert not [k for k, on in features.items() if on and (k.startswith("AMX") or k.startswith("AVX512"))], info["text"]


def _record(tmp_path: Path, cmake_args: str, wheelhouse: str = "/nowhere") -> Path:
    build = llama_build()
    (tmp_path / "llama-cpp-build.json").write_text(json.dumps(
        {"version": build.version, "cmake_args": cmake_args, "key": "k", "wheelhouse": wheelhouse}))
    return tmp_path


def test_a_native_or_amx_build_record_is_reported_as_not_portable(tmp_path):
    wheelhouse = str(Path(llama_build().installed_from).parent)
    assert llama_build(_record(tmp_path, PORTABLE, wheelhouse)).problems == []
    native = llama_build(_record(tmp_path, "-DLLAVA_BUILD=OFF", wheelhouse))  # GGML_NATIVE defaults to on
    assert any("GGML_NATIVE" in p for p in native.problems)
    amx = llama_build(_record(tmp_path, PORTABLE.replace("-DGGML_AMX_INT8=OFF", "-DGGML_AMX_INT8=ON"), wheelhouse))
    assert any("GGML_AMX_INT8" in p for p in amx.problems)


def test_a_wheel_from_another_wheelhouse_is_reported(tmp_path):
    other = llama_build(_record(tmp_path, PORTABLE, str(tmp_path / "llama-cpp-python-0.3.36-otherflags")))
    assert any("not from the wheelhouse" in p for p in other.problems)


def test_a_missing_build_record_says_the_flags_are_unknown(tmp_path):
    build = llama_build(tmp_path)
    assert not build.ok and "make install" in build.problems[0] and "flags are unknown" in build.problems[0]


def test_cpu_flags_are_read_from_cpuinfo():
    cpu = cpu_info("model name\t: Test CPU\nflags\t\t: fpu sse4_2 avx avx2 fma f16c amx_tile amx_int8\n"
                   "model name\t: Test CPU\nflags\t\t: fpu\n")
    assert cpu.model == "Test CPU" and cpu.has_amx and cpu.missing_for_portable == []
    assert cpu.simd == ["sse4_2", "avx", "avx2", "fma", "f16c", "amx_tile", "amx_int8"]
    old = cpu_info("model name\t: Old CPU\nflags\t\t: fpu sse4_2 avx\n")
    assert not old.has_amx and old.missing_for_portable == ["avx2", "fma", "f16c"]


def test_exit_descriptions_name_the_signal_from_popen_or_a_shell():
    assert exit_description(-11) == "killed by SIGSEGV (signal 11)"
    assert exit_description(139) == "killed by SIGSEGV (signal 11)"
    assert exit_description(-4) == "killed by SIGILL (signal 4)"
    assert exit_description(1) == "exit status 1"
    # a real shell reporting its child's segfault
    res = subprocess.run(["bash", "-c", "bash -c 'kill -SEGV $$'; exit $?"], capture_output=True)
    assert exit_description(res.returncode) == "killed by SIGSEGV (signal 11)"


# ---- the check on the real pair, and broken on purpose ----------------------------------------------


@pytest.mark.slow
def test_default_pair_passes_the_selfcheck(default_pair_paths):
    from harness.pairs import DEFAULT_PAIR, load_pair

    reports = check_pair(load_pair(DEFAULT_PAIR), default_pair_paths, tokens=4, progress=None)
    assert [r["role"] for r in reports] == ["draft", "target"]
    for r in reports:
        assert r["tokens"] == 4 and r["decode_tok_s"] > 0 and r["text"].strip()


@pytest.mark.slow
def test_a_truncated_model_file_is_named_with_the_fix(draft_model_path, tmp_path):
    truncated = tmp_path / draft_model_path.name
    with open(draft_model_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(32 << 20))
    check = ModelCheck("draft", "llamacpp", truncated, size=draft_model_path.stat().st_size)
    with pytest.raises(SelfCheckError) as err:
        run_check(check, tokens=2, timeout=300, fetch_hint="specwan fetch --pair qwen25coder")
    message = str(err.value)
    assert "the draft model" in message and "during load" in message
    assert f"{32 << 20:,} bytes but the pair declares" in message and "truncated" in message
    assert f"delete {truncated}" in message and "specwan fetch --pair qwen25coder" in message


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_names_the_cpu_the_build_and_the_fix(draft_model_path):
    check = ModelCheck("draft", "llamacpp", draft_model_path, size=draft_model_path.stat().st_size)
    started = time.monotonic()
    proc = start_worker(worker_command(check, tokens=100_000))  # decodes far longer than we wait
    time.sleep(1.5)
    assert proc.poll() is None, "the worker ended before it could be killed"
    proc.send_signal(signal.SIGSEGV)
    outcome = finish_worker(proc, timeout=60, started=started)
    message = diagnose(check, outcome)
    assert message is not None
    assert "crashed, killed by SIGSEGV (signal 11)" in message
    assert cpu_info().model in message and " ".join(cpu_info().simd) in message
    assert llama_build().cmake_args in message
    assert "make install" in message and "specwan doctor" in message


def test_a_worker_that_fails_without_a_file_names_the_error():
    """A model path that does not exist: the engine's own error reaches the message."""
    check = ModelCheck("target", "llamacpp", Path("/nonexistent/model.gguf"), size=10)
    outcome = finish_worker(start_worker(worker_command(check, tokens=1)), timeout=120)
    message = diagnose(check, outcome)
    assert "model file not found" in message and "cannot be read" in message and "specwan fetch" in message


def test_toy_pair_passes_the_selfcheck():
    from harness.pairs import ensure_pair, load_pair

    pair = load_pair("toy")
    reports = check_pair(pair, ensure_pair(pair, progress=False), tokens=3, progress=None)
    assert [r["tokens"] for r in reports] == [3, 3]


def test_selfcheck_command_fails_with_the_message_and_status_1(tmp_path):
    """The command line: a pair whose draft file is damaged stops set-up with status 1 and the cause."""
    import yaml

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 1000)
    pair = {"name": "broken", "description": "a damaged local file",
            "draft": {"engine": "llamacpp", "file": "bad.gguf", "source": {"path": str(bad)}},
            "target": {"engine": "toy"}}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(pair))
    res = subprocess.run([sys.executable, "-m", "harness.cli", "selfcheck", "--pair", str(tmp_path / "broken.yaml"),
                          "--tokens", "1", "--timeout", "120"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "self-check: the draft model (bad.gguf) failed during load" in res.stderr
    assert "Traceback" not in res.stderr
