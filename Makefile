# The README's two commands. Both run the idempotent set-up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-slow bench lint lock

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

# Regenerate requirements.lock from pyproject.toml's ranges (on purpose; commit it with a green run).
lock:
	@bash scripts/lock.sh
