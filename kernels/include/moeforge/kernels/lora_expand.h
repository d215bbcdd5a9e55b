// Split LoRA's up-projection added in place (torch-free: raw device pointers, sizes and strides
// in elements, a cudaStream_t). For the rows i of expert e:
//
//   out[i, :] += scaling * u[i, :] M_e        u [rows, rank], M_e [rank, n], out [rows, n]
//
// i.e. the rank-r delta of LoRA (u = x A_e^T, M_e = B_e^T; or, in the backward, u = du and
// M_e = A_e) summed into the GEMM output it belongs to, so that the [rows, n] delta is never
// written and read back. Element types: float, double, __half, __nv_bfloat16; one rounding per
// element of out: out = round(fma(scaling, acc, out)), acc the sum over the rank in acc_type_t.
//   * Tensor cores (lora_expand_add_uses_tensor_cores: __half / __nv_bfloat16, n and ld_out
//     multiples of 8, out 16-byte aligned, compute capability 8.0+): acc sums the exact products
//     in fp32 in the tensor cores' (unspecified, fixed) order.
//   * Otherwise: acc by fused multiply-adds in ascending j — the CPU op's arithmetic, bit for bit.
// Deterministic either way.
//
// Expert e owns rows [m(e), m(e+1)), m(e) = min(rows, max(0, offsets[1], ..., offsets[e])) and
// m(0) = 0: the offsets clamped into [0, rows] and made non-decreasing, as the grouped GEMM engine
// reads them (grouped_gemm.h). Rows from m(E) on (dropped) are left as they are. Any offsets
// only give wrong rows, never an access out of bounds. No host synchronisation: the offsets stay
// on the device, the launch configuration depends on sizes only (CUDA-graph capturable).
//
// Layouts: out and u row-major with row strides ld_out >= n, ld_u >= rank; M_e at
// m + e * m_stride_e with row stride m_stride_j and unit stride along n (PEFT's lora_A [E*r, in]
// is M_e = A_e as is; its rank-major lora_B needs a [E, r, out] copy). 16-byte vector loads and
// stores where n, the strides and the pointers allow, else element by element.
// Limits: 1 <= num_experts <= kLoraExpandMaxExperts; cudaErrorInvalidValue for bad arguments.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moeforge/kernels/numeric.h"

namespace moeforge::kernels {

inline constexpr int64_t kLoraExpandMaxExperts = 1024;

template <typename T>
cudaError_t launch_lora_expand_add(T* out, int64_t ld_out, const T* u, int64_t ld_u, const T* m,
                                   int64_t m_stride_e, int64_t m_stride_j,
                                   const int32_t* expert_offsets,  // [num_experts + 1], device
                                   int64_t num_experts, int64_t rows, int64_t n, int64_t rank,
                                   double scaling, cudaStream_t stream);

// Whether launch_lora_expand_add<T> takes its tensor-core path for this out, ld_out and n on the
// current device (false for float / double). No stream work: safe during graph capture.
template <typename T>
cudaError_t lora_expand_add_uses_tensor_cores(const T* out, int64_t ld_out, int64_t n, bool* uses);

}  // namespace moeforge::kernels
