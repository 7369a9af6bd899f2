# `make demo`: set up, then run the whole pipeline on the built-in synthetic default (CPU, minutes).
# `make test`: set up, then lint and run the tests. Both install what they need into .venv themselves.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.merv-installed
CORES ?= 2
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline
export DVC_NO_ANALYTICS := 1

.PHONY: setup demo miniature test lint unit clean help slurm-profile slurm-packages browser-packages lmms-eval-packages \
	reference-venvs

help:
	@echo "make demo   - set up and run the pipeline on the built-in default -> results/merv_tiny/eval.json"
	@echo "make test   - set up, lint (ruff, snakemake --lint) and run the tests"
	@echo "make setup  - only create .venv with everything installed"
	@echo "make miniature - the paper's merv_full DAG at toy size (stand-in weights) -> results/merv_full/eval.json"

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: pip takes this build from the machine's local disk (see README).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,pipeline]'
	touch $@

setup: $(STAMP)

demo: setup
	@start=$$(date +%s); \
	snakemake --cores $(CORES) results/merv_tiny/eval.json --configfile config/demo.yaml && \
	echo "pipeline finished in $$(( $$(date +%s) - start )) s" && cat results/merv_tiny/eval.json

# the paper's DAG (four encoder families, two stages) at toy size, on this machine's CPUs
miniature: setup
	@start=$$(date +%s); \
	snakemake --cores $(CORES) results/merv_full/eval.json --configfile config/miniature.yaml && \
	echo "miniature finished in $$(( $$(date +%s) - start )) s" && cat results/merv_full/eval.json

lint: setup
	ruff check .
	ruff format --check .
	snakemake --lint

unit: setup
	pytest -q -m "not slow"

# the Slurm integration tests start a real cluster from Debian's packages (scripts/slurm-cluster)
slurm-packages:
	scripts/slurm-cluster install

# the chat page test drives Debian's headless Chromium and reads its screenshot with tesseract
BROWSER_PACKAGES := chromium tesseract-ocr tesseract-ocr-eng fonts-dejavu-core
browser-packages:
	@if [ "$$(dpkg-query -W -f='$${Status}\n' $(BROWSER_PACKAGES) 2>/dev/null | grep -c 'install ok installed')" = \
	     "$(words $(BROWSER_PACKAGES))" ]; then echo "browser packages already installed"; else \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -q && $$sudo apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES); fi

# lmms-eval (the plugin test runs its real CLI) pins PyAV < 16, which the video tests need: its installer keeps PyAV
lmms-eval-packages: setup
	@$(BIN)/python -c "import lmms_eval" 2>/dev/null && echo "lmms-eval already installed" || \
	  $(BIN)/python -m merv.integrations.install_lmms_eval

# the parity tests run reference implementations that need other pins than merv's (LanguageBind's code: transformers
# 4.x) in venvs of their own under .cache/venvs/, rebuilt when tests/reference/*-requirements.txt changes (~2 min)
reference-venvs: setup
	$(BIN)/python -m tests.reference.venvs languagebind

test: lint slurm-packages browser-packages lmms-eval-packages reference-venvs
	pytest -q

# lets `snakemake --profile slurm ...` find profiles/slurm (Snakemake looks in the user's config folder)
SNAKEMAKE_CONFIG := $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake
slurm-profile:
	mkdir -p $(SNAKEMAKE_CONFIG)
	ln -sfn $(CURDIR)/profiles/slurm $(SNAKEMAKE_CONFIG)/slurm

clean:
	rm -rf results/merv_tiny results/merv_full data/synth data/shards data/weights .snakemake report.html
