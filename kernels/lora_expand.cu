// launch_lora_expand_add (see moeforge/kernels/lora_expand.h): the dispatch, and the SIMT kernel
// for float / double and for the 16-bit cases the tensor-core kernel (lora_expand_wmma.cu) does
// not take. One read and one write of out, plus u (rank values per row) and M_e (L1/L2 resident:
// rank * n values per expert); `rank` FMAs per element of out, so for 16-bit types on an H100 it
// is issue-bound (~1.3 TB/s at r = 16), which is why those go to tensor cores where they can.
//
// A block takes chunks of kRowsPerChunk consecutive rows (grid-stride over chunks). Thread
// (x, y) owns the N-element packs x, x + blockDim.x, ... of each row and walks the chunk's rows
// y, y + blockDim.y, ... in groups of kRowGroup: rows are sorted by expert, so a group mostly
// belongs to one expert and shares each (L1-resident) load of M_e's pack (caching all of M_e's
// packs in registers instead made nvcc keep rank * N floats live: 193 registers for bf16).
// Every block first builds m(0..E) in shared memory (expert_bounds.cuh); a row's expert is then
// found by a binary search for the thread's first row and a forward walk after.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "expert_bounds.cuh"
#include "launch.cuh"
#include "lora_expand_wmma.h"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/lora_expand.h"

namespace moeforge::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerChunk = 32;
constexpr int64_t kMaxBlocks = 4096;  // 131072 rows per pass; blocks grid-stride beyond
constexpr int kRowGroup = 2;          // rows of one expert sharing each load of M_e (4 spilled)
constexpr int kVecBytes = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// a * b + c with one rounding (the accumulation order and rounding are part of the contract).
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  return __fmaf_rn(a, b, c);
}
__device__ __forceinline__ double fma_rn(double a, double b, double c) {
  return __fma_rn(a, b, c);
}

