"""Shared fixtures."""
import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_pair_paths() -> dict[str, Path]:
    """The default pair's model files, fetched, verified and self-checked once per session.

    The self-check decodes a few tokens with each model in a child process first, so a
    llama.cpp build that crashes on this CPU fails the tests that need the models, by name
    and with the cause, instead of killing the whole test session with a signal.
    """
    from harness.pairs import DEFAULT_PAIR, ensure_pair, load_pair
    from harness.selfcheck import SelfCheckError, check_pair

    pair = load_pair(DEFAULT_PAIR)
    paths = ensure_pair(pair)
    if "passed" not in _SELFCHECK:
        try:
            check_pair(pair, paths, tokens=2, progress=None)
            _SELFCHECK["passed"] = True
        except SelfCheckError as exc:
            _SELFCHECK["passed"] = False
            _SELFCHECK["message"] = str(exc)
    if not _SELFCHECK["passed"]:
        pytest.fail(_SELFCHECK["message"], pytrace=False)
    return paths


_SELFCHECK: dict = {}


@pytest.fixture(scope="session")
def draft_model_path(default_pair_paths) -> Path:
    return default_pair_paths["draft"]


@pytest.fixture(scope="session")
def target_model_path(default_pair_paths) -> Path:
    return default_pair_paths["target"]


_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report():
    """Figures a test measures and reports (acceptance, gaps): printed after the run."""
    return _REPORT.append


_LOAD: dict = {}


def _machine_load() -> str:
    from harness.contention import sample

    s = sample(0.5)
    return ("CONTENDED: " if s.contended else "") + s.summary()


def _under_mutation_run() -> bool:
    """mutmut runs one short pytest session per mutant and names the mutant in this variable."""
    return bool(os.environ.get("MUTANT_UNDER_TEST"))


def pytest_sessionstart(session):
    """Other processes' load when the run starts: timing-sensitive tests fail under load, and this says so."""
    if not _under_mutation_run():  # a second per mutant adds up to many minutes
        _LOAD["start"] = _machine_load()


# Under a mutation run a test may take this many times its measured duration, plus the
# constant, before it fails as hung: loose enough for two busy cores, and far below
# mutmut's own limit, which is for the whole set of a mutant's tests.
MUTANT_TEST_SLACK = 10.0
MUTANT_TEST_CONSTANT_S = 15.0


def pytest_collection_modifyitems(config, items):
    """Under a mutation run, fastest tests first, each with a time limit of its own.

    mutmut stops at a mutant's first failing test (-x) and passes the tests in no
    particular order; with the slow statistical tests first, a mutant a one-second test
    catches would cost minutes. A mutant that makes a policy loop forever (one that never
    asks for verification) fails the first test it hangs, in seconds, instead of holding
    a worker until mutmut's limit for all its tests. The durations are the ones mutmut
    measured.
    """
    stats = Path(__file__).resolve().parents[1] / "mutmut-stats.json"  # mutmut's copy of the tree
    if not _under_mutation_run() or not stats.is_file():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
    for item in items:
        if item.nodeid in durations:
            limit = MUTANT_TEST_SLACK * durations[item.nodeid] + MUTANT_TEST_CONSTANT_S
            item.add_marker(pytest.mark.timeout(limit))


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("measured figures")
        for line in _REPORT:
            terminalreporter.write_line(line)
    if "start" in _LOAD:
        terminalreporter.section("machine load (measured, psutil)")
        terminalreporter.write_line(f"at the start: {_LOAD['start']}")
        terminalreporter.write_line(f"at the end: {_machine_load()}")


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a network namespace this test session created is still there."""
    import os

    try:
        from netem import ns
    except ImportError:
        return
    left = [n for n in ns.list_ours() if ns.owner(n) == os.getpid()]
    if left:
        for n in left:
            ns.delete(n)
        session.exitstatus = 1
        print(f"\nERROR: the test session left network namespaces behind (now deleted): {', '.join(left)}")
