# The two commands in the README. Both do all set-up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all
BIN := $(VENV)/bin
STAMP := $(VENV)/.llamaforge-installed

.PHONY: quickstart test install lint bench clean

$(STAMP): pyproject.toml examples/relu2_plugin/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" -e examples/relu2_plugin
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/llamaforge quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check llamaforge tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
