# PacsLens: `make run` starts everything; `make test` runs the whole suite; `make lint` checks style, types and layout.
# PYTHON picks the interpreter the virtualenv is made with (3.11 or 3.12: README, "Two commands");
# an existing .venv is kept whatever PYTHON says (`make clean` first to switch).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# The FHIR server the tests talk to (Node, from the committed lock file): tests/support/fhir_router.py.
FHIR_PEER := tests/support/medplum_fhir
FHIR_PEER_STAMP := $(FHIR_PEER)/node_modules/.installed

.PHONY: run test lint bench setup clean

# Runtime requirements only: what a production server installs too.
$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: apt-get install python3.11-venv, or make run PYTHON=python3.12"; exit 1; }
	@test -x $(PY) || { echo "==> Creating the virtualenv $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> Installing the runtime requirements into $(VENV) (requirements.txt; a few minutes the first time)"
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

# Tests and lint tools (pytest, Playwright, ruff, mypy...): never on a production server.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	@echo "==> Installing the test and lint tools into $(VENV) (requirements-dev.txt)"
	@$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $(DEV_STAMP)

setup: $(STAMP)
	@echo "==> Migrating the database, collecting static files, preparing the site"
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput --verbosity 0
	$(PY) manage.py setup_site

run: setup
	@echo "==> Starting web (http://localhost:8000/), DICOM listener (port 11112) and workers; Ctrl-C stops all three"
	$(VENV)/bin/honcho --procfile Procfile start

# Without npm the FHIR server tests skip on a developer machine (and fail under CI=true).
$(FHIR_PEER_STAMP): $(FHIR_PEER)/package-lock.json
	@if command -v npm >/dev/null; then \
		cd $(FHIR_PEER) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the tests against the FHIR server will skip (apt-get install nodejs npm)"; fi

test: $(DEV_STAMP) $(FHIR_PEER_STAMP)
	$(PY) -m pytest

# ruff (lint, then format check), mypy with django-stubs, import-linter's layout contracts.
lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The benchmarks drive the test peers (tests/support), so they need the test tools too.
# Each ends with issue 17's targets, MET or NOT MET; `make bench BENCH_ARGS=--quick` is a smoke run.
bench: $(DEV_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(FHIR_PEER)/node_modules
