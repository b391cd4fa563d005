# One entry point for humans and CI. Everything is installed into .venv from the package registries.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint types test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check broker luigi_creds tests bench
	$(BIN)/ruff check broker luigi_creds tests bench

types: $(STAMP)
	$(BIN)/mypy

test: lint types
	bash tests/ensure-system-deps.sh
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m examples.demo

bench: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.exchange
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.client

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
