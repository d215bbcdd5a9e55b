// Row-wise epilogues for a grouped GEMM engine that leaves the dropped rows unwritten and knows no
// bias (the at::_grouped_mm engine of csrc/cuda/grouped_mm.cpp). Torch-free: raw device pointers,
// sizes and strides in elements and a cudaStream_t. Element types: float, double, __half,
// __nv_bfloat16 (bias arithmetic in float, double for double).
//
//   launch_zero_rows_from      y[r, :] = 0 for r in [*start, num_rows)
//   launch_add_grouped_bias    y[r, :] += bias[e(r), :] on the rows of expert e, y[r, :] = 0 on
//                              rows of no expert (the dropped rows), in one pass over y
//   launch_zero_empty_groups   G_e = 0 for every expert e that owns no rows
//   launch_expert_row_ends     ends = expert_offsets[1:] clamped into [0, num_rows] and made
//                              non-decreasing: the offsets as the engine and the launchers
//                              above take them, in one launch
//
// No host synchronisation: where a row range depends on offsets, the offsets stay on the device
// and only the kernels read them, so every launcher is CUDA-graph capturable and its launch
// configuration depends on sizes only. Offsets come as `ends` [num_experts]: expert e owns rows
// [ends[e-1], ends[e]) (ends[-1] taken as 0), i.e. expert_offsets[1:]. They should be
// non-decreasing and within [0, num_rows] (the glue passes them clamped and made non-decreasing,
// as the grouped GEMM engine reads them, see grouped_gemm.h); any values still only give wrong
// rows, never an access out of bounds: every value read is clamped into [0, num_rows].
//
// Launchers check their arguments (cudaErrorInvalidValue: negative sizes, null pointers where
// data is needed), check every launch and return the first CUDA error; nothing is launched when
// there is nothing to write.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moeforge::kernels {

// y [num_rows, cols], row r at y + r * ldy: rows [s, num_rows) set to zero, where
// s = min(num_rows, max(0, *start)) is read on the device.
template <typename T>
cudaError_t launch_zero_rows_from(T* y, int64_t ldy, int64_t num_rows, int64_t cols,
                                  const int32_t* start,  // one int32, device
                                  cudaStream_t stream);

// y [num_rows, cols], row r at y + r * ldy; bias [num_experts, cols], row e at
// bias + e * bias_stride_e. Row r of expert e (see ends above) gets y[r, :] += bias[e, :]
// (rounded once to T); a row of no expert (r >= ends[num_experts - 1]) gets y[r, :] = 0.
template <typename T>
cudaError_t launch_add_grouped_bias(T* y, int64_t ldy, int64_t num_rows, int64_t cols,
                                    const T* bias, int64_t bias_stride_e,
                                    const int32_t* ends,  // [num_experts], device
                                    int64_t num_experts, cudaStream_t stream);

// g: num_experts blocks G_e of group_elems contiguous elements at g + e * g_stride_e. G_e is set
// to zero when expert e owns no rows (ends[e] <= ends[e-1], ends[-1] taken as 0); the blocks of
// the other experts are neither read nor written. Limit: num_experts <= 65535 (grid.y).
template <typename T>
cudaError_t launch_zero_empty_groups(T* g, int64_t g_stride_e, int64_t group_elems,
                                     const int32_t* ends,  // [num_experts], device
                                     int64_t num_experts, cudaStream_t stream);

// Most experts launch_expert_row_ends takes (one block holds the bounds in shared memory; torch's
// grouped GEMM takes at most 1023 groups).
inline constexpr int64_t kExpertRowEndsMaxExperts = 1024;

// ends [num_experts] (device, written): ends[e] = min(num_rows, max(0, offsets[1], ...,
// offsets[e + 1])) for offsets [num_experts + 1] (device; offsets[0] is not read), i.e.
// expert_offsets[1:] clamped into [0, num_rows] and made non-decreasing, so that any offsets give
// valid row ranges. One block of one launch, no host synchronisation. Limits: num_experts <=
// kExpertRowEndsMaxExperts, num_rows <= INT32_MAX.
cudaError_t launch_expert_row_ends(const int32_t* offsets, int64_t num_experts, int64_t num_rows,
                                   int32_t* ends, cudaStream_t stream);

}  // namespace moeforge::kernels
