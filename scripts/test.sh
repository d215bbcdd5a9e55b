#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs every test: pytest and the GoogleTest suites.
# Tests that need a GPU run where one is present and skip cleanly elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m pytest tests -q "$@"
ctest --test-dir build/py --output-on-failure
