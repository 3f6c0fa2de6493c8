# The two commands: `make run` starts the broker, `make test` runs every check.
# Both set up what they need (a virtual environment in .venv) from a fresh clone.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck pytest pytest-postgres clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.run-deps

## Start the broker and its dashboard on http://127.0.0.1:8000 (SQLite under var/ unless
## BROKER_DATABASE_URL is set), with the demo market; DEMO=0 starts an empty broker.
DEMO ?= 1
run: $(VENV)/.run-deps
	$(BIN)/broker db upgrade
	$(BIN)/broker serve --no-migrate $(if $(filter 0,$(DEMO)),,--demo)

## Lint (and the import layers), type-check, and run the tests on SQLite and (when installed) PostgreSQL.
test: lint typecheck pytest pytest-postgres

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -p no:cacheprovider tests/test_layers.py  # imports run one way (README, Layout)

typecheck: $(VENV)/.dev-deps
	$(BIN)/mypy broker adapters solver web migrations benchmarks tests examples client

pytest: $(VENV)/.dev-deps
	$(BIN)/pytest

pytest-postgres: $(VENV)/.dev-deps
	scripts/with-postgres.sh $(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
