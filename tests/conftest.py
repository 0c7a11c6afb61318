"""Shared fixtures."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_pair_paths() -> dict[str, Path]:
    """The default pair's model files, fetched and verified once per session (no work when cached)."""
    from harness.pairs import DEFAULT_PAIR, ensure_pair, load_pair

    return ensure_pair(load_pair(DEFAULT_PAIR))


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


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("measured figures")
        for line in _REPORT:
            terminalreporter.write_line(line)


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
