# SpecWAN: `make test` and `make bench` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PAIR ?= qwen25coder

# llama-cpp-python is built from source, once per flag set, into a project-local wheelhouse.
# The flags are portable: correct on every x86-64 CPU with AVX2. Native detection would take
# whatever the build machine offers (AVX-512, AMX) and the AMX path crashes in llama_decode on
# the default pair, so native detection, AVX-512 and AMX are off. LLAVA_BUILD=OFF skips the
# multimodal library, halving the build.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF \
	-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=OFF \
	-DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
# A wheel is keyed by the package version, the interpreter and the flags: pip's own wheel
# cache keys it by the sdist alone and would reuse a wheel built with other flags.
LLAMA_FLAGS := $(strip $(LLAMA_CMAKE_ARGS))
LLAMA_KEY := $(shell printf '%s|%s|%s' '$(LLAMA_CPP_VERSION)' \
	"$$($(PYTHON) -c 'import sys; print(sys.implementation.cache_tag)')" '$(LLAMA_FLAGS)' \
	| sha256sum | cut -c1-12)
WHEELHOUSE := .wheelhouse/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_KEY)
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_KEY)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: test bench install models selfcheck doctor overhead clean distclean browser report decision-map

install: $(STAMP)

# pip is pinned: 26.3 refuses to download an sdist from the index whose metadata declares a
# direct URL dependency (bigbench==1.0.0, a prompt set), where 26.1.2 downloads it.
PIP_VERSION := 26.1.2
PIP_STAMP := $(VENV)/.pip-$(PIP_VERSION)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(PIP_STAMP): | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check 'pip==$(PIP_VERSION)'
	@rm -f $(VENV)/.pip-* && touch $@

$(WHEELHOUSE)/.built: | $(PIP_STAMP)
	@echo "llama-cpp-python $(LLAMA_CPP_VERSION): building into $(WHEELHOUSE)"
	@echo "  CMAKE_ARGS=$(LLAMA_FLAGS)"
	@echo "  about 5 minutes on 2 cores; full log: $(WHEELHOUSE)/build.log"
	@rm -rf $(WHEELHOUSE).partial && mkdir -p $(WHEELHOUSE).partial
	@CMAKE_ARGS='$(LLAMA_FLAGS)' $(PY) -m pip wheel --no-cache-dir --no-deps --verbose \
		--no-binary llama-cpp-python -w $(WHEELHOUSE).partial \
		'llama-cpp-python==$(LLAMA_CPP_VERSION)' > $(WHEELHOUSE).partial/build.log 2>&1 \
		|| { tail -n 40 $(WHEELHOUSE).partial/build.log; \
		     echo "llama-cpp-python build failed; full log: $(WHEELHOUSE).partial/build.log"; exit 1; }
	@grep -E 'Adding CPU backend variant' $(WHEELHOUSE).partial/build.log | sed 's/^ */  build: /' || true
	@grep -A6 'Manually-specified variables were not used' $(WHEELHOUSE).partial/build.log \
		| sed 's/^/  build warning: /' || true
	@printf '%s\n' '$(LLAMA_FLAGS)' > $(WHEELHOUSE).partial/cmake_args.txt
	@rm -rf $(WHEELHOUSE) && mv $(WHEELHOUSE).partial $(WHEELHOUSE)
	@touch $@

