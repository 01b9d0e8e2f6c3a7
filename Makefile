# pdserve developer entry points. Every target that needs the virtualenv creates or updates it
# first with scripts/setup.sh, which is idempotent (a few seconds when nothing changed).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python

# `make run PROMPT="..."`. Taken verbatim (no make expansion of `$`) and handed to the shell
# through the environment, so any characters survive.
PROMPT ?= Write a haiku about the sea.
override PROMPT := $(value PROMPT)
export PROMPT
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-m e2e -x"`.
PYTEST_ARGS ?=

.PHONY: help setup setup-dev run test lint format protos clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: ## create/update .venv with the runtime dependencies and the default model
	bash scripts/setup.sh

setup-dev: ## like setup, plus pytest, ruff and mypy
	bash scripts/setup.sh --dev

run: setup ## start all tiers locally and stream the chat answer to PROMPT
	$(VENV)/bin/pdserve up --generate "$$PROMPT"

# pytest exits 5 when it collects no tests; make treats that as a failure, as it should.
test: setup-dev ## run the test suite (benchmarks deselected; `-m benchmark` to run them)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup-dev ## ruff lint, ruff format check, mypy (files listed in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup-dev ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: ## regenerate protos/pdserve/v1/*_pb2*.py and descriptor.pb
	@test -x $(PY) || bash scripts/setup.sh
	$(PY) -m protos.build

clean: ## remove generated protos, build outputs and caches (keeps .venv)
	rm -f protos/pdserve/v1/*_pb2.py protos/pdserve/v1/*_pb2.pyi protos/pdserve/v1/*_pb2_grpc.py
	rm -f protos/pdserve/v1/descriptor.pb
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## clean, and remove .venv too
	rm -rf $(VENV)
