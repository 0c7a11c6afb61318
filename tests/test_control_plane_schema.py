"""The cloud's control plane fuzzed by schemathesis over HTTP, against its own OpenAPI document.

A real ``harness.cloud_server`` process (toy pair, vanilla) serves ``/openapi.json``; every
operation in it gets schemathesis' deterministic coverage cases (boundary bodies, methods the
path does not allow) and Hypothesis-generated cases, valid ones and (where the operation takes
input) invalid ones, each checked by every built-in check (no 5xx, a documented status, a
documented content type, a body conforming to the documented schema...). ``/shutdown`` needs
a 256-bit token, so no generated request may stop the server: it must still answer with the
same pid afterwards, and still stop for the right token.

Schemathesis' lazy pytest loader (``schemathesis.pytest.from_fixture``) fails on pytest 9
(``request.node._nodeid`` is gone), and an eagerly loaded schema would need the server at
import time, so the cases are drawn and run inside each test with Hypothesis directly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup

from tests.support import cloud

MAX_EXAMPLES = 40  # Hypothesis cases per operation and generation mode


@contextmanager
def cloud_server(tmp_path: Path):
    """A toy-pair vanilla cloud process on loopback (:func:`tests.support.cloud`); its ready
    file's contents (ports, pid, the generated token) with ``proc`` and ``base`` (the control
    plane's URL)."""
    with cloud(tmp_path) as info:
        info["base"] = f"http://127.0.0.1:{info['http_port']}"
        yield info


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _shutdown(base: str, token: str) -> int:
    req = urllib.request.Request(f"{base}/shutdown", data=json.dumps({"token": token}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@dataclass
class Tally:
    """What a fuzzing run sent and found."""

    operations: list[str] = field(default_factory=list)
    cases: Counter = field(default_factory=Counter)  # (operation, phase or mode) -> cases sent
    statuses: Counter = field(default_factory=Counter)  # (operation, method sent, status) -> responses
    failures: list[str] = field(default_factory=list)  # each unexpected failure: request, response, check
    known: Counter = field(default_factory=Counter)  # tolerated known failures, by description


def _describe(case, response, failure: BaseException) -> str:
    status = "no response" if response is None else f"{response.status_code} {response.text[:200]!r}"
    return (f"{case.operation.label} [{type(failure).__name__}: {str(failure).splitlines()[0][:200]}]\n"
            f"  request: {case.as_curl_command()}\n  response: {status}")


def _run_case(case, base: str, tally: Tally, mode: str, tolerate) -> None:
    """Send one case, run every check on the response; record what fails (never raises, so
    Hypothesis generates every example instead of stopping to shrink the first failure)."""
    tally.cases[(case.operation.label, mode)] += 1
    response = None
    try:
        response = case.call(base_url=base, timeout=10)
        tally.statuses[(case.operation.label, case.method, response.status_code)] += 1
        case.validate_response(response)
    except (Exception, FailureGroup) as exc:  # noqa: BLE001 - a check failure, a group of them, no answer at all
        for failure in getattr(exc, "exceptions", (exc,)):
            why = tolerate(case, failure)
            if why:
                tally.known[why] += 1
            else:
                tally.failures.append(_describe(case, response, failure))


def fuzz(base: str, operations=None, tolerate=lambda case, failure: None) -> Tally:
    """Every operation of the server's schema (or those labelled in ``operations``):
    coverage cases, then Hypothesis cases in positive mode and, for an operation with
    inputs, negative mode. ``tolerate(case, failure)`` names a known failure to count
    apart (a truthy description), or returns None."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    tally = Tally()
    for result in schema.get_all_operations():
        op = result.ok()
        if operations is not None and op.label not in operations:
            continue
        tally.operations.append(op.label)
        coverage = schema.config.generation_for(operation=op, phase="coverage")
        for case in schema.iter_coverage_cases(op, generation_modes=list(GenerationMode), generation_config=coverage):
            _run_case(case, base, tally, "coverage", tolerate)
        has_input = len(op.body) or any(len(p) for p in (op.query, op.headers, op.path_parameters, op.cookies))
        for mode in [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_input else []):
            _hypothesis_cases(op, mode, base, tally, tolerate)
    return tally


def _hypothesis_cases(op, mode, base: str, tally: Tally, tolerate) -> None:
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def each(case):
        _run_case(case, base, tally, mode.value, tolerate)

    each()


def test_schemathesis_finds_nothing_and_the_server_keeps_its_secret(tmp_path, capsys):
    with cloud_server(tmp_path) as info:
        base = info["base"]
        tally = fuzz(base)
        n_cases = sum(tally.cases.values())
        with capsys.disabled():
            print(f"\nschemathesis on the control plane: {len(tally.operations)} operations, {n_cases} test cases "
                  f"({', '.join(f'{op} {mode}: {n}' for (op, mode), n in tally.cases.items())}), "
                  f"{len(tally.failures)} failures")
        assert sorted(tally.operations) == ["GET /healthz", "GET /info", "GET /stats", "POST /shutdown"]
        assert not tally.failures, "\n".join(tally.failures)
        # generated inputs met /shutdown's wrong-token (401) and bad-body (422) refusals, never a success
        shutdown = {s for (label, method, s) in tally.statuses if label == "POST /shutdown" and method == "POST"}
        assert {401, 422} <= shutdown and 200 not in shutdown, shutdown
        assert all(tally.cases[(label, "positive")] >= 1 for label in tally.operations)
        assert tally.cases[("POST /shutdown", "negative")] >= MAX_EXAMPLES // 2

        # still up, the same process, and it still obeys the right token (and only that)
        health = _get(f"{base}/healthz")
        assert health["status"] == "ok" and _get(f"{base}/info")["pid"] == info["pid"] == info["proc"].pid
        assert info["proc"].poll() is None
        assert _shutdown(base, info["token"][::-1]) == 401
        assert _shutdown(base, info["token"]) == 200
        assert info["proc"].wait(timeout=15) == 0


def test_shutdown_documents_every_status_it_sends(tmp_path):
    with cloud_server(tmp_path) as info:
        tally = fuzz(info["base"], operations={"POST /shutdown"})
        assert tally.cases[("POST /shutdown", "negative")] > 0
        assert not tally.failures, "\n".join(tally.failures)
