# The two commands: `make run` (main experiment, offline default) and `make test` (the test suite).
# Both set everything up first (scripts/setup.sh is idempotent).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
VENV := .venv/bin

.PHONY: setup run test test-latest lint lock
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/python -m uzr.train +experiment=default $(ARGS)

# The suite runs on every core (pytest-xdist, at most TEST_WORKERS processes: each loads the packaged models);
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 4
test: setup
	$(VENV)/ruff check .
	$(VENV)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n auto --maxprocesses=$(TEST_WORKERS) --dist loadscope) $(PYTEST_ARGS)

# The injection/generation tests on the newest releases pyproject.toml admits, in .venv-latest (not in CI;
# run it before `make lock`). LATEST_ARGS='transformers==5.0.0' tries a chosen version instead.
test-latest:
	@LATEST_ARGS='$(LATEST_ARGS)' LATEST_TESTS='$(LATEST_TESTS)' bash scripts/test_latest.sh

lint: setup
	$(VENV)/ruff check .

# Regenerate requirements.lock in a temporary venv (scripts/lock.sh; see the lock's header before committing).
# LOCK_OUT=/tmp/new.lock writes elsewhere; LOCK_ARGS=transformers==X.Y moves one package on purpose.
lock:
	@LOCK_OUT="$(LOCK_OUT)" LOCK_ARGS='$(LOCK_ARGS)' bash scripts/lock.sh
