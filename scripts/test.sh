#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs every test: pytest and the GoogleTest suites.
# Tests that need a GPU run where one is present and skip cleanly elsewhere; the CUDA kernels
# themselves also run everywhere on the host kernel emulator (scripts/test_emulator.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m pytest tests -q "$@"
ctest --test-dir build/py --output-on-failure
if command -v nvcc >/dev/null 2>&1 || [ "${MOEFORGE_EXPECT_CUDA:-0}" = 1 ]; then
  bash scripts/test_emulator.sh
else
  echo "no CUDA toolkit: host kernel emulator suites not run"
fi
