"""Set-up's last step: each model of a pair loads and decodes a few tokens, in a child process.

A llama.cpp build that does not suit the CPU (ggml's AMX path, an instruction the CPU
lacks) dies inside ``llama_decode`` with a signal, taking any process with it. Running each
model in its own child turns that into a message naming the CPU's features, the build's
flags and the fix, instead of a bare "Segmentation fault" halfway through a benchmark.

The child (``python -m harness.selfcheck --worker ...``) reports each phase on stderr
(``phase: load``, ``phase: prefill``, ``phase: decode``) so a death is placed, and prints
one JSON line on stdout when it succeeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.sysinfo import cpu_info, exit_description, llama_build

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
DEFAULT_TOKENS = 8
DEFAULT_TIMEOUT_S = 600.0
_PHASE = "phase: "
PORTABLE_FIX = ("rebuild llama-cpp-python with the Makefile's portable flags: `rm -rf .venv && make install` "
                "(its LLAMA_CMAKE_ARGS keep -DGGML_NATIVE=OFF, AVX-512 and AMX off; a changed flag set "
                "rebuilds into a new wheelhouse)")


class SelfCheckError(RuntimeError):
    """A model of the pair failed to load or decode; the message names the cause and the fix."""


@dataclass(frozen=True)
class WorkerOutcome:
    """What a worker process left behind: its exit, its output, how long it ran."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def phase(self) -> str | None:
        """The last phase the worker announced before it stopped."""
        phases = [ln[len(_PHASE):].strip() for ln in self.stderr.splitlines() if ln.startswith(_PHASE)]
        return phases[-1] if phases else None

    @property
    def report(self) -> dict[str, Any] | None:
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    return None
        return None


@dataclass(frozen=True)
class ModelCheck:
    """One model to check: its role, engine, file, declared size and engine options."""

    role: str
    engine: str
    path: Path | None
    size: int | None = None
    options: Mapping[str, Any] | None = None

    @property
    def label(self) -> str:
        return f"the {self.role} model ({self.path.name if self.path else self.engine + ' engine'})"


def worker_command(check: ModelCheck, tokens: int = DEFAULT_TOKENS) -> list[str]:
    """The command that loads ``check``'s model in a fresh interpreter and decodes ``tokens`` tokens."""
    cmd = [sys.executable, "-m", "harness.selfcheck", "--worker", "--engine", check.engine, "--role", check.role,
           "--tokens", str(tokens), "--options", json.dumps(dict(check.options or {}))]
    if check.path is not None:
        cmd += ["--model", str(check.path)]
    return cmd


def start_worker(cmd: Sequence[str]) -> subprocess.Popen:
    return subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[1]))


def finish_worker(proc: subprocess.Popen, timeout: float, started: float | None = None) -> WorkerOutcome:
    """Wait for a worker; one that outlives ``timeout`` is killed and marked timed out."""
    started = time.monotonic() if started is None else started
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    return WorkerOutcome(proc.returncode, out or "", err or "", time.monotonic() - started, timed_out)


def _error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(_PHASE)]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "failed" in ln:
            return ln
    return lines[-1] if lines else "no error message"


def _machine_and_build(cpu, build) -> str:
    built = (f"llama-cpp-python {build.version} built with CMAKE_ARGS='{build.flags_summary()}'"
             + (f" (wheel {Path(build.installed_from).name})" if build.installed_from else ""))
    return f"CPU: {cpu.summary()}. {built}."


def _crash_cause(cpu, build) -> str:
    if cpu.missing_for_portable:
        return (f"This CPU lacks {', '.join(cpu.missing_for_portable)}, which llama.cpp's portable build needs; "
                "run the suite on an x86-64 CPU with AVX2, FMA and F16C")
    if build.problems:
        return "Cause: " + "; ".join(build.problems) + f". Fix: {PORTABLE_FIX}"
    if cpu.has_amx:
        return (f"The CPU has AMX but this build's flags exclude it, so the crash has another cause. Fix: {PORTABLE_FIX}; "
                "if it persists, attach `specwan doctor` to a bug report")
    return f"Fix: {PORTABLE_FIX}; if it persists, attach `specwan doctor` to a bug report"


def diagnose(check: ModelCheck, outcome: WorkerOutcome, timeout: float | None = None,
             fetch_hint: str = "specwan fetch") -> str | None:
    """None if the worker decoded its tokens; otherwise one message naming the cause and the fix."""
    phase = outcome.phase or "starting"
    if outcome.timed_out:
        return (f"self-check: {check.label} did not finish ({phase}) within {timeout or outcome.seconds:.0f} s. "
                "Other busy processes on these cores slow llama.cpp many times over: see `specwan doctor` "
                "(contention), stop them, and run `make selfcheck` again.")
    code = outcome.returncode
    if code == 0 and outcome.report is not None:
        return None
    how = exit_description(code if code is not None else 1)
    if code is not None and (code < 0 or 128 < code < 160):
        cpu, build = cpu_info(), llama_build()
        return (f"self-check: {check.label} crashed, {how}, during {phase} in llama.cpp. "
                f"{_machine_and_build(cpu, build)} {_crash_cause(cpu, build)}")
    error = _error_line(outcome.stderr)
    damaged = ""
    if check.path is not None:
        try:
            actual = check.path.stat().st_size
            if check.size is not None and actual != check.size:
                damaged = (f" The file is {actual:,} bytes but the pair declares {check.size:,}: it is truncated "
                           "or replaced.")
        except OSError:
            damaged = " The file cannot be read."
        fix = (f"Fix: delete {check.path} and run `{fetch_hint}` (it is fetched and verified again); "
               "if the file is intact, attach `specwan doctor` to a bug report")
    else:
        fix = "Fix: attach `specwan doctor` to a bug report"
    return f"self-check: {check.label} failed during {phase} ({how}): {error}.{damaged} {fix}"


