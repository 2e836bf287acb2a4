# Setup is part of both targets, so a fresh clone needs exactly one command for each.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup core mutation

$(BIN)/python:
	$(PY) -m venv $(VENV)

# the package alone: all the speedrun needs (~40 s of pip on a fresh clone instead of ~100 s with the dev extra)
core: $(BIN)/python
	# torch first: the pinned CPU build comes from local disk; the package's torch>=2.6 then leaves it alone
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .

setup: core
	$(BIN)/pip install -q -e ".[dev]"

run: core
	$(BIN)/openzaya speedrun --preset nano

test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu"

# Mutation testing (mutmut) of rl, ttc, evaluate, verify, the router/balancing/experts of model.py and the engine's
# sampler against their own tests; minutes per module, not part of CI. Report: runs/mutation/report.md
mutation: setup
	$(BIN)/python bench/mutation.py
