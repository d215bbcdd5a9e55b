#!/usr/bin/env bash
# Installs everything moeforge needs on a fresh machine and builds it against the installed torch.
#   - torch from PyPI (a CUDA build: that is what lets CUDA code compile and link without a GPU)
#   - build/test tools, then `pip install --no-build-isolation .` with the GoogleTest suites.
# Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --upgrade-strategy only-if-needed \
  "torch>=2.11" numpy "scikit-build-core>=0.10" ninja pytest expecttest hypothesis
# The Hugging Face integration (optional for users, exercised by the tests and the main job),
# pinned to the versions our parity tests and GPU machine use.
"$PY" -m pip install --quiet "transformers==5.17.0" "peft==0.21.0"

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
if ! command -v cmake >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "cmake>=3.25"
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
# One persistent build directory: incremental rebuilds, and ctest runs the GoogleTest binaries
# built against the very library that Python loads.
"$PY" -m pip install --no-build-isolation --no-deps --quiet \
  -C build-dir=build/py \
  -C cmake.define.MOEFORGE_BUILD_TESTS=ON \
  .
"$PY" -c "import moeforge; print('moeforge', moeforge.__version__, '| CUDA kernels built:', moeforge.built_with_cuda())"
