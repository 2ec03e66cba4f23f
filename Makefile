# The README's two commands. Both run the idempotent set-up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-slow bench lint docs lock

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m intraneuron $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

bench: setup
	$(PY) benchmarks/extraction.py

lint: setup
	$(VENV)/bin/ruff check intraneuron tests benchmarks

# The documentation site (mkdocs.yml: README.md, docs/, experiments/) into site/; a warning, such as a
# broken link or anchor, fails the build.
docs: setup
	$(VENV)/bin/mkdocs build --strict

# Regenerate requirements.lock from pyproject.toml's ranges (on purpose; commit it with a green run).
lock:
	@bash scripts/lock.sh
