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

# The CPU table of docs/benchmarks.md (about 20 minutes on 2 cores; makes the 1B preset once).
bench: setup
	$(BIN)/tsqp bench --preset llama-3.2-1b --tokens 128,512,1024 --repeat 3 --accuracy \
		--json docs/bench-cpu.json --plot docs/bench-cpu.png

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
