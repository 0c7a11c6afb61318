"""`specwan doctor` and the contention check every run makes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from harness.contention import CONTENDED_CORES, sample

SECTIONS = {"machine", "llama_cpp", "python", "links", "energy", "gpu", "models", "resources", "contention"}


def _doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "doctor", *args], capture_output=True, text=True,
                          timeout=300)


def test_doctor_json_reports_every_section_of_this_machine():
    from harness.sysinfo import cpu_info

    res = _doctor("--json", "--pair", "toy")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert set(report) == SECTIONS
    failed = {k: v["error"] for k, v in report.items() if "error" in v}
    assert not failed, failed
    assert report["machine"]["cpu"]["simd"] == cpu_info().simd
    assert report["llama_cpp"]["portable"] is True, report["llama_cpp"]["problems"]
    assert "AVX2 = 1" in report["llama_cpp"]["system_info"]
    assert report["python"]["packages"]["llama-cpp-python"] == report["llama_cpp"]["build"]["version"]
    backends = report["links"]["backends"]
    assert backends["relay"]["available"] is True
    for name, b in backends.items():  # every unavailable backend says why
        assert b["available"] or b["reason"], name
    for meter in ("rapl", "nvml"):
        e = report["energy"][meter]
        assert e["available"] or e["reason"], meter
    assert report["models"]["roles"]["draft"]["engine"] == "toy"
    assert report["resources"]["memory_total_gib"] > 0
    assert report["contention"]["usable_cores"] >= 1


def test_doctor_text_report_ends_with_what_the_suite_will_do():
    res = _doctor("--pair", "toy")
    assert res.returncode == 0, res.stderr
    for heading in ("[machine]", "[llama.cpp]", "[link backends]", "[energy meters]", "[GPU]", "[models (pair toy)]",
                    "[resources]", "[contention]", "[what the suite will do]"):
        assert heading in res.stdout
    assert "models: llama.cpp portable build" in res.stdout


def test_doctor_unknown_pair_is_one_line():
    res = _doctor("--pair", "no-such-pair")
    assert res.returncode == 2
    assert res.stderr.startswith("specwan: error:") and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_doctor_verifies_the_default_pair_files(default_pair_paths):
    report = json.loads(_doctor("--json").stdout)
    roles = report["models"]["roles"]
    assert roles["draft"]["verified"] and roles["target"]["verified"]
    assert roles["target"]["path"] == str(default_pair_paths["target"])


def test_doctor_names_a_damaged_model_file(tmp_path):
    from harness.models import model_status
    from harness.pairs import load_pair

    spec = load_pair("qwen25coder").draft
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / spec.file).write_bytes(b"GGUF" + b"\0" * 100)
    status = model_status(spec, home=tmp_path)
    assert status["present"] and not status["verified"]
    assert "104 bytes, expected" in status["problem"] and "truncated" in status["problem"]
    missing = model_status(load_pair("qwen25coder").target, home=tmp_path)
    assert not missing["present"] and "specwan fetch" in missing["problem"]


class _Busy:
    """A process that keeps one core busy for ``seconds``, started through a shell so it is not our child
    (the contention check rightly ignores the checking process's own children)."""

    def __init__(self, seconds: float):
        loop = f"import time\nt=time.time()\nwhile time.time()-t<{seconds}: pass"
        out = subprocess.run(["bash", "-c", f'{sys.executable} -c "{loop}" >/dev/null 2>&1 & echo $!'],
                             capture_output=True, text=True, check=True)
        self.pid = int(out.stdout.strip())

    def kill(self) -> None:
        import os
        import signal

        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> None:
        pass


def _busy_process(seconds: float) -> _Busy:
    return _Busy(seconds)


def test_contention_sample_lists_a_busy_process():
    busy = _busy_process(6)
    try:
        time.sleep(0.5)
        s = sample(1.0, engine_threads={"draft": 2, "target": 2})
    finally:
        busy.kill()
        busy.wait()
    assert s.other_load_cores >= CONTENDED_CORES and s.contended
    assert busy.pid in [b["pid"] for b in s.busy]
    line = s.warning()
    assert line.startswith("warning: contended machine") and f"pid {busy.pid}" in line and "draft 2" in line


def test_a_run_on_a_contended_machine_says_so_and_records_it(tmp_path):
    """`specwan run` on the toy pair while another process keeps a core busy."""
    import pandas as pd  # noqa: F401 - the run writes parquet

    busy = _busy_process(120)
    try:
        time.sleep(0.5)
        res = subprocess.run([sys.executable, "-m", "harness.cli", "run", "pair=toy", "system=vanilla",
                              "network=lan", "workload=smoke", "workload.size=1", "max_new_tokens=8",
                              f"out={tmp_path}"], capture_output=True, text=True, timeout=300)
    finally:
        busy.kill()
        busy.wait()
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: contended machine" in res.stdout + res.stderr
    (manifest,) = tmp_path.glob("*/manifest.json")
    recorded = json.loads(manifest.read_text())["contention"]
    assert recorded["contended"] is True and recorded["kind"] == "measured"
    assert busy.pid in [b["pid"] for b in recorded["busy"]]
    assert json.loads(manifest.read_text())["llama_cpp_build"]["key"]
