# autogaze-gym: every command a user needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PRESET ?= tiny
PYTEST_ARGS ?=
# NPROC=N runs the trainers (train-bc, train-rl, train-recon) as N data-parallel processes on this
# node through torchrun (NCCL on CUDA, gloo on CPU); see README "Scaling out"
NPROC ?= 1
TRAIN := $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m,$(PY) -m)

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

.PHONY: collect-expert train-bc
COLLECT_ARGS ?=
BC_ARGS ?=

collect-expert: setup  ## label clips with the greedy oracle into data/expert/$(PRESET) (COLLECT_ARGS="--num-clips 4096")
	$(PY) -m experiments.collect_expert --preset $(PRESET) $(COLLECT_ARGS)

train-bc: setup  ## behaviour cloning on the oracle's gazes (labels data first if missing) -> runs/bc/$(PRESET)/final (BC_ARGS="--resume", NPROC=2)
	$(TRAIN) experiments.train_bc --preset $(PRESET) $(BC_ARGS)

.PHONY: train-rl
ALGO ?= grpo
RL_ARGS ?=

train-rl: setup  ## RL fine-tuning of the BC policy (ALGO=grpo|ppo) -> runs/rl/$(PRESET)/$(ALGO)/final (RL_ARGS="--resume")
	$(TRAIN) experiments.train_rl --preset $(PRESET) --algo $(ALGO) $(RL_ARGS)

.PHONY: bench
BENCH_ARGS ?=

bench: setup  ## env throughput of every front-end -> docs/benchmarks.md (BENCH_ARGS="--device cuda --presets paper")
	$(PY) -m experiments.bench --presets tiny,small --batch-sizes 1,64,1024 --threads 1 $(BENCH_ARGS)

.PHONY: train-recon
RECON_ARGS ?=

train-recon: setup  ## train the learned MAE reconstructor (reward="mae") -> runs/recon/$(PRESET)/final (RECON_ARGS="--resume latest")
	$(TRAIN) experiments.train_recon --preset $(PRESET) $(RECON_ARGS)

.PHONY: eval
POLICY ?= auto
VIDEOS ?=
OUT ?=
EVAL_ARGS ?=

eval: setup  ## policies vs every baseline: loss-ratio curves, Table-3 analogue, stopping, calibration, plots, GIFs -> runs/eval/$(PRESET) (POLICY="runs/bc/tiny/final rl=runs/rl/tiny/grpo/final" VIDEOS=dir OUT=dir EVAL_ARGS="--num-clips 64")
	$(PY) -m experiments.evaluate --preset $(PRESET) --policy $(POLICY) $(if $(VIDEOS),--videos $(VIDEOS)) $(if $(OUT),--out $(OUT)) $(EVAL_ARGS)

.PHONY: train
train: setup  ## the main job on the embedded data: data -> expert gazes -> BC -> GRPO -> evaluation (resumes; PRESET=tiny)
	$(PY) -m experiments.pipeline --preset $(PRESET)
