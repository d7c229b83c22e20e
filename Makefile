# Two entry points: `make demo` and `make test` (lint, then tests). Both build .venv from scratch when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
# LLaVA-3D's stack (transformers 4.37.2) for tests_legacy/: the same torch, then adatoken resolved against
# tests_legacy/requirements.lock, whose pins are the lower bounds of pyproject's dependency ranges.
LEGACY := .venv-legacy
LEGACY_PY := $(LEGACY)/bin/python
LEGACY_PIP := $(LEGACY_PY) -m pip --disable-pip-version-check -q
LEGACY_STAMP := $(LEGACY)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	# torch first and alone: the CPU wheel on these machines; nothing later may replace it.
	$(PIP) install torch==2.13.0
	$(PIP) install -c requirements.lock -e '.[test]'
	touch $(STAMP)

$(LEGACY_STAMP): pyproject.toml tests_legacy/requirements.lock
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY_PIP) install torch==2.13.0
	# one resolution: the lock's exact pins and adatoken's ranges must agree, or pip fails here
	$(LEGACY_PIP) install -r tests_legacy/requirements.lock -e .
	$(LEGACY_PIP) check
	touch $(LEGACY_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adatoken demo

# LLaVA-3D's environment is Python 3.10; the torch build it would need is not installable here, so the check
# is static: every module must compile under a 3.10 interpreter (pyenv's on these machines).
PY310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) $(shell command -v python3.10))

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	@test -n "$(PY310)" || { echo "make lint: no Python 3.10 interpreter found (set PY310=/path/to/python3.10)"; exit 1; }
	PYTHONPYCACHEPREFIX=$$(mktemp -d) $(PY310) -m compileall -q adatoken benchmarks tests tests_legacy

test: lint $(LEGACY_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
	$(LEGACY_PY) -m pytest -q -p no:cacheprovider tests_legacy

clean:
	rm -rf $(VENV) $(LEGACY) build *.egg-info
