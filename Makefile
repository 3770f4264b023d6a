# The project's commands. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# Every install is pinned by constraints.txt (`make lock` rewrites it), build backend too.
PIN    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt

.PHONY: install lock run test test-fast lint format openapi migrate bench bench-admission soak clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIN) $(PY) -m pip install --quiet --upgrade pip
	$(PIN) $(PY) -m pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

## Resolve every dependency afresh (server, extras, client, build backend) into constraints.txt.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	PIP_CONSTRAINT= .lock-venv/bin/pip install --quiet --upgrade pip setuptools
	PIP_CONSTRAINT= .lock-venv/bin/pip install --quiet '.[embedded,dev]' ./clients/python
	{ echo "# Pins of every dependency of dreamgate (extras embedded and dev), dreamgate-client and"; \
	  echo "# the build backend, from one resolution (Python 3.11, Linux). Rewrite with make lock."; \
	  .lock-venv/bin/pip freeze --all --exclude dreamgate --exclude dreamgate-client; } > constraints.txt
	rm -rf .lock-venv

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
	$(VENV)/bin/ruff format --check service workers wirosim tests clients
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format service workers wirosim tests clients

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

migrate: install
	$(VENV)/bin/dreamgate migrate

clean:
	rm -rf $(VENV) .dreamgate .pytest_cache .mypy_cache .ruff_cache .lock-venv build dist
