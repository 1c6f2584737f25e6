# Two commands set everything up on a fresh machine (Python >= 3.10, a C++
# compiler): `make bench` runs the benchmarks on the present device and
# `make test` runs the tests. Each creates .venv if missing, installs the
# pinned dependencies and builds genkern (with its C++ extension) in place.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=
# SYSTEM_DEPS=1: use the torch/triton already installed on the machine (e.g. a
# GPU machine without network) instead of installing the pinned versions.
SYSTEM_DEPS ?= 0

.PHONY: all setup build test bench info clean lint

all: test

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "genkern needs Python >= 3.10"'
	$(PYTHON) -m venv $(if $(filter 1,$(SYSTEM_DEPS)),--system-site-packages) $(VENV)

$(VENV)/.deps: requirements.txt | $(VENV)/bin/python
ifeq ($(SYSTEM_DEPS),1)
	$(PY) -c 'import torch, pytest, setuptools'
else
	$(PY) -m pip install -q -r requirements.txt
endif
	touch $@

# The first build installs genkern in editable mode; later ones rebuild the extension
# in place, keeping object files under build/ so that only changed sources recompile.
$(VENV)/.build: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	@if [ $(VENV)/.installed -nt setup.py ] && [ $(VENV)/.installed -nt pyproject.toml ]; then \
	  MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace; \
	else \
	  MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e . && touch $(VENV)/.installed; \
	fi
	@if [ -f genkern/_build_error.txt ]; then echo "warning: the C++ extension did not build:"; head -3 genkern/_build_error.txt; fi
	touch $@

setup: $(VENV)/.build

build:
	rm -f $(VENV)/.build
	$(MAKE) setup

test: setup
	$(PY) -m pytest tests/ -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/genkern bench $(BENCH_ARGS)

info: setup
	$(VENV)/bin/genkern info

clean:
	rm -rf build genkern/_C*.so genkern/_build_error.txt $(VENV)/.build $(VENV)/.installed

# Style: ruff (lint + format, pyproject.toml) over the Python tree, clang-format (.clang-format)
# over csrc/. Fix with `ruff check --fix . && ruff format .` and `clang-format -i csrc/*`.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror csrc/*.cpp csrc/*.h

# csrc/ compiles (g++ -fsyntax-only, setup.py's flags) against the headers of the oldest
# supported torch (its wheel's include/, fetched once into ~/.cache/genkern; needs PyPI, see
# tests/test_build.py), and includes no torch/csrc/ internals. Part of `make test` too.
.PHONY: check-headers
check-headers: $(VENV)/.deps
	$(PY) -m pytest tests/test_build.py -q -k "torch_headers" $(PYTEST_ARGS)
