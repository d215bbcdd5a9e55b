// Error handling for the torch-free launchers in kernels/. A launcher returns cudaError_t: it
// checks every CUDA runtime call and cudaGetLastError() after each kernel launch, and returns the
// first error it meets (cudaSuccess otherwise). The torch glue (csrc/cuda/cuda_utils.h) turns a
// failure into a TORCH_CHECK naming the op; GoogleTest compares the result with cudaSuccess.
#pragma once

#include <cuda_runtime_api.h>

// Evaluates `expr` (a cudaError_t) once; returns it from the enclosing function on failure.
#define MOEFORGE_CUDA_CHECK(expr)                  \
  do {                                             \
    const cudaError_t moeforge_cuda_err_ = (expr); \
    if (moeforge_cuda_err_ != cudaSuccess) {       \
      return moeforge_cuda_err_;                   \
    }                                              \
  } while (0)

// Right after a <<<...>>> launch: returns the launch error (bad configuration, no kernel image for
// this GPU, ...) from the enclosing function.
#define MOEFORGE_CUDA_CHECK_LAUNCH() MOEFORGE_CUDA_CHECK(cudaGetLastError())
