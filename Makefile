# The README's two commands: `make run` (set up + quickstart study) and `make test`.
# `make test-fast` leaves out the tests that start the CLI or other interpreters, sshd, Ray or pdflatex.
# `make run` installs the core package, all the quickstart needs; `make test` the test extra, which has every extra.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Test worker processes (pytest-xdist): most tests wait on child processes, so more workers than cores pay.
PYTEST_WORKERS ?= 3

.PHONY: run lint test test-fast bench bench-report bench-exec-eval bench-market bench-autoresearch clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

# aider (the coding agent the autoresearch test drives) pins many exact versions: its own venv.
AIDER_VENV := .venv-aider
$(AIDER_VENV)/bin/aider:
	$(PYTHON) -m venv $(AIDER_VENV)
	$(AIDER_VENV)/bin/pip install --quiet 'aider-chat==0.86.2'

run: $(VENV)/.installed
	$(BIN)/ratiocinator research examples/quickstart/quickstart.yaml

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: lint $(AIDER_VENV)/bin/aider
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not (subprocess or sshd or ray or latex)"

bench: $(VENV)/.installed-test
	$(BIN)/python bench/overhead.py

bench-report: $(VENV)/.installed-test
	$(BIN)/python bench/report.py

bench-exec-eval: $(VENV)/.installed-test
	$(BIN)/python bench/exec_eval.py

bench-market: $(VENV)/.installed-test
	$(BIN)/python bench/market.py

bench-autoresearch: $(VENV)/.installed-test
	$(BIN)/python bench/autoresearch.py

clean:
	rm -rf $(VENV) $(AIDER_VENV) .ratiocinator
