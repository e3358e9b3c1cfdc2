# autogaze-gym: every command a user needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PRESET ?= tiny
PYTEST_ARGS ?=

.PHONY: help setup test test-fast lint data

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (fast when nothing changed)

test: setup  ## run the whole test suite (sets up first)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-fast: setup  ## the suite without slow tests
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

lint: setup  ## ruff over the code
	$(VENV)/bin/ruff check gaze_env rewards agents experiments tests

data: setup  ## materialise the embedded default data set under data/default (PRESET=tiny|small|paper)
	$(PY) -m experiments.prepare_data --preset $(PRESET)
