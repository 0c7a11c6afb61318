"""What this machine's CPU offers and how the installed llama.cpp was built.

Shared by the set-up self-check (:mod:`harness.selfcheck`), ``specwan doctor`` and the run
manifest. The Makefile builds llama-cpp-python into a wheelhouse keyed by its flags and
leaves a record of that build in the virtual environment (``llama-cpp-build.json``); this
module reads that record back and checks that the wheel pip installed is the one built
with those flags.

llama.cpp's own report of what it was compiled for (``llama_print_system_info``) is read
in a child process: a library built for instructions this CPU lacks can die on import, and
the caller must survive that to say so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

BUILD_RECORD = "llama-cpp-build.json"
LLAMA_DIST = "llama-cpp-python"

#: SIMD and matrix features worth naming, in the order a reader expects them
SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)
#: what the portable build needs from the CPU
REQUIRED_FLAGS = ("avx", "avx2", "fma", "f16c")
#: CMake options that must not be on in a portable build: each takes what the build machine offers
NON_PORTABLE_OPTIONS = ("GGML_NATIVE", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_AVX512",
                        "GGML_CPU_ALL_VARIANTS")
#: option -> the ggml default when the flags leave it unset (GGML_NATIVE defaults to on)
_OPTION_DEFAULTS = {"GGML_NATIVE": True}


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, its SIMD features and whether the portable build can run on it."""

    model: str | None
    flags: frozenset[str] = field(default_factory=frozenset)
    usable_cores: int = 1

    @property
    def simd(self) -> list[str]:
        return [f for f in SIMD_FLAGS if f in self.flags]

    @property
    def has_amx(self) -> bool:
        return any(f.startswith("amx") for f in self.flags)

    @property
    def missing_for_portable(self) -> list[str]:
        return [f for f in REQUIRED_FLAGS if f not in self.flags]

    def summary(self) -> str:
        return f"{self.model or 'unknown CPU'} ({' '.join(self.simd) or 'no SIMD features listed'})"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "simd": self.simd, "amx": self.has_amx, "usable_cores": self.usable_cores,
                "missing_for_portable_build": self.missing_for_portable}


def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """This machine's CPU, read from ``/proc/cpuinfo`` (or the given text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = None, frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware", "cpu model") and model is None:
            model = value.strip() or None
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model, flags, usable_cpus())


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity; all of them where it cannot be read)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_cmake_options(cmake_args: str) -> dict[str, bool]:
    """``-DNAME=ON|OFF`` flags as booleans (other flags are ignored)."""
    out = {}
    for name, value in re.findall(r"-D([A-Z0-9_]+)=(\S+)", cmake_args or ""):
        v = value.upper()
        if v in ("ON", "1", "TRUE", "YES"):
            out[name] = True
        elif v in ("OFF", "0", "FALSE", "NO"):
            out[name] = False
    return out


@dataclass
class LlamaBuild:
    """The installed llama-cpp-python: its version, the flags it was built with, the wheel it came from."""

    version: str | None
    cmake_args: str | None = None
    key: str | None = None
    wheelhouse: str | None = None
    installed_from: str | None = None
    record: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.version is not None and not self.problems

    def flags_summary(self) -> str:
        if self.cmake_args is None:
            return "unknown flags (no build record)"
        return self.cmake_args

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _installed_from(dist: importlib.metadata.Distribution) -> tuple[str | None, str | None]:
    """``(file, sha256)`` of the archive pip installed ``dist`` from (PEP 610's direct_url.json)."""
    try:
        raw = dist.read_text("direct_url.json")
        data = json.loads(raw) if raw else {}
        url = data.get("url")
        digest = (data.get("archive_info") or {}).get("hashes", {}).get("sha256")
    except (ValueError, AttributeError, TypeError):
        return None, None
    if not url:
        return None, None
    parsed = urlparse(url)
    return (unquote(parsed.path) if parsed.scheme == "file" else url), digest


def llama_build(prefix: str | os.PathLike | None = None) -> LlamaBuild:
    """How the installed llama-cpp-python was built, with every way it departs from the portable build."""
    try:
        dist = importlib.metadata.distribution(LLAMA_DIST)
    except importlib.metadata.PackageNotFoundError:
        return LlamaBuild(None, problems=[f"{LLAMA_DIST} is not installed (run `make install`)"])
    installed_from, installed_sha256 = _installed_from(dist)
    build = LlamaBuild(dist.version, installed_from=installed_from)
    record_path = Path(prefix or sys.prefix) / BUILD_RECORD
    build.record = str(record_path)
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        build.problems.append(f"no build record {record_path}: this {LLAMA_DIST} was not installed by the "
                              "Makefile, so its flags are unknown (`make install` builds and installs a portable one)")
        return build
    except (OSError, ValueError) as exc:
        build.problems.append(f"unreadable build record {record_path}: {exc}")
        return build
    build.cmake_args, build.key, build.wheelhouse = record.get("cmake_args"), record.get("key"), record.get("wheelhouse")
    if record.get("version") != dist.version:
        build.problems.append(f"the build record is for {LLAMA_DIST} {record.get('version')}, "
                              f"but {dist.version} is installed")
    if build.installed_from is None:
        build.problems.append(f"{LLAMA_DIST} was not installed from a local wheel, so it is not the one "
                              "built with the recorded flags")
    elif build.wheelhouse and Path(build.installed_from).parent != Path(build.wheelhouse):
        build.problems.append(f"the installed wheel {build.installed_from} is not from the wheelhouse built "
                              f"with the recorded flags ({build.wheelhouse})")
    elif installed_sha256 and Path(build.installed_from).is_file():
        with open(build.installed_from, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != installed_sha256:
                build.problems.append(f"the wheel now at {build.installed_from} is not the one installed "
                                      "(its sha256 differs): run `make install`")
    options = parse_cmake_options(build.cmake_args or "")
    on = [name for name in NON_PORTABLE_OPTIONS if options.get(name, _OPTION_DEFAULTS.get(name, False))]
    if on:
        build.problems.append(f"built with {', '.join(on)} on: not portable (the wheel follows the build "
                              "machine's CPU, and AMX crashes on the default pair)")
    return build


def llama_system_info(timeout: float = 60.0) -> dict[str, Any]:
    """llama.cpp's ``llama_print_system_info()``, read in a child process.

    ``{"text", "features": {name: bool}, "error"}``: ``features`` parses the ``NAME = 0|1``
    pairs of the text; ``error`` says why nothing could be read (the child's exit or signal).
    """
    code = "import llama_cpp, sys; sys.stdout.write(llama_cpp.llama_print_system_info().decode())"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"text": None, "features": {}, "error": f"reading it took over {timeout:g} s"}
    if res.returncode != 0:
        tail = (res.stderr or "").strip().splitlines()[-1:] or [""]
        return {"text": None, "features": {}, "error": f"{exit_description(res.returncode)}: {tail[0]}".rstrip(": ")}
    text = res.stdout.strip()
    features = {k: v == "1" for k, v in re.findall(r"([A-Z0-9_]+) = ([01])", text)}
    return {"text": text, "features": features, "error": None}


def exit_description(returncode: int) -> str:
    """``exit status 1`` or ``killed by SIGSEGV (signal 11)`` for a child's return code.

    A negative code is a signal (Popen); 128+N is how a shell reports signal N.
    """
    import signal

    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 else None
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name} (signal {number})"
    return f"exit status {returncode}"
