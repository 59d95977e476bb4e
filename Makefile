# Two entry points: `make demo` (set up + main job) and `make test` (set up + tests).
# Each creates .venv on first use; a stamp file per extra keeps re-runs from reinstalling
# until pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.stamp-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.stamp-run

demo: $(VENV)/.stamp-run
	$(BIN)/cliplab demo

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest

bench: $(VENV)/.stamp-test
	$(BIN)/python benchmarks/encode.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
