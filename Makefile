# `make repro` and `make test` do all the set-up a fresh clone needs: create .venv, install the
# package with the pinned versions, write the sample data if the data folder is absent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stages run `python -m pipeline.<stage>`: put the venv first on PATH for DVC's subprocesses.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Extra installer options (uv and pip read the same ones), e.g.
# PIP_OPTS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_OPTS ?=

.PHONY: help install data repro test test-fast lint bench report quick full predict docs clean

help:
	@echo "make repro   build .venv if needed, write sample data if data/ is absent, dvc repro"
	@echo "make test    the same set-up, then the whole test suite (slow tests included)"
	@echo "make quick   dvc exp run with 10 trials;  make full: the DeBERTa-v3 GPU profile"
	@echo "             (experiment quick, quick-2, ...; or NAME=my-exp)"
	@echo "make bench   throughput, learning curves + pruning replay, HPO efficiency, study speed,"
	@echo "             recipe curves (hours)"
	@echo "make report  Markdown report for a pull request: this workspace vs BASE (main)"
	@echo "make predict  POSTS=posts.csv OUT=evidence.csv [MODEL=models:/NAME/V]: evidence sentences"
	@echo "make docs    rewrite the figure tables of README.md and docs/ from bench/results/ and"
	@echo "             metrics/ (tools/docs.py; the site: .venv/bin/mkdocs serve)"
	@echo "make lint    ruff"

install: $(VENV)/.installed

# torch==2.13.0 from constraints.txt: on a machine with the CPU wheel on disk it is taken in
# seconds; elsewhere PyPI's default build, which is the CUDA one on Linux (a GPU user gets CUDA).
# The installer is uv (the PyPI package, put into the venv by pip): about 1 minute against pip's
# 3.5 on a fresh clone here. uv does not read pip's configuration, so the
# find-links, extra indexes and constraint files that pip would use (PIP_* variables or
# `pip config`) are passed on, and like pip it takes the best version across indexes. Like pip,
# it compiles the bytecode at install (--compile-bytecode): with PYTHONDONTWRITEBYTECODE set,
# every test process would otherwise compile torch, transformers and MLflow again.
# USE_PIP=1, or any failure of uv, installs with plain pip.
PIP := $(BIN)/python -m pip
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ -n "$(USE_PIP)" ]; then false; fi \
	  && $(PIP) install -q --disable-pip-version-check uv \
	  && args="" \
	  && for u in $${PIP_FIND_LINKS:-$$($(PIP) config get global.find-links 2>/dev/null)}; do \
	       args="$$args --find-links $$u"; done \
	  && for u in $${PIP_EXTRA_INDEX_URL:-$$($(PIP) config get global.extra-index-url 2>/dev/null)}; do \
	       args="$$args --extra-index-url $$u"; done \
	  && for u in $${PIP_CONSTRAINT:-$$($(PIP) config get global.constraint 2>/dev/null)}; do \
	       args="$$args -c $$u"; done \
	  && $(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode \
	       --index-strategy unsafe-best-match $$args $(PIP_OPTS) -c constraints.txt -e '.[dev]' \
	  || $(PIP) install -q --disable-pip-version-check $(PIP_OPTS) -c constraints.txt -e '.[dev]'
	touch $@

data: install
	$(BIN)/python -m pipeline.sample_data --if-missing

repro: data
	$(BIN)/dvc repro

# make test: every test. make test-fast: the tests not marked slow (slow: real studies, stage
# processes, `dvc repro` / `dvc exp run`, kills), in about half a minute.
test: data
	$(BIN)/python -m pytest

test-fast: data
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check pipeline tests bench tools

# Benchmarks print their tables and write bench/results/ (docs/benchmarks.md): throughput and
# the engine's epoch profile, the learning-curve table and the pruning replay on it, the 30-trial
# pruning policy (per-epoch reports) end to end, waves vs the schedule, what parallelism costs in
# sample efficiency, the GPU projection, and the training-recipe curves (hours on 2 cores; each
# script can be run alone). `make docs` then rewrites the tables of the pages.
bench: data
	$(BIN)/dvc repro prepare
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/train_throughput.py --profile
	$(BIN)/python bench/curves.py --trials 0-29
	$(BIN)/python bench/pruning_replay.py
	$(BIN)/python bench/hpo_efficiency.py --report epoch --out bench/results/hpo_efficiency_30.json
	$(BIN)/python bench/study_speed.py
	$(BIN)/python bench/parallelism_cost.py --seeds 50
	$(BIN)/python bench/gpu_projection.py
	$(BIN)/python bench/recipe_curves.py

BASE ?= main
report: install
	$(BIN)/python -m pipeline.report --rev $(BASE) --out report.md

# The experiment is named after the profile (quick, then quick-2, ... once taken) unless NAME=...
quick: data
	$(BIN)/python -m pipeline.profiles quick $(if $(NAME),--name $(NAME))

full: data
	$(BIN)/python -m pipeline.profiles full $(if $(NAME),--name $(NAME))

# Score every sentence x criterion of a posts file (ReDSM5 layout) at the shipped threshold.
POSTS ?= data/redsm5_posts.csv
OUT ?= evidence.csv
predict: install
	$(BIN)/python -m pipeline.predict --posts $(POSTS) --out $(OUT) $(if $(MODEL),--model $(MODEL))

# The figure tables of README.md and docs/*.md, written from bench/results/*.json and
# metrics/*.json (tests/test_docs.py fails while a committed page differs from what this writes).
docs: install
	$(BIN)/python tools/docs.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