# Installs the wheel built with these flags over whatever llama-cpp-python the venv had.
$(LLAMA_STAMP): $(WHEELHOUSE)/.built
	$(PY) -m pip install --quiet --no-index --no-deps --force-reinstall \
		$(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	@$(PY) -c 'import json, sys; json.dump(dict(version=sys.argv[1], cmake_args=sys.argv[2], \
		key=sys.argv[3], wheelhouse=sys.argv[4]), open(sys.argv[5], "w"), indent=1)' \
		'$(LLAMA_CPP_VERSION)' '$(LLAMA_FLAGS)' '$(LLAMA_KEY)' '$(abspath $(WHEELHOUSE))' \
		$(VENV)/llama-cpp-build.json
	@rm -f $(VENV)/.llama-cpp-* && touch $@

# --only-binary with the wheelhouse as the one source of llama-cpp-python wheels: pip can
# never build or fetch another one while resolving the project's dependencies.
$(STAMP): pyproject.toml $(LLAMA_STAMP) $(PIP_STAMP)
	$(PY) -m pip install --quiet --find-links $(WHEELHOUSE) --only-binary llama-cpp-python \
		-e '.[dev]'
	@touch $(STAMP)

models: $(STAMP)
	$(PY) -m harness.cli fetch --pair $(PAIR)
	$(PY) -m harness.cli selfcheck --pair $(PAIR)

selfcheck: $(STAMP)
	$(PY) -m harness.cli selfcheck --pair $(PAIR)

doctor: $(STAMP)
	$(PY) -m harness.cli doctor --pair $(PAIR)

# The report's test opens it in headless Chromium (Debian's package); installed when absent.
browser:
	@command -v chromium >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Chromium (Debian's chromium package) for the report's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "make test needs Chromium for the report's browser test: run 'sudo apt-get install chromium' (Debian/Ubuntu), then make test again" >&2; exit 2; \
	fi

test: models browser
	$(PY) -m pytest

bench: models
	$(PY) -m harness.cli run experiment=bench pair=$(PAIR)
	$(PY) -m analysis.report results/bench-$(PAIR)

# The README's decision maps (docs/): every system over RTT x uplink on the pair, then the maps;
# rerunning resumes the sweep (results/decision_map-<pair>/) and redraws.
decision-map: models
	$(PY) -m harness.cli run experiment=decision_map pair=$(PAIR)
	$(PY) -m analysis.decision results/decision_map-$(PAIR) --objective latency --out docs/decision_map
	$(PY) -m analysis.decision results/decision_map-$(PAIR) --objective cloud_time \
		--systems vanilla,pipesd,picospec,hsl,edgellm --out docs/decision_map

# The report of the runs in RUNS (run folders or sweeps; default: the run or sweep under results/ written last).
report: $(STAMP)
	$(PY) -m analysis.report $(if $(RUNS),$(RUNS),--latest results)

overhead: $(STAMP)
	$(PY) benchmarks/round_overhead.py

# A 10-minute soak of one cloud process (toy pair, SLED) under honest and bad clients: its
# memory and descriptors over time, in results/soak-toy-sled/ (benchmarks/soak.py --help).
.PHONY: soak
soak: $(STAMP)
	$(PY) benchmarks/soak.py

# The fleet simulator's speed: simulated tokens per wall second, wall seconds and peak RSS for
# N = 10, 100, 1,000 devices over 60 s of virtual time, and a profile (benchmarks/fleet_speed.py --help).
.PHONY: fleet-speed
fleet-speed: $(STAMP)
	$(PY) benchmarks/fleet_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

distclean: clean
	rm -rf .wheelhouse

# Mutation testing, a tool like a benchmark (not part of `make test`): mutmut mutates systems/
# and the virtual-time core of harness/ (link, clock, compute) and runs the fast tests against
# each mutant, then prints the score and the survivors per module. Results are kept under
# mutants/ and reused; MUTANTS='systems.records*' (mutmut's name globs) limits a run. mutmut
# refreshes the Python files it mutates but not the other files under those folders (a trained
# controller, a schema), so they are copied over first: a stale one fails its tests there.
# QUICK=1: a first pass on a thinner conformance grid (two seeds of six); its survivors are run
# again without it (MUTANTS="$$(... mutation_score.py --rerun GLOB)") before they are judged.
QUICK ?= 0
.PHONY: mutate
mutate: $(STAMP)
	@if [ -d mutants ]; then for d in systems harness; do (cd $$d && find . -type f ! -name '*.py' \
		! -name '*.pyc' -exec cp --parents {} ../mutants/$$d/ \;); done; fi
	SPECWAN_MUTATION_QUICK=$(QUICK) $(VENV)/bin/mutmut run $(MUTANTS); status=$$?; $(PY) benchmarks/mutation_score.py; exit $$status
