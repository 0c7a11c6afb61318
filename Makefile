# SpecWAN: `make test` and `make bench` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PAIR ?= qwen25coder
# llama-cpp-python builds from source; skipping the multimodal library halves the build.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: test bench install models overhead clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

models: $(STAMP)
	$(PY) -m harness.cli fetch --pair $(PAIR)

test: models
	$(PY) -m pytest

bench: models
	$(PY) -m harness.cli bench --pair $(PAIR)

overhead: $(STAMP)
	$(PY) benchmarks/round_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
