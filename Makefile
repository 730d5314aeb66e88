# One entry point for people and CI: `make demo`, `make test` (.ci/run calls it), `make bench`, `make docs`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit docs bench services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes (its extras are what tests and demo need).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/run_demo.py

services:
	bash scripts/start-services.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy --strict taskframe brokers backends tests/typing

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

unit: $(VENV)/.installed
	$(BIN)/pytest

test: $(VENV)/.installed services lint typecheck docs unit

# Peers (Celery, Huey, Dramatiq, RQ) are benchmark-only: installed here, never by the package.
# e.g. make bench BENCH_ARGS="--broker sqlite --tasks 2000 --reps 1"
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) site build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
