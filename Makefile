# sd-meebs: the user's verbs. `make help` lists them.
# Local targets use a virtualenv in .venv, created on first use from requirements/.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RECIPE ?= demo
recipe_file = $(if $(findstring /,$(RECIPE)),$(RECIPE),recipes/$(RECIPE).yaml)

.DEFAULT_GOAL := help
.PHONY: help demo test test-fast lint format plan train bench venv clean-venv

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements/cpu.txt requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $@

venv: $(VENV)/.installed ## create .venv (CPU torch, test tools)

demo: $(VENV)/.installed ## train recipes/demo.yaml on the CPU (~1 min), print where files are
	$(PY) entrypoint.py train recipes/demo.yaml

test: $(VENV)/.installed ## run the whole test suite (CPU only, no network)
	$(PY) -m pytest -q --durations=10

test-fast: $(VENV)/.installed ## the test suite without the full-size SD 1.5 tests
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

plan: $(VENV)/.installed ## show what RECIPE=... will do (data, steps, files)
	$(PY) entrypoint.py plan $(recipe_file) $(ARGS)

train: $(VENV)/.installed ## train RECIPE=... in the local .venv (ARGS="train.epochs=3")
	$(PY) entrypoint.py train $(recipe_file) $(ARGS)

bench: $(VENV)/.installed ## steps/s, peak RSS, time to first step: demo, SD 1.5 128px, bare loop
	$(PY) -m meebs.bench

clean-venv: ## remove .venv
	rm -rf $(VENV)
