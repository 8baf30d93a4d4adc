# Two commands on a fresh machine: `make dev` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint typecheck bench schema clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/omnicue dev

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# tansu (the dev broker) or kafka: `make bench BROKER=kafka` needs Java 17+.
BROKER ?= tansu

bench: $(STAMP)
	$(BIN)/python -m bench.pipeline --broker $(BROKER)

schema: $(STAMP)
	$(BIN)/omnicue schema export schemas/json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
