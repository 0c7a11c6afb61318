"""Helpers shared by tests: reference decodes and exact toy-model probabilities."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np

from systems.sampling import SamplingParams, probabilities


def greedy_decode(engine, prompt: Sequence[int], max_new: int, stops: Sequence[int] = ()):
    """The engine's own greedy decode, one token per forward pass.

    Returns (tokens, gaps) where gaps[i] is the top-2 logit gap at step i.
    """
    stops = set(stops) | set(engine.eos_token_ids)
    session = engine.new_session()
    try:
        logits = session.prefill(list(prompt))
        tokens, gaps = [], []
        for _ in range(max_new):
            top2 = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
            gaps.append(float(top2[1] - top2[0]))
            t = int(np.argmax(logits))
            tokens.append(t)
            if t in stops:
                break
            logits = session.score([t])[-1]
        return tokens, gaps
    finally:
        session.close()


def exact_sequence_probs(target, prompt: Sequence[int], length: int, params: SamplingParams) -> dict:
    """P(first ``length`` output tokens) under the toy target, truncated at EOS.

    Sequences that stop early at EOS are keyed by their shorter tuple.
    """
    eos = set(target.eos_token_ids)
    out: dict[tuple, float] = {}

    def walk(prefix: tuple, prob: float):
        if len(prefix) == length or (prefix and prefix[-1] in eos):
            out[prefix] = out.get(prefix, 0.0) + prob
            return
        p = probabilities(target.logits_for(list(prompt) + list(prefix)), params)
        for v in np.nonzero(p)[0]:
            walk(prefix + (int(v),), prob * float(p[v]))

    walk((), 1.0)
    return out


def chi2_against(counts: dict, expected_probs: dict, n: int, min_expected: float = 5.0):
    """Pearson χ² p-value of observed counts vs exact probabilities, pooling small bins."""
    from scipy.stats import chisquare

    unexpected = set(counts) - set(expected_probs)
    if unexpected:
        raise AssertionError(f"outputs with probability 0 under the target: {sorted(unexpected)[:5]}")
    obs, exp = [], []
    pool_o = pool_e = 0.0
    for key, p in sorted(expected_probs.items(), key=lambda kv: -kv[1]):
        if p * n >= min_expected:
            obs.append(counts.get(key, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(key, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    return float(chisquare(obs, exp).pvalue)


@contextmanager
def cloud(tmp_path: Path, *args: str, token: str | None = None, system: str = "vanilla"):
    """A toy-pair cloud server process (``python -m harness.cloud_server``) serving ``system``
    on loopback, with ``args`` added to its command line; yields its ready-file contents with
    ``proc`` (the process) and ``ready`` (the file). Its log goes to ``tmp_path/cloud.log`` (a
    file, not a pipe: a busy server must never block on a full pipe). ``token`` is passed in
    the environment; without one the server writes a generated token to the ready file."""
    from harness.transport.auth import TOKEN_ENV
    from harness.wall import REPO_ROOT

    ready, log = tmp_path / "ready.json", tmp_path / "cloud.log"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if token is not None:
        env[TOKEN_ENV] = token
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "harness.cloud_server", "--pair", "toy", "--system", system,
                                 "--ready-file", str(ready), *args], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not ready.is_file():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the cloud did not become ready"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        info["proc"], info["ready"] = proc, ready
        yield info
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)


@functools.lru_cache(maxsize=None)
def toy_vocab_fingerprint() -> str:
    """The toy pair's vocabulary fingerprint: what an edge presents to a toy-pair cloud."""
    from harness.pairs import load_pair
    from systems.engines import create_engine

    target = load_pair("toy").target
    return create_engine(target.engine, role="target", **target.options).info.vocab_fingerprint


def shared_scope(fixture_name: str, config) -> str:
    """The scope of a fixture that runs system code once for all of a module's tests:
    "module", except while mutmut records which tests reach which function (``make mutate``).
    There each test runs the fixture's code itself: mutmut credits a function's calls to the
    test that was running, so a module-scoped run would be credited to the first test alone,
    and every later test that reads it would be left out of the mutants' runs."""
    return "function" if os.environ.get("MUTANT_UNDER_TEST") == "stats" else "module"
