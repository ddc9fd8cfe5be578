# The two commands: `make run` (main experiment, offline default) and `make test` (the test suite).
# Both set everything up first (scripts/setup.sh is idempotent).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
VENV := .venv/bin

.PHONY: setup run test lint
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/python -m uzr.train +experiment=default $(ARGS)

test: setup
	$(VENV)/ruff check .
	$(VENV)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/ruff check .
