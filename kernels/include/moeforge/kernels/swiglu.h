// Gated activation of the expert FFN on the GPU: h [rows, 2I] -> a [rows, I], and its backward
// grad_a [rows, I] -> grad_h [rows, 2I]. Same semantics as csrc/cpu/swiglu.cpp; the scalar math
// is moeforge/kernels/swiglu_math.h, shared with the CPU kernels.
//
//   kSilu   HF layout: gate = h[:, :I], up = h[:, I:], a = silu(gate) * up
//   kGptOss interleaved: gate = h[:, 0::2], up = h[:, 1::2], clamped (alpha, limit)
//
// Element types: float, double, __half, __nv_bfloat16; math in acc_type_t. Elementwise, so
// deterministic and exact up to the rounding of exp. Contiguous row-major device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moeforge/kernels/numeric.h"

namespace moeforge::kernels {

enum class GluVariant : int { kSilu = 0, kGptOss = 1 };

template <typename scalar_t>
cudaError_t launch_swiglu(const scalar_t* h,  // [rows, 2I]
                          scalar_t* out,      // [rows, I]
                          int64_t rows, int64_t intermediate, GluVariant variant, double alpha,
                          double limit, cudaStream_t stream);

template <typename scalar_t>
cudaError_t launch_swiglu_backward(const scalar_t* grad_a,  // [rows, I]
                                   const scalar_t* h,       // [rows, 2I]
                                   scalar_t* grad_h,        // [rows, 2I]
                                   int64_t rows, int64_t intermediate, GluVariant variant,
                                   double alpha, double limit, cudaStream_t stream);

}  // namespace moeforge::kernels
