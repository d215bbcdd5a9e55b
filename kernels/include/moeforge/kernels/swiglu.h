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

// Backward of the routing-weighted activation a_w[r, :] = w[r] * a(h[r, :]) of the fused MoE
// layer (the routing weight folded into the activation, so that the layer's backward never needs
// the expert outputs): from grad_aw = dL/da_w,
//   grad_h[r, :]             = w[r] * (da/dh)^T grad_aw[r, :]       (T, like h)
//   grad_row_weights[r]      = <grad_aw[r, :], a(h[r, :])>           (acc_type_t<T>, fixed order)
//   weighted_act[r, :]       = w[r] * a(h[r, :])                      (T; skipped when nullptr)
// weighted_act is the recomputed a_w that the down projection's weight gradient reads. grad_h may
// be h itself (grad_h written over h: each element is read before it is overwritten); no other
// overlap. One CTA per row (grid-stride): deterministic, no atomics. row_weights and
// grad_row_weights are acc_type_t<T> (float; double for double).
template <typename scalar_t>
cudaError_t launch_weighted_swiglu_backward(const scalar_t* grad_aw,                  // [rows, I]
                                            const scalar_t* h,                        // [rows, 2I]
                                            const acc_type_t<scalar_t>* row_weights,  // [rows]
                                            scalar_t* grad_h,                         // [rows, 2I]
                                            scalar_t* weighted_act,  // [rows, I] or nullptr
                                            acc_type_t<scalar_t>* grad_row_weights,  // [rows]
                                            int64_t rows, int64_t intermediate, GluVariant variant,
                                            double alpha, double limit, cudaStream_t stream);

template <typename scalar_t>
cudaError_t launch_swiglu_backward(const scalar_t* grad_a,  // [rows, I]
                                   const scalar_t* h,       // [rows, 2I]
                                   scalar_t* grad_h,        // [rows, 2I]
                                   int64_t rows, int64_t intermediate, GluVariant variant,
                                   double alpha, double limit, cudaStream_t stream);

}  // namespace moeforge::kernels
