# sd-meebs: the user's verbs. `make help` lists them.
#
# Docker is the default for the verbs that train or serve (train, plan, fetch-model,
# tensorboard): they run in the CUDA image through `docker compose`. LOCAL=1 runs the
# same verb in a local virtualenv (.venv) instead. demo, test, lint and bench always run
# locally.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
COMPOSE ?= docker compose
# files written into the bind-mounted outputs/ belong to the host user (`env`: bash
# would refuse to set its read-only UID). The image's id goes into each run's manifest.
IMAGE   ?= sd-meebs:local
compose = env UID=$$(id -u) GID=$$(id -g) \
	MEEBS_IMAGE_DIGEST=$$(docker image inspect --format '{{.Id}}' $(IMAGE) 2>/dev/null) $(COMPOSE)
RECIPE  ?= demo
LOCAL   ?=
ARGS    ?=
GPUS    ?=
# GPUS=N trains with N data-parallel processes through `accelerate launch` (N is checked
# against the GPUs present first); multi-node: see docs/performance.md "Several GPUs".
gpus_arg = $(if $(GPUS),--gpus $(GPUS))

recipe_file = $(if $(findstring /,$(RECIPE)),$(RECIPE),recipes/$(RECIPE).yaml)
recipes     = $(patsubst recipes/%.yaml,%,$(wildcard recipes/*.yaml))
check_recipe = $(if $(wildcard $(recipe_file)),,$(error unknown recipe '$(RECIPE)': no $(recipe_file); available: $(recipes)))
# The verbs that take RECIPE check it while make reads this file, before any prerequisite
# runs: an unknown recipe is named first, whether or not this machine has Docker or a GPU.
recipe_goals = train plan $(if $(RUN),,reproduce)
ifneq ($(filter $(recipe_goals),$(MAKECMDGOALS)),)
$(check_recipe)
endif

.DEFAULT_GOAL := help
.PHONY: help demo test test-fast lint format plan train fetch-model tensorboard bench venv \
        fuzz lock clean clean-venv docker-check gpu-check image reproduce record data grid \
        demo-learn pretrain-tiny

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# .venv is installed from a hashed lock: the CPU lock with the test tools by default, the
# CUDA lock with GPU=1 (local NVIDIA training without Docker). torch==2.13.0+cpu comes from
# PyTorch's CPU index, not needed where pip already finds the wheel locally.
LOCK        := $(if $(GPU),requirements/cuda.lock,requirements/dev.lock)
TORCH_INDEX ?= $(if $(GPU)$(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),,--extra-index-url https://download.pytorch.org/whl/cpu)

$(VENV)/.installed: $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps $(TORCH_INDEX) -r $(LOCK)
	touch $@

venv: $(VENV)/.installed ## create .venv from the CPU lock (GPU=1: from the CUDA lock)

lock: ## regenerate requirements/*.lock from requirements/*.in (needs network)
	bash ci/lock.sh

data: $(VENV)/.installed ## redraw data/ (img_1.0, reg, img_1.1 via prep, demo): the same bytes
	$(PY) -m meebs.tiny.synthetic data

demo: $(VENV)/.installed ## train recipes/demo.yaml on the CPU (~1 min), print where files are
	$(PY) entrypoint.py train recipes/demo.yaml

demo-learn: $(VENV)/.installed ## train recipes/demo-learn.yaml (~5 min), then the verdict (~3 min): meeb rate per epoch, grid
	$(PY) entrypoint.py train recipes/demo-learn.yaml
	$(PY) entrypoint.py verdict outputs/meebs_demo_learn

pretrain-tiny: $(VENV)/.installed ## retrain builtin tiny-trained (~25 min, 2 cores); compare with the committed bytes
	$(PY) -m meebs.tiny.pretrain_tiny $(ARGS)

test: $(VENV)/.installed ## run the whole test suite (CPU only, no network)
	$(PY) -m pytest -q --durations=15

test-fast: $(VENV)/.installed ## the tests that train nothing (<= 2 min): formats, parsers, errors, estimates
	$(PY) -m pytest -q -m "not slow"

fuzz: $(VENV)/.installed ## the hardening run: 10,000 random inputs per parser, 50 random SIGKILLs of a training (make test runs a few of each)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/fuzz --hypothesis-show-statistics
	MEEBS_KILLS=50 $(PY) -m pytest -q tests/test_random_kills.py

lint: $(VENV)/.installed ## ruff lint + format check, and the layers' import contract
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PYTHONPATH=. $(VENV)/bin/lint-imports

format: $(VENV)/.installed ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docker-check:
	@command -v docker >/dev/null || { echo "docker is not installed: install Docker, or run the local path with LOCAL=1"; exit 1; }
	@$(COMPOSE) version >/dev/null 2>&1 || { echo "the docker compose plugin is missing: install it, or run with LOCAL=1"; exit 1; }

gpu-check: docker-check
	@docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia || { echo "the NVIDIA container runtime is missing (install the NVIDIA Container Toolkit), or run with LOCAL=1"; exit 1; }

image: docker-check ## build the CUDA image
	$(compose) build

ifeq ($(LOCAL),)
plan: docker-check ## show what RECIPE=... will do (LOCAL=1: in .venv)
	$(compose) run --rm trainer plan $(recipe_file) $(ARGS)

train: gpu-check ## train RECIPE=... in the CUDA image (GPUS=N; LOCAL=1: in .venv; ARGS="train.epochs=3")
	$(compose) run --rm trainer train $(recipe_file) $(gpus_arg) $(ARGS)

fetch-model: docker-check ## download SD 1.5 (models.lock.yaml) into the models volume, verify it
	$(compose) run --rm trainer fetch-model $(or $(MODEL),sd15) --dest /app/models

tensorboard: docker-check ## TensorBoard on http://127.0.0.1:6006 (LOCAL=1: from .venv)
	$(compose) up tensorboard
else
plan: $(VENV)/.installed
	$(PY) entrypoint.py plan $(recipe_file) $(ARGS)

train: $(VENV)/.installed
	$(PY) entrypoint.py train $(recipe_file) $(gpus_arg) $(ARGS)

fetch-model: $(VENV)/.installed
	$(PY) entrypoint.py fetch-model $(or $(MODEL),sd15) --dest models

tensorboard: $(VENV)/.installed
	$(PY) entrypoint.py tensorboard
endif

# reproduce: rerun the result recorded for RECIPE in results/ (RUN=outputs/...: a local run
# folder instead) and report bit-identical or what differs; exit 0 / 1 / 2 (could not run).
# The demo's result is recorded from the CPU virtualenv, so the demo reproduces there, like
# `make demo`; other recipes run where `make train` runs them.
reproduce_args = $(if $(RUN),$(RUN),--recipe $(RECIPE))
ifeq ($(LOCAL)$(filter demo,$(RECIPE)),)
reproduce: gpu-check ## rerun RECIPE's recorded result (or RUN=dir) and prove it matched
	$(compose) run --rm trainer reproduce $(reproduce_args) $(ARGS)
else
reproduce: $(VENV)/.installed
	$(PY) entrypoint.py reproduce $(reproduce_args) $(ARGS)
endif

record: $(VENV)/.installed ## copy RUN=outputs/...'s manifest to results/<recipe>/ (commit it)
	$(if $(RUN),,$(error give the finished run to record: make record RUN=outputs/<name>/<run id>))
	$(PY) entrypoint.py record $(RUN) $(ARGS)

grid: $(VENV)/.installed ## one PNG of RUN=outputs/<name>/<run id>'s prompts x epochs (ARGS="--weights 0.5,1")
	$(if $(RUN),,$(error give a run: make grid RUN=outputs/<name>/<run id>))
	$(PY) entrypoint.py grid $(RUN) $(ARGS)

bench: $(VENV)/.installed ## steps/s, peak RSS: demo, SD 1.5 128px, LoHA layer paths, bare loop, validation share
	$(PY) -m meebs.training.bench

clean: ## remove caches and .venv-ci; outputs/ only with OUTPUTS=1
	rm -rf .venv-ci .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./.venv/*" -prune -exec rm -rf {} +
	$(if $(OUTPUTS),find outputs -mindepth 1 -not -name .gitkeep -delete,@echo "outputs/ kept (make clean OUTPUTS=1 deletes every run)")

clean-venv: ## remove .venv
	rm -rf $(VENV)
