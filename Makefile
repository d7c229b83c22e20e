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

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint $(LEGACY_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
	$(LEGACY_PY) -m pytest -q -p no:cacheprovider tests_legacy

clean:
	rm -rf $(VENV) $(LEGACY) build *.egg-info
