// Row gathers and token-major reductions over the routing plan made by launch_routing
// (moeforge/kernels/routing.h). Same semantics as csrc/cpu/permute.cpp. Notation: T tokens,
// K experts per token, S = T*K routed rows, H hidden.
//
//   permute    out[i]    = w[p] * x[p / K]  for row i, p = sorted_pairs[i], when the plan maps p
//                          back to i (pair_to_row[p] == i, true of every kept row of a plan made
//                          by launch_routing); other rows (dropped pairs: pair_to_row[p] < 0, or
//                          a corrupt plan) are zero
//   combine    out[t]    = sum_k w[t,k] * y[pair_to_row[t,k]], skipping dropped pairs
//   routed_dot out[t, k] = <rows[pair_to_row[t,k]], tokens[t]>, 0 for dropped pairs
//
// Element types scalar_t: float, double, __half, __nv_bfloat16. Arithmetic in AccType<scalar_t>
// (float, double for double); routing weights are given in AccType<scalar_t> (nullptr = all ones).
// Every index read from the plan is range-checked: an out-of-range sorted_pairs entry or row counts
// as dropped, so a corrupt plan cannot make a kernel read or write out of bounds. Deterministic:
// each output element is written by one thread, sums run in a fixed order, no atomics. All pointers
// are device pointers to contiguous row-major data; launchers return the first CUDA error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moeforge/kernels/numeric.h"

namespace moeforge::kernels {

// The launchers are instantiated in kernels/permute.cu for scalar_t = float, double, __half and
// __nv_bfloat16 only.
template <typename scalar_t>
cudaError_t launch_permute(const scalar_t* x,                    // [T, H]
                           const int32_t* sorted_pairs,          // [S]
                           const int32_t* pair_to_row,           // [T, K]
                           const acc_type_t<scalar_t>* weights,  // [T, K] or nullptr (all ones)
                           scalar_t* out,                        // [S, H]
                           int64_t num_tokens, int64_t top_k, int64_t hidden, cudaStream_t stream);

template <typename scalar_t>
cudaError_t launch_combine(const scalar_t* y,                    // [S, H]
                           const int32_t* pair_to_row,           // [T, K]
                           const acc_type_t<scalar_t>* weights,  // [T, K] or nullptr (all ones)
                           scalar_t* out,                        // [T, H]
                           int64_t num_tokens, int64_t top_k, int64_t hidden, cudaStream_t stream);

template <typename scalar_t>
cudaError_t launch_routed_dot(const scalar_t* rows,        // [S, H]
                              const scalar_t* tokens,      // [T, H]
                              const int32_t* pair_to_row,  // [T, K]
                              scalar_t* out,               // [T, K]
                              int64_t num_tokens, int64_t top_k, int64_t hidden,
                              cudaStream_t stream);

}  // namespace moeforge::kernels
