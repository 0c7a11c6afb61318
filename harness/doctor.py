"""``specwan doctor``: what this machine offers the suite, and what the suite will do with it.

One report for a bug report or a first look at a new machine: the CPU and its SIMD
features, how llama.cpp was built (and whether that build is the portable one), Python and
key packages, the link backends and why any is unavailable, root, energy meters, GPU, the
pair's model files, free disk and memory against what a run needs, and other processes
competing for the cores. Every check runs even when another fails; each section is a plain
mapping so ``--json`` prints the same facts.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from harness.sysinfo import cpu_info, llama_build, llama_system_info

#: packages whose versions matter to results (in the order printed)
PACKAGES = ("llama-cpp-python", "torch", "transformers", "numpy", "scipy", "pandas", "pyarrow", "hydra-core",
            "optuna", "grpcio", "fastapi", "uvicorn", "nvidia-ml-py", "psutil", "matplotlib")
#: disk a first run needs beyond the model files: the registry wheels they are assembled from
_FETCH_OVERHEAD = 1.0
#: working memory beyond the model files, per loaded model (KV cache, logits, buffers): estimated
_RUN_MEMORY_PER_MODEL = 1 << 30
_GIB = float(1 << 30)


def _safe(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
        return {"error": f"{type(exc).__name__}: {exc}"}


def machine() -> dict[str, Any]:
    cpu = cpu_info()
    return {"cpu": cpu.as_dict(), "platform": platform.platform(), "cores": os.cpu_count(),
            "root": os.geteuid() == 0}


def llama() -> dict[str, Any]:
    build = llama_build()
    info = llama_system_info()
    features = info["features"]
    problems = list(build.problems)
    compiled = [name for name, on in features.items() if on and (name.startswith("AMX") or name.startswith("AVX512"))]
    if compiled:
        problems.append(f"llama.cpp reports {', '.join(compiled)} compiled in: not portable")
    missing = [f for f in ("AVX2", "FMA", "F16C") if info["text"] is not None and not features.get(f)]
    if missing:
        problems.append(f"llama.cpp reports {', '.join(missing)} off: slower than the portable build")
    if info["error"]:
        problems.append(f"llama.cpp's system info could not be read: {info['error']}")
    return {"build": build.as_dict(), "system_info": info["text"], "portable": not problems, "problems": problems}


def python() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"version": sys.version.split()[0], "executable": sys.executable, "packages": versions}


def links() -> dict[str, Any]:
    from netem.kernel import ORDER, capabilities, choose

    caps = capabilities()
    backends = {name: {"available": caps.available(name), "reason": caps.reasons.get(name)} for name in ORDER}
    auto, why = choose("auto")
    return {"backends": backends, "auto": auto, "why": why}


def energy() -> dict[str, Any]:
    from harness.energy.base import EnergyUnavailable
    from harness.energy.nvml import NvmlMeter
    from harness.energy.rapl import RaplMeter

    out = {}
    for name, make in (("rapl", lambda: RaplMeter("doctor")),
                       ("nvml", lambda: NvmlMeter("doctor", start_sampler=False))):
        try:
            meter = make()
        except EnergyUnavailable as exc:
            out[name] = {"available": False, "reason": exc.reason}
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. the NVML bindings missing
            out[name] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
            continue
        out[name] = {"available": True, "source": meter.source}
        meter.close()
    out["fallback"] = "estimated from CPU time and the device profile's power (harness/energy/README.md)"
    return out


def gpu() -> dict[str, Any]:
    out: dict[str, Any] = {"nvidia_smi": shutil.which("nvidia-smi")}
    if out["nvidia_smi"]:
        try:
            res = subprocess.run([out["nvidia_smi"], "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            out["gpus"] = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()] or None
            out["reason"] = None if res.returncode == 0 else res.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            out["gpus"], out["reason"] = None, str(exc)
    else:
        out["gpus"], out["reason"] = None, "no nvidia-smi on PATH (no NVIDIA driver)"
    try:
        import torch

        out["torch_cuda"] = bool(torch.cuda.is_available())
        out["torch_cuda_build"] = torch.version.cuda
    except ImportError:
        out["torch_cuda"], out["torch_cuda_build"] = None, None
    return out


def models(pair_name: str, home: str | None = None) -> dict[str, Any]:
    from harness.models import model_status, specwan_home
    from harness.pairs import load_pair

    pair = load_pair(pair_name)
    roles = {}
    for role, spec in pair.roles().items():
        if not spec.needs_file:
            roles[role] = {"engine": spec.engine, "file": None, "verified": True, "problem": None}
            continue
        roles[role] = {"engine": spec.engine, "file": spec.file, "declared_size": spec.size,
                       **model_status(spec, home)}
    return {"pair": pair.name, "home": str(specwan_home(home)), "roles": roles}


def resources(pair_name: str, home: str | None = None) -> dict[str, Any]:
    import psutil

    from harness.models import specwan_home
    from harness.pairs import load_pair

    pair = load_pair(pair_name)
    files = [s for s in pair.roles().values() if s.needs_file]
    model_bytes = sum(s.size or 0 for s in files)
    home_dir = specwan_home(home)
    probe = home_dir if home_dir.exists() else next(p for p in home_dir.parents if p.exists())
    disk_free = shutil.disk_usage(probe).free
    have = [s for s in files if (home_dir / "models" / (s.file or "")).is_file()]
    disk_needed = sum((s.size or 0) * (1 + _FETCH_OVERHEAD) for s in files if s not in have)
    mem = psutil.virtual_memory()
    mem_needed = model_bytes + _RUN_MEMORY_PER_MODEL * max(len(pair.roles()), 1)
    return {"disk_free_gib": round(disk_free / _GIB, 1), "disk_path": str(probe),
            "disk_needed_gib": round(disk_needed / _GIB, 1), "disk_ok": disk_free >= disk_needed,
            "memory_available_gib": round(mem.available / _GIB, 1), "memory_total_gib": round(mem.total / _GIB, 1),
            "memory_needed_gib": round(mem_needed / _GIB, 1), "memory_ok": mem.available >= mem_needed,
            "needs_kind": "estimated: model files (+ the wheels they come in, until fetched) on disk; "
                          "model files + 1 GiB working memory per model in memory"}


def contention(pair_name: str) -> dict[str, Any]:
    from harness.contention import planned_threads, sample
    from harness.pairs import load_pair

    return sample(1.0, engine_threads=planned_threads(load_pair(pair_name))).as_dict()


def collect(pair_name: str, home: str | None = None) -> dict[str, Any]:
    """Every section of the report, each one a mapping (``error`` where its check failed)."""
    return {
        "machine": _safe(machine),
        "llama_cpp": _safe(llama),
        "python": _safe(python),
        "links": _safe(links),
        "energy": _safe(energy),
        "gpu": _safe(gpu),
        "models": _safe(lambda: models(pair_name, home)),
        "resources": _safe(lambda: resources(pair_name, home)),
        "contention": _safe(lambda: contention(pair_name)),
    }


# ---- the text report ---------------------------------------------------------------------------


def _ok(flag: bool) -> str:
    return "ok" if flag else "PROBLEM"


def verdicts(r: dict[str, Any]) -> list[str]:
    """What the suite will do on this machine, one line each."""
    out = []
    lc = r["llama_cpp"]
    if "error" not in lc:
        out.append("models: llama.cpp portable build" if lc["portable"] else
                   "models: the llama.cpp build is not the portable one; `rm -rf .venv && make install` fixes it")
    ln = r["links"]
    if "error" not in ln:
        out.append(f"wall runs: link backend {ln['auto']} (network.backend=auto)")
    en = r["energy"]
    if "error" not in en:
        measured = [n for n in ("nvml", "rapl") if en.get(n, {}).get("available")]
        out.append(f"energy: measured by {', '.join(measured)}" if measured else
                   "energy: estimated (no RAPL or NVML here)")
    mo = r["models"]
    if "error" not in mo:
        missing = [role for role, m in mo["roles"].items() if not m.get("verified")]
        out.append(f"pair {mo['pair']}: " + (f"{', '.join(missing)} not ready; `specwan fetch --pair {mo['pair']}`"
                                            if missing else "both model files verified"))
    co = r["contention"]
    if "error" not in co:
        out.append("timing: CONTENDED, other processes busy on these cores; wall-clock figures would be inflated"
                   if co["contended"] else "timing: quiet machine")
    return out


def render(r: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append

    def section(title: str, key: str) -> dict[str, Any] | None:
        add(f"\n[{title}]")
        data = r[key]
        if "error" in data:
            add(f"  check failed: {data['error']}")
            return None
        return data

    if (m := section("machine", "machine")) is not None:
        cpu = m["cpu"]
        add(f"  CPU: {cpu['model']}; {m['cores']} cores, {cpu['usable_cores']} usable by this process")
        add(f"  SIMD: {' '.join(cpu['simd'])}")
        add(f"  AMX: {'yes' if cpu['amx'] else 'no'}; portable build runs here: "
            + ("yes" if not cpu["missing_for_portable_build"] else f"NO, lacks {', '.join(cpu['missing_for_portable_build'])}"))
        add(f"  OS: {m['platform']}; root: {'yes' if m['root'] else 'no'}")
    if (lc := section("llama.cpp", "llama_cpp")) is not None:
        b = lc["build"]
        add(f"  llama-cpp-python {b['version']}: {_ok(lc['portable'])}")
        add(f"  CMAKE_ARGS: {b['cmake_args'] or '(unknown: no build record)'}")
        add(f"  installed from: {b['installed_from'] or '(not a local wheel)'}")
        add(f"  system info: {lc['system_info'] or '(unavailable)'}")
        for p in lc["problems"]:
            add(f"  problem: {p}")
    if (py := section("python", "python")) is not None:
        add(f"  Python {py['version']} ({py['executable']})")
        add("  " + ", ".join(f"{k} {v or '(not installed)'}" for k, v in py["packages"].items()))
    if (ln := section("link backends", "links")) is not None:
        for name, b in ln["backends"].items():
            add(f"  {name}: " + ("available" if b["available"] else f"unavailable: {b['reason']}"))
        add(f"  {ln['why']}")
    if (en := section("energy meters", "energy")) is not None:
        for name in ("rapl", "nvml"):
            e = en[name]
            add(f"  {name}: " + (f"available, {e['source']}" if e["available"] else f"unavailable: {e['reason']}"))
        add(f"  otherwise: {en['fallback']}")
    if (g := section("GPU", "gpu")) is not None:
        add("  " + ("; ".join(g["gpus"]) if g["gpus"] else f"none: {g['reason']}")
            + f"; torch CUDA: {g['torch_cuda']} (build {g['torch_cuda_build'] or 'CPU'})")
    if (mo := section(f"models (pair {r['models'].get('pair', '?')})", "models")) is not None:
        add(f"  cache: {mo['home']}")
        for role, x in mo["roles"].items():
            if x.get("file") is None:
                add(f"  {role}: {x['engine']} engine, no file")
                continue
            state = (f"verified ({x['how']})" if x["verified"] else x["problem"])
            add(f"  {role}: {x['file']}: {state}")
    if (rs := section("resources", "resources")) is not None:
        add(f"  disk: {rs['disk_free_gib']} GiB free at {rs['disk_path']}, {rs['disk_needed_gib']} GiB needed: "
            f"{_ok(rs['disk_ok'])}")
        add(f"  memory: {rs['memory_available_gib']} of {rs['memory_total_gib']} GiB available, "
            f"{rs['memory_needed_gib']} GiB needed: {_ok(rs['memory_ok'])} ({rs['needs_kind']})")
    if (co := section("contention", "contention")) is not None:
        threads = ", ".join(f"{k} {v}" for k, v in co["engine_threads"].items())
        add(f"  {co['other_load_cores']:.2f} of {co['usable_cores']} usable cores busy with other processes "
            f"over {co['sampled_s']:g} s; engine threads: {threads or 'n/a'}: "
            + ("CONTENDED" if co["contended"] else "ok"))
        for b in co["busy"][:6]:
            add(f"    pid {b['pid']} {b['name']}: {b['cpu_percent']:.0f}% of a core: {b.get('command') or ''}")
    add("\n[what the suite will do]")
    for v in verdicts(r):
        add(f"  {v}")
    return "specwan doctor" + "\n".join(lines)


def run(pair_name: str, as_json: bool = False, home: str | None = None) -> int:
    report = collect(pair_name, home)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render(report))
    return 0
