# One command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on this project's machines; GPU users install their own CUDA torch first.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup run test bench clean

$(BIN)/tsqp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $@

setup: $(BIN)/tsqp

run: setup
	$(BIN)/tsqp demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/tsqp bench --json docs/bench.json --plot docs/bench.png

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
