// Per-expert row bounds built in shared memory by a whole block, for kernels that walk rows
// grouped by expert (kernels/lora_expand.cu, kernels/lora_expand_wmma.cu) and for the offsets of
// the at::_grouped_mm engine (kernels/zero_rows.cu).
//
// m(0..E) as the grouped GEMM engine reads offsets (moeforge/kernels/grouped_gemm.h): m(0) = 0,
// m(e) = min(rows, max(0, offsets[1], ..., offsets[e])) — clamped into [0, rows] and made
// non-decreasing, so corrupt offsets give wrong rows, never rows out of range. Built from the
// device offsets without a host synchronisation.
#pragma once

#include <cstdint>

namespace moeforge::kernels {

inline constexpr int kBoundsMaxWarps = 32;

// Every thread of the block must call it (barriers inside); blockDim.x * blockDim.y must be a
// multiple of 32. bound: shared [num_experts + 1]; warp_max: shared [kBoundsMaxWarps]. On return
// bound[e] = m(e) for every e, visible to the whole block.
// Work: one coalesced pass over the offsets, then a max-scan: each thread scans a contiguous
// segment, and the segments' maxima are scanned with warp shuffles and one value per warp.
__device__ inline void build_expert_bounds(const int32_t* __restrict__ offsets, int64_t num_experts,
                                           int64_t rows, int32_t* bound, int32_t* warp_max) {
  const int tid = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  const int threads = static_cast<int>(blockDim.x * blockDim.y);
  const int64_t count = num_experts + 1;
  for (int64_t i = tid; i < count; i += threads) {
    const int64_t o = i == 0 ? 0 : offsets[i];
    bound[i] = static_cast<int32_t>(o < 0 ? 0 : o > rows ? rows : o);
  }
  __syncthreads();
  const int64_t per = (count + threads - 1) / threads;
  const int64_t begin = tid * per < count ? tid * per : count;
  const int64_t end = begin + per < count ? begin + per : count;
  int32_t run = 0;  // every m(e) >= 0, so 0 is the identity of the max
  for (int64_t i = begin; i < end; ++i) {
    run = bound[i] > run ? bound[i] : run;
    bound[i] = run;
  }
  const int lane = tid % 32, warp = tid / 32;
  int32_t inclusive = run;
  for (int d = 1; d < 32; d *= 2) {
    const int32_t before = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d && before > inclusive) inclusive = before;
  }
  if (lane == 31) warp_max[warp] = inclusive;
  int32_t prefix = __shfl_up_sync(0xffffffffu, inclusive, 1);  // the earlier lanes' maximum
  if (lane == 0) prefix = 0;
  __syncthreads();
  for (int w = 0; w < warp; ++w) prefix = warp_max[w] > prefix ? warp_max[w] : prefix;
  for (int64_t i = begin; i < end; ++i) {
    if (prefix > bound[i]) bound[i] = prefix;
  }
  __syncthreads();
}

// The expert that owns row i < bound[E]: the largest e with bound[e] <= i (so bound[e + 1] > i,
// empty experts skipped).
__device__ __forceinline__ int64_t expert_of_row(const int32_t* bound, int64_t num_experts,
                                                 int64_t i) {
  int64_t lo = 0, hi = num_experts;  // bound[lo] <= i < bound[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (bound[mid] <= i) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace moeforge::kernels
