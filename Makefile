# Two commands on a fresh machine: `make dev` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Test processes: end-to-end tests mostly wait (timers, rebalances), so two share
# the 2-core machines well; `make test TEST_PROCESSES=1` runs them one by one.
TEST_PROCESSES ?= 2

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
	$(BIN)/pytest -q -n $(TEST_PROCESSES) --dist loadscope

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
