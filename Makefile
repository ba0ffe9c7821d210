# The README's two commands: `make run` and `make test`. Both build .venv from scratch when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast check bench install clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "cachebus needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)

# make run: the service, the reference worker and honcho (the `run` extra).
$(VENV)/.installed: setup.py pyproject.toml $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[run]'
	touch $@

$(VENV)/.installed-test: setup.py pyproject.toml bench/install-deps.sh tests/install-browser.sh $(BIN)/python
	bash bench/install-deps.sh
	bash tests/install-browser.sh
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

check: $(VENV)/.installed-test
	BIN=$(BIN) tools/check

run: $(VENV)/.installed
	$(BIN)/cachebus demo
	PATH="$(CURDIR)/$(BIN):$$PATH" exec $(BIN)/honcho start -f Procfile

# Lint (ruff) and type-check (mypy) first: both must pass before a test runs.
test: $(VENV)/.installed-test
	BIN=$(BIN) tools/check
	$(BIN)/python -m pytest

# The edit-test loop: the same checks, then every test that needs nothing beyond the pytest process:
# none that starts processes, network namespaces or Chromium, nor the benchmark (pytest.ini's markers).
FAST := not processes and not netns and not browser and not bench
test-fast: $(VENV)/.installed-test
	BIN=$(BIN) tools/check
	$(BIN)/python -m pytest -m "$(FAST)"

# Writes docs/benchmarks.md; installs redis-server and wrk through apt when missing.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run

$(VENV)/.installed-bench: setup.py pyproject.toml bench/install-deps.sh $(BIN)/python
	bash bench/install-deps.sh
	$(BIN)/pip install --disable-pip-version-check -q -e '.[bench]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build
