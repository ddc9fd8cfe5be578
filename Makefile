# The two commands: `make run` (main experiment, offline default) and `make test` (the test suite).
# Both set everything up first (scripts/setup.sh is idempotent).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
VENV := .venv/bin

.PHONY: setup run test lint lock
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/python -m uzr.train +experiment=default $(ARGS)

test: setup
	$(VENV)/ruff check .
	$(VENV)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/ruff check .

# Regenerate requirements.lock in a temporary venv (scripts/lock.sh; see the lock's header before committing).
# LOCK_OUT=/tmp/new.lock writes elsewhere; LOCK_ARGS=transformers==X.Y moves one package on purpose.
lock:
	@LOCK_OUT="$(LOCK_OUT)" LOCK_ARGS='$(LOCK_ARGS)' bash scripts/lock.sh