// Adds the rank-r products of `count` <= kRows rows of one expert (row stride `row_step`) for
// the N-element pack q: each M_e pack is loaded once per group of rows, not once per row.
template <int kRows, typename T, int N>
__device__ __forceinline__ void expand_add_rows(T* __restrict__ out, int64_t ld_out,
                                                const T* __restrict__ u, int64_t ld_u,
                                                const T* __restrict__ me, int64_t m_stride_j,
                                                int64_t first, int64_t row_step, int count,
                                                int64_t q, int64_t rank, acc_type_t<T> scaling) {
  using acc_t = acc_type_t<T>;
  using P = Pack<T, N>;
  // out's packs are loaded before the rank loop so that their DRAM latency may overlap it (no
  // measured gain: the kernel stays at ~1.3 TB/s on an H100, latency-bound in the rank loop's
  // dependent u / M_e loads; benchmarks/RESULTS.md).
  P o[kRows];
#pragma unroll
  for (int g = 0; g < kRows; ++g) {
    if (g < count) o[g] = reinterpret_cast<const P*>(out + (first + g * row_step) * ld_out)[q];
  }
  acc_t acc[kRows][N];
#pragma unroll
  for (int g = 0; g < kRows; ++g) {
#pragma unroll
    for (int t = 0; t < N; ++t) acc[g][t] = acc_t(0);
  }
#pragma unroll 2
  for (int64_t j = 0; j < rank; ++j) {
    const P mj = *reinterpret_cast<const P*>(me + j * m_stride_j + q * N);
#pragma unroll
    for (int g = 0; g < kRows; ++g) {
      if (g < count) {
        const acc_t uj = to_acc(u[(first + g * row_step) * ld_u + j]);
#pragma unroll
        for (int t = 0; t < N; ++t) acc[g][t] = fma_rn(uj, to_acc(mj.v[t]), acc[g][t]);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kRows; ++g) {
    if (g < count) {
#pragma unroll
      for (int t = 0; t < N; ++t) {
        o[g].v[t] = from_acc<T>(fma_rn(scaling, acc[g][t], to_acc(o[g].v[t])));
      }
      reinterpret_cast<P*>(out + (first + g * row_step) * ld_out)[q] = o[g];
    }
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads, 3)  // <= 85 registers: 3 CTAs/SM (bf16: 80, no spills)
    lora_expand_add_kernel(T* __restrict__ out, int64_t ld_out, const T* __restrict__ u,
                           int64_t ld_u, const T* __restrict__ m, int64_t m_stride_e,
                           int64_t m_stride_j, const int32_t* __restrict__ offsets,
                           int64_t num_experts, int64_t rows, int64_t n, int64_t rank,
                           acc_type_t<T> scaling) {
  __shared__ int32_t bound[kLoraExpandMaxExperts + 1];
  __shared__ int32_t warp_max[kBoundsMaxWarps];
  build_expert_bounds(offsets, num_experts, rows, bound, warp_max);
  const int64_t routed = bound[num_experts];
  const int64_t packs = n / N, step = blockDim.y;
  for (int64_t chunk = blockIdx.x; chunk * kRowsPerChunk < routed; chunk += gridDim.x) {
    const int64_t first = chunk * kRowsPerChunk + threadIdx.y;
    const int64_t end = chunk * kRowsPerChunk + kRowsPerChunk;
    const int64_t last = end < routed ? end : routed;
    if (first >= last) continue;
    for (int64_t q = threadIdx.x; q < packs; q += blockDim.x) {
      int64_t e = expert_of_row(bound, num_experts, first);
      for (int64_t i = first; i < last; i += kRowGroup * step) {
        const int count = static_cast<int>(min(int64_t{kRowGroup}, (last - i + step - 1) / step));
        while (i >= bound[e + 1]) ++e;                // e < E: i < bound[E]
        if (i + (count - 1) * step < bound[e + 1]) {  // the whole group is expert e's
          expand_add_rows<kRowGroup, T, N>(out, ld_out, u, ld_u, m + e * m_stride_e, m_stride_j, i,
                                           step, count, q, rank, scaling);
          continue;
        }
        for (int g = 0; g < count; ++g) {  // the group crosses an expert boundary
          const int64_t row = i + g * step;
          while (row >= bound[e + 1]) ++e;
          expand_add_rows<1, T, N>(out, ld_out, u, ld_u, m + e * m_stride_e, m_stride_j, row, step,
                                   1, q, rank, scaling);
        }
      }
    }
  }
}

// Threads per row: a power of two in [32, 256] covering the row's packs; the rest of the 256
// threads take further rows of the chunk.
dim3 block_for(int64_t packs) {
  int x = 32;
  while (x < kThreads && x < packs) x *= 2;
  return dim3(x, kThreads / x);
}

template <typename T, int N>
cudaError_t launch(T* out, int64_t ld_out, const T* u, int64_t ld_u, const T* m, int64_t m_stride_e,
                   int64_t m_stride_j, const int32_t* offsets, int64_t num_experts, int64_t rows,
                   int64_t n, int64_t rank, double scaling, cudaStream_t stream) {
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t blocks = std::clamp<int64_t>(chunks, 1, kMaxBlocks);
  MOEFORGE_CUDA_CHECK(launch_kernel(lora_expand_add_kernel<T, N>, dim3(blocks), block_for(n / N), 0,
                                    stream, out, ld_out, u, ld_u, m, m_stride_e, m_stride_j,
                                    offsets, num_experts, rows, n, rank,
                                    static_cast<acc_type_t<T>>(scaling)));
  return cudaSuccess;
}

}  // namespace

template <typename T>
cudaError_t lora_expand_add_uses_tensor_cores(const T* out, int64_t ld_out, int64_t n, bool* uses) {
  *uses = false;
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    return lora_expand_detail::lora_expand_wmma_applies(out, ld_out, n, uses);
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_lora_expand_add(T* out, int64_t ld_out, const T* u, int64_t ld_u, const T* m,
                                   int64_t m_stride_e, int64_t m_stride_j,
                                   const int32_t* expert_offsets, int64_t num_experts, int64_t rows,
                                   int64_t n, int64_t rank, double scaling, cudaStream_t stream) {
  if (rows < 0 || n < 0 || rank < 0 || num_experts < 1 || num_experts > kLoraExpandMaxExperts ||
      ld_out < n || ld_u < rank || m_stride_e < 0 || m_stride_j < 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || n == 0 || rank == 0) return cudaSuccess;  // nothing to add
  if (out == nullptr || u == nullptr || m == nullptr || expert_offsets == nullptr) {
    return cudaErrorInvalidValue;
  }
  bool tensor_cores = false;
  MOEFORGE_CUDA_CHECK(lora_expand_add_uses_tensor_cores(out, ld_out, n, &tensor_cores));
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    if (tensor_cores) {
      const lora_expand_detail::LoraExpandArgs<T> args{out,
                                                       ld_out,
                                                       u,
                                                       ld_u,
                                                       m,
                                                       m_stride_e,
                                                       m_stride_j,
                                                       expert_offsets,
                                                       num_experts,
                                                       rows,
                                                       n,
                                                       rank,
                                                       static_cast<float>(scaling)};
      return lora_expand_detail::launch_lora_expand_add_wmma(args, stream);
    }
  }
  constexpr int64_t kV = kVecBytes / static_cast<int64_t>(sizeof(T));
  const auto aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
  };
  if (kV > 1 && n % kV == 0 && ld_out % kV == 0 && m_stride_e % kV == 0 && m_stride_j % kV == 0 &&
      aligned(out) && aligned(m)) {
    return launch<T, static_cast<int>(kV)>(out, ld_out, u, ld_u, m, m_stride_e, m_stride_j,
                                           expert_offsets, num_experts, rows, n, rank, scaling,
                                           stream);
  }
  return launch<T, 1>(out, ld_out, u, ld_u, m, m_stride_e, m_stride_j, expert_offsets, num_experts,
                      rows, n, rank, scaling, stream);
}

#define MOEFORGE_INSTANTIATE_LORA_EXPAND(T)                                                        \
  template cudaError_t launch_lora_expand_add<T>(T*, int64_t, const T*, int64_t, const T*,         \
                                                 int64_t, int64_t, const int32_t*, int64_t,        \
                                                 int64_t, int64_t, int64_t, double, cudaStream_t); \
  template cudaError_t lora_expand_add_uses_tensor_cores<T>(const T*, int64_t, int64_t, bool*);

MOEFORGE_INSTANTIATE_LORA_EXPAND(float)
MOEFORGE_INSTANTIATE_LORA_EXPAND(double)
MOEFORGE_INSTANTIATE_LORA_EXPAND(__half)
MOEFORGE_INSTANTIATE_LORA_EXPAND(__nv_bfloat16)
#undef MOEFORGE_INSTANTIATE_LORA_EXPAND

}  // namespace moeforge::kernels
