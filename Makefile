# PacsLens: `make run` starts everything; `make test` runs the whole suite; `make lint` checks style, types and layout.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# The FHIR server the tests talk to (Node, from the committed lock file): tests/support/fhir_router.py.
FHIR_PEER := tests/support/medplum_fhir
FHIR_PEER_STAMP := $(FHIR_PEER)/node_modules/.installed

.PHONY: run test lint bench setup clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

setup: $(STAMP)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput --verbosity 0
	$(PY) manage.py setup_site

run: setup
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

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(FHIR_PEER)/node_modules
