# Two set-up commands do everything on a fresh machine:
#   make demo   -> creates .venv, installs clipdex, indexes a generated sample, runs searches
#   make test   -> creates .venv, installs clipdex with test tools, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,scale,ocr]'
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

test: $(VENV)/.installed
	bash scripts/system-deps.sh
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) demo-out test-artifacts
