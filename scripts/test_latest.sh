#!/usr/bin/env bash
# `make test-latest`: the injection and generation tests on the newest releases that pyproject.toml's
# ranges admit, in a separate venv (.venv-latest), so an upstream change is caught before the lock moves.
# Not part of .ci/run: what it installs changes from day to day. Run it before `make lock`.
#
#   LATEST_ARGS='transformers==5.0.0'   pip arguments that win over the ranges (e.g. try a lower bound)
#   LATEST_TESTS='tests/test_inject.py' the tests to run (default: injection, generation, attention numerics)
#   LATEST_VENV=/tmp/v                  where the venv goes (rebuilt on every call)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/resolve_env.sh
. scripts/resolve_env.sh
venv=${LATEST_VENV:-.venv-latest}
tests=${LATEST_TESTS:-tests/test_inject.py tests/test_live.py tests/test_reducers.py tests/test_decoder_layers.py}
rm -rf "$venv"
# shellcheck disable=SC2086  # LATEST_ARGS is a list of pip arguments
resolve_env "$venv" ${LATEST_ARGS:-}
pins() { grep -E '^[A-Za-z0-9_.-]+==' | grep -v -i -E '^(torch|uzr)==' | LC_ALL=C sort -f; }
changed=$(diff <(pins < requirements.lock) <("$venv/bin/python" -m pip freeze --all --exclude-editable | pins) \
  | grep '^[<>]' || true)
echo "test-latest: resolved anew; against requirements.lock ('<' locked, '>' resolved now):"
echo "${changed:-  no difference: the lock holds the newest releases}"
# shellcheck disable=SC2086  # tests is a list of paths
"$venv/bin/python" -m pytest -q -p no:cacheprovider $tests
