# Tally: `make run` starts the service on the embedded default; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test check fmt bench engines clean

$(STAMP): pyproject.toml
	PYTHON=$(PYTHON) scripts/ensure-python.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[scale,bench,dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tally serve

engines:
	scripts/ensure-engines.sh

check: $(STAMP)
	$(BIN)/ruff check tally tally_dev tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

fmt: $(STAMP)
	$(BIN)/ruff check --fix tally tally_dev tests

test: $(STAMP) engines check
	$(BIN)/pytest -q

bench: $(STAMP) engines
	$(BIN)/tally bench suite --out bench-results

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
