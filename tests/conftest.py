"""Shared fixtures. TEMPORARY model-path fixtures until harness.models lands."""
from pathlib import Path

import pytest

_CACHE = Path.home() / ".cache" / "specwan" / "models"


@pytest.fixture(scope="session")
def draft_model_path() -> Path:
    return _CACHE / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


@pytest.fixture(scope="session")
def target_model_path() -> Path:
    return _CACHE / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
