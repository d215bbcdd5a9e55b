// Row-wise epilogues of the at::_grouped_mm engine (see moeforge/kernels/zero_rows.h). Memory
// bound. One block per row (grid-stride over rows), its threads along the columns, so that
// accesses coalesce and the per-row work on the offsets (one load, or a binary search over ends
// for the bias) is done once per row by every thread of the block from the same cached words.
// The engine's offsets themselves (expert_row_ends_kernel) come from one block's clamp and
// max-scan in shared memory (expert_bounds.cuh).
#include <algorithm>
#include <cstdint>

#include "expert_bounds.cuh"
#include "launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/numeric.h"
#include "moeforge/kernels/zero_rows.h"

namespace moeforge::kernels {
namespace {

constexpr int kThreads = 256;
// Row blocks: enough to fill an H100/H200 several times over; the rest grid-strides.
constexpr int64_t kMaxRowBlocks = 4096;

__device__ __forceinline__ int64_t clamp_row(int32_t v, int64_t num_rows) {
  return v < 0 ? 0 : (int64_t{v} > num_rows ? num_rows : int64_t{v});
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    zero_rows_from_kernel(T* __restrict__ y, int64_t ldy, int64_t num_rows, int64_t cols,
                          const int32_t* __restrict__ start) {
  const int64_t first = clamp_row(*start, num_rows);
  for (int64_t r = first + blockIdx.x; r < num_rows; r += gridDim.x) {
    T* row = y + r * ldy;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) row[j] = from_acc<T>(0);
  }
}

// The expert owning row r: the first e with ends[e] > r (ends clamped into [0, num_rows]), or
// num_experts when there is none (a dropped row). A binary search, exact for non-decreasing ends
// and in [0, num_experts] for any ends.
__device__ __forceinline__ int64_t owner_of(int64_t r, const int32_t* __restrict__ ends,
                                            int64_t num_experts, int64_t num_rows) {
  int64_t lo = 0, hi = num_experts;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (clamp_row(ends[mid], num_rows) > r) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_grouped_bias_kernel(T* __restrict__ y, int64_t ldy, int64_t num_rows, int64_t cols,
                            const T* __restrict__ bias, int64_t bias_stride_e,
                            const int32_t* __restrict__ ends, int64_t num_experts) {
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t e = owner_of(r, ends, num_experts, num_rows);
    T* row = y + r * ldy;
    if (e >= num_experts) {
      for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) row[j] = from_acc<T>(0);
    } else {
      const T* b = bias + e * bias_stride_e;
      for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        row[j] = from_acc<T>(to_acc(row[j]) + to_acc(b[j]));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    zero_empty_groups_kernel(T* __restrict__ g, int64_t g_stride_e, int64_t group_elems,
                             const int32_t* __restrict__ ends) {
  const int64_t e = blockIdx.y;
  const int32_t begin = e == 0 ? 0 : ends[e - 1];
  if (ends[e] > begin) return;  // e owns rows: its block is left alone
  T* block = g + e * g_stride_e;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < group_elems;
       i += int64_t{gridDim.x} * blockDim.x) {
    block[i] = from_acc<T>(0);
  }
}

// One block: the bounds m(0..E) of expert_bounds.cuh in shared memory, then ends[e] = m(e + 1).
constexpr int kEndsThreads = 256;
__global__ void __launch_bounds__(kEndsThreads)
    expert_row_ends_kernel(const int32_t* __restrict__ offsets, int64_t num_experts,
                           int64_t num_rows, int32_t* __restrict__ ends) {
  __shared__ int32_t bound[kExpertRowEndsMaxExperts + 1];
  __shared__ int32_t warp_max[kBoundsMaxWarps];
  build_expert_bounds(offsets, num_experts, num_rows, bound, warp_max);
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) ends[e] = bound[e + 1];
}

}  // namespace

cudaError_t launch_expert_row_ends(const int32_t* offsets, int64_t num_experts, int64_t num_rows,
                                   int32_t* ends, cudaStream_t stream) {
  if (num_experts < 0 || num_experts > kExpertRowEndsMaxExperts || num_rows < 0 ||
      num_rows > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (num_experts == 0) return cudaSuccess;
  if (offsets == nullptr || ends == nullptr) return cudaErrorInvalidValue;
  MOEFORGE_CUDA_CHECK(launch_kernel(expert_row_ends_kernel, 1, kEndsThreads, 0, stream, offsets,
                                    num_experts, num_rows, ends));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_zero_rows_from(T* y, int64_t ldy, int64_t num_rows, int64_t cols,
                                  const int32_t* start, cudaStream_t stream) {
  if (num_rows < 0 || cols < 0 || ldy < 0) return cudaErrorInvalidValue;
  if (num_rows == 0 || cols == 0) return cudaSuccess;
  if (y == nullptr || start == nullptr) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>(std::min(num_rows, kMaxRowBlocks));
  MOEFORGE_CUDA_CHECK(launch_kernel(zero_rows_from_kernel<T>, blocks, kThreads, 0, stream, y, ldy,
                                    num_rows, cols, start));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_add_grouped_bias(T* y, int64_t ldy, int64_t num_rows, int64_t cols,
                                    const T* bias, int64_t bias_stride_e, const int32_t* ends,
                                    int64_t num_experts, cudaStream_t stream) {
  if (num_rows < 0 || cols < 0 || ldy < 0 || num_experts < 0 || bias_stride_e < 0) {
    return cudaErrorInvalidValue;
  }
  if (num_rows == 0 || cols == 0) return cudaSuccess;
  if (y == nullptr || (num_experts > 0 && (bias == nullptr || ends == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const auto blocks = static_cast<unsigned>(std::min(num_rows, kMaxRowBlocks));
  MOEFORGE_CUDA_CHECK(launch_kernel(add_grouped_bias_kernel<T>, blocks, kThreads, 0, stream, y, ldy,
                                    num_rows, cols, bias, bias_stride_e, ends, num_experts));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_zero_empty_groups(T* g, int64_t g_stride_e, int64_t group_elems,
                                     const int32_t* ends, int64_t num_experts,
                                     cudaStream_t stream) {
  if (g_stride_e < 0 || group_elems < 0 || num_experts < 0 || num_experts > 65535) {
    return cudaErrorInvalidValue;
  }
  if (group_elems == 0 || num_experts == 0) return cudaSuccess;
  if (g == nullptr || ends == nullptr) return cudaErrorInvalidValue;
  // Blocks of experts with rows exit after two loads; an empty expert's block is written by up
  // to 64 blocks of 256 threads (grid-stride).
  const int64_t per_expert =
      std::clamp<int64_t>((group_elems + kThreads * 8 - 1) / (kThreads * 8), 1, 64);
  const dim3 grid(static_cast<unsigned>(per_expert), static_cast<unsigned>(num_experts));
  MOEFORGE_CUDA_CHECK(launch_kernel(zero_empty_groups_kernel<T>, grid, kThreads, 0, stream, g,
                                    g_stride_e, group_elems, ends));
  return cudaSuccess;
}

#define MOEFORGE_INSTANTIATE_ZERO_ROWS(T)                                                          \
  template cudaError_t launch_zero_rows_from<T>(T*, int64_t, int64_t, int64_t, const int32_t*,     \
                                                cudaStream_t);                                     \
  template cudaError_t launch_add_grouped_bias<T>(T*, int64_t, int64_t, int64_t, const T*,         \
                                                  int64_t, const int32_t*, int64_t, cudaStream_t); \
  template cudaError_t launch_zero_empty_groups<T>(T*, int64_t, int64_t, const int32_t*, int64_t,  \
                                                   cudaStream_t);

MOEFORGE_INSTANTIATE_ZERO_ROWS(float)
MOEFORGE_INSTANTIATE_ZERO_ROWS(double)
MOEFORGE_INSTANTIATE_ZERO_ROWS(__half)
MOEFORGE_INSTANTIATE_ZERO_ROWS(__nv_bfloat16)

#undef MOEFORGE_INSTANTIATE_ZERO_ROWS

}  // namespace moeforge::kernels
