#!/usr/bin/env bash
# Runs the GoogleTest launcher suites of tests/cpp on the host kernel emulator (tests/emu): the
# CUDA kernels of kernels/ compiled as C++ and executed on the CPU under ASan + UBSan, so that
# machines without a GPU (CI) still run every kernel. Needs the CUDA toolkit's headers, a C++20
# compiler, cmake, ninja and GoogleTest; no GPU, driver or torch.
#
# The "131072+ rows" cases are left to the GPU (they take many minutes emulated); everything else
# runs. Extra arguments go to ctest (e.g. -R Wmma).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${MOEFORGE_EMU_BUILD_DIR:-build/emu}
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)
cmake -S tests/emu -B "$BUILD" "${GENERATOR[@]}" >/dev/null
cmake --build "$BUILD" -j "$(nproc)"
ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)" -E 'Over131072' "$@"
