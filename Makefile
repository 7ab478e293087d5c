# Two commands do everything on a fresh machine:
#   make demo   -> creates .venv if needed, then runs the main job on the embedded default
#   make test   -> creates .venv if needed, installs the system packages the tests use, runs them
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint system-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cmkd_scale.demo $(DEMO_ARGS)

system-deps:
	bash scripts/install_system_deps.sh

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf demo_out test-artifacts .pytest_cache