def run_check(check: ModelCheck, tokens: int = DEFAULT_TOKENS, timeout: float = DEFAULT_TIMEOUT_S,
              fetch_hint: str = "specwan fetch") -> dict[str, Any]:
    """Run one model's check; its report (load time, decode speed, text) or :class:`SelfCheckError`."""
    started = time.monotonic()
    outcome = finish_worker(start_worker(worker_command(check, tokens)), timeout, started)
    message = diagnose(check, outcome, timeout, fetch_hint)
    if message is not None:
        raise SelfCheckError(message)
    return {"role": check.role, **outcome.report, "wall_s": round(outcome.seconds, 2)}


def pair_checks(pair, paths: Mapping[str, Path | None]) -> list[ModelCheck]:
    """One :class:`ModelCheck` per role of a :class:`harness.pairs.PairSpec`."""
    return [ModelCheck(role, spec.engine, None if paths.get(role) is None else Path(paths[role]),
                       spec.size if spec.needs_file else None, dict(spec.options))
            for role, spec in pair.roles().items()]


def check_pair(pair, paths: Mapping[str, Path | None], tokens: int = DEFAULT_TOKENS,
               timeout: float = DEFAULT_TIMEOUT_S, progress=print) -> list[dict[str, Any]]:
    """Check every model of ``pair``; raises :class:`SelfCheckError` with every failure's message."""
    from harness.contention import planned_threads, sample

    warning = sample(engine_threads=planned_threads(pair)).warning()
    if warning and progress:
        progress(f"self-check: {warning}")
    reports, failures = [], []
    for check in pair_checks(pair, paths):
        try:
            r = run_check(check, tokens, timeout, fetch_hint=f"specwan fetch --pair {pair.name}")
        except SelfCheckError as exc:
            failures.append(str(exc))
            continue
        reports.append(r)
        if progress:
            progress(f"self-check: {check.label}: loaded in {r['load_s']:.1f} s, prefill {r['prompt_tokens']} tokens "
                     f"at {r['prefill_tok_s']:.1f} tok/s, decoded {r['tokens']} tokens at {r['decode_tok_s']:.1f} "
                     f"tok/s ({r['threads'] or '?'} threads): {r['text']!r}")
    if failures:
        raise SelfCheckError(" | ".join(failures))
    return reports


# ---- the worker (a child process) ------------------------------------------------------------


def _phase(name: str) -> None:
    sys.stderr.write(f"{_PHASE}{name}\n")
    sys.stderr.flush()


def _worker(args: argparse.Namespace) -> int:
    import numpy as np

    from systems.engines import create_engine

    options = json.loads(args.options)
    if args.model:
        options["model_path"] = args.model
    if args.engine == "toy":
        options.setdefault("role", args.role)
    _phase("load")
    t0 = time.perf_counter()
    engine = create_engine(args.engine, **options)
    load_s = time.perf_counter() - t0
    try:
        prompt = engine.tokenize(PROMPT)
    except Exception:  # noqa: BLE001 - a test engine may not tokenize text; any ids will do
        prompt = list(range(1, 9))
    session = engine.new_session()
    _phase("prefill")
    t0 = time.perf_counter()
    logits = session.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    _phase("decode")
    out: list[int] = []
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        if not np.all(np.isfinite(logits)):
            raise RuntimeError(f"non-finite logits after {len(out)} decoded tokens: the build computes wrong results")
        token = int(np.argmax(logits))
        out.append(token)
        logits = session.score([token])[-1]
    decode_s = time.perf_counter() - t0
    try:
        text = engine.detokenize(out)
    except Exception:  # noqa: BLE001
        text = " ".join(map(str, out))
    threads = engine.info.extra.get("threads")
    print(json.dumps({"engine": args.engine, "load_s": round(load_s, 3), "prompt_tokens": len(prompt),
                      "prefill_tok_s": round(len(prompt) / prefill_s, 2) if prefill_s > 0 else None,
                      "tokens": len(out), "decode_tok_s": round(len(out) / decode_s, 2) if decode_s > 0 else None,
                      "threads": threads, "text": text}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.selfcheck", description="self-check worker")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--role", default="draft")
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    p.add_argument("--options", default="{}")
    args = p.parse_args(argv)
    try:
        return _worker(args)
    except Exception as exc:  # noqa: BLE001 - the parent reads this line to name the cause
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
