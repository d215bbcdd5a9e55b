// permute / combine / routed_dot on the GPU (see moeforge/kernels/permute.h for the contract).
// Memory-bound row kernels: 16-byte vector loads and stores when every row start is 16-byte
// aligned (hidden * sizeof(scalar_t) % 16 == 0 and aligned base pointers), a scalar path otherwise.
// Rows are visited by grid-stride loops over gridDim.x only, so any T*K < 2^63 launches (no
// gridDim.y limit). Arithmetic in acc_type_t<scalar_t>; permute and combine use explicitly rounded
// multiply and add (no FMA contraction) so that float32/float64 results equal the CPU kernels.
#include <algorithm>
#include <cstdint>

#include "launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/permute.h"

namespace moeforge::kernels {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest
constexpr int kVecBytes = 16;

// ---- non-contracted arithmetic -----------------------------------------------------------------
// Rounded multiply / add that the compiler may not fuse into an FMA (the CPU kernels do not).
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}
__device__ __forceinline__ float add_rn(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ double add_rn(double a, double b) {
  return __dadd_rn(a, b);
}

// N consecutive elements moved as one aligned load/store (N = 16 / sizeof(scalar_t) or 1).
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

template <typename scalar_t>
constexpr int kVec = kVecBytes / static_cast<int>(sizeof(scalar_t));

// True when rows of `hidden` elements starting at every pointer are 16-byte aligned.
template <typename scalar_t>
bool vectorizable(int64_t hidden, const void* a, const void* b = nullptr) {
  const auto aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
  };
  return hidden % kVec<scalar_t> == 0 && aligned(a) && (b == nullptr || aligned(b));
}

// Threads that share one row: a power of two in [32, 256] covering the row's packs, so short
// rows pack several per 256-thread block (blockDim = (threads_per_row, rows_per_block)).
dim3 row_block(int64_t packs_per_row) {
  int threads = kWarp;
  while (threads < kBlockThreads && threads < packs_per_row) threads *= 2;
  return dim3(threads, kBlockThreads / threads);
}

int64_t grid_for(int64_t items, int64_t items_per_block) {
  return std::clamp<int64_t>((items + items_per_block - 1) / items_per_block, 1, kMaxBlocks);
}

// ---- permute ------------------------------------------------------------------------------------
// Gather into expert order, token-major: each token's row of x is read once and written to its K
// routed rows (the row-major form, one output row at a time, read a token K times in expert
// order: at T = 16384 on an H100 most of those reads missed L2 and it moved ~2 S H elements where
// (T + S) H are needed). Two kernels, each output row written by exactly one of them:
//   permute_tokens_kernel  for token t, k < K, row = pair_to_row[t*K + k]: when row is in [0, S)
//                          and sorted_pairs[row] == t*K + k (the plan maps the pair to that row
//                          both ways), out[row, :] = w[t*K + k] * x[t, :];
//   permute_zero_kernel    every row i whose pair p = sorted_pairs[i] is not mapped back to i
//                          (dropped, out of range, or a corrupt plan) is zeroed (see below).
// Token kernel: blockDim.x threads per token row, blockDim.y tokens per block, grid-stride; each
// thread moves N-element packs. Deterministic (each output element written once).
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kBlockThreads)
    permute_tokens_kernel(const scalar_t* __restrict__ x,                    // [T, H]
                          const int32_t* __restrict__ sorted_pairs,          // [S]
                          const int32_t* __restrict__ pair_to_row,           // [T, K] = [S]
                          const acc_type_t<scalar_t>* __restrict__ weights,  // [T, K] or nullptr
                          scalar_t* __restrict__ out,                        // [S, H]
                          int64_t num_tokens, int64_t top_k, int64_t hidden) {
  using acc_t = acc_type_t<scalar_t>;
  using P = Pack<scalar_t, N>;
  const int64_t packs = hidden / N;
  const int64_t num_rows = num_tokens * top_k;
  for (int64_t t = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; t < num_tokens;
       t += int64_t{gridDim.x} * blockDim.y) {
    const P* src = reinterpret_cast<const P*>(x + t * hidden);
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
      const P a = src[j];
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t p = t * top_k + k;
        const int64_t row = pair_to_row[p];
        if (row < 0 || row >= num_rows || sorted_pairs[row] != p) continue;
        const acc_t scale = weights != nullptr ? weights[p] : acc_t(1);
        P b;
#pragma unroll
        for (int e = 0; e < N; ++e) b.v[e] = from_acc<scalar_t>(mul_rn(scale, to_acc(a.v[e])));
        reinterpret_cast<P*>(out + row * hidden)[j] = b;
      }
    }
  }
}

// The zero pass checks rows 32 at a time (a lane per row) and only the rows that need zeroing
// cost a store: with no dropped pair it is one read of sorted_pairs and pair_to_row. (One
// 256-thread block per row, as the token kernel uses, made it ~0.11 ms at S = 131072 on an H100 —
// a third of the permute — for no stores at all.) Each warp takes 32 consecutive rows per
// grid-stride step (a warp-uniform trip count), ballots which need zeroing, and zeroes them
// together, a lane per N-element pack.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kBlockThreads)
    permute_zero_kernel(const int32_t* __restrict__ sorted_pairs,  // [S]
                        const int32_t* __restrict__ pair_to_row,   // [T, K] = [S]
                        scalar_t* __restrict__ out,                // [S, H]
                        int64_t num_rows, int64_t hidden) {
  using acc_t = acc_type_t<scalar_t>;
  using P = Pack<scalar_t, N>;
  const int64_t packs = hidden / N;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t warp = int64_t{blockIdx.x} * warps_per_block + threadIdx.x / kWarp;
  const int64_t warp_stride = int64_t{gridDim.x} * warps_per_block * kWarp;
  P zero;
#pragma unroll
  for (int e = 0; e < N; ++e) zero.v[e] = from_acc<scalar_t>(acc_t(0));
  for (int64_t base = warp * kWarp; base < num_rows; base += warp_stride) {
    const int64_t i = base + lane;
    bool needs_zero = false;
    if (i < num_rows) {
      const int64_t p = sorted_pairs[i];
      needs_zero = !(p >= 0 && p < num_rows && pair_to_row[p] == i);  // else the token kernel's
    }
    for (unsigned mask = __ballot_sync(0xffffffffu, needs_zero); mask != 0; mask &= mask - 1) {
      P* dst = reinterpret_cast<P*>(out + (base + __ffs(mask) - 1) * hidden);
      for (int64_t j = lane; j < packs; j += kWarp) dst[j] = zero;
    }
  }
}

// ---- combine ------------------------------------------------------------------------------------
// Token-major weighted sum. For each token t in [0, T):
//   out[t, :] = sum_{k = 0..K-1, row = pair_to_row[t, k] in [0, S)} w[t, k] * y[row, :]
// accumulated in acc_t in ascending k (the CPU order), rounded once. Dropped pairs (row < 0) and
// out-of-range rows are skipped. blockDim.x threads per token, blockDim.y tokens per block,
// grid-stride over tokens. No atomics: each output element is written by one thread, so results
// are deterministic and bit-equal to the CPU kernel for float32/float64. O((T*K + T)*H) bytes.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kBlockThreads)
    combine_kernel(const scalar_t* __restrict__ y,                    // [S, H]
                   const int32_t* __restrict__ pair_to_row,           // [T, K]
                   const acc_type_t<scalar_t>* __restrict__ weights,  // [T, K] or nullptr
                   scalar_t* __restrict__ out,                        // [T, H]
                   int64_t num_tokens, int64_t top_k, int64_t hidden) {
  using acc_t = acc_type_t<scalar_t>;
  using P = Pack<scalar_t, N>;
  const int64_t packs = hidden / N;
  const int64_t num_rows = num_tokens * top_k;
  for (int64_t t = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; t < num_tokens;
       t += int64_t{gridDim.x} * blockDim.y) {
    const int32_t* map = pair_to_row + t * top_k;
    const acc_t* w = weights != nullptr ? weights + t * top_k : nullptr;
    P* dst = reinterpret_cast<P*>(out + t * hidden);
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
      acc_t acc[N];
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] = acc_t(0);
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t row = map[k];
        if (row < 0 || row >= num_rows) continue;  // dropped (or corrupt) pair
        const acc_t scale = w != nullptr ? w[k] : acc_t(1);
        const P a = reinterpret_cast<const P*>(y + row * hidden)[j];
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] = add_rn(acc[e], mul_rn(scale, to_acc(a.v[e])));
      }
      P b;
#pragma unroll
      for (int e = 0; e < N; ++e) b.v[e] = from_acc<scalar_t>(acc[e]);
      dst[j] = b;
    }
  }
}

// ---- routed_dot ---------------------------------------------------------------------------------
// Per-pair dot product (the routing-weight gradient). For each pair q = t*K + k in [0, S):
//   out[q] = <rows[pair_to_row[q], :], tokens[t, :]>   or 0 for a dropped / out-of-range row.
// One warp per pair (blockDim = (32, 8)), grid-stride over pairs: lanes stride over N-element
// packs accumulating in acc_t, then a butterfly __shfl_xor_sync reduction; lane 0 rounds to
// scalar_t. Deterministic (fixed lane assignment and reduction tree) but summed in a different
// order than the CPU kernel. O(S*H) reads of rows and tokens.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kBlockThreads)
    routed_dot_kernel(const scalar_t* __restrict__ rows,        // [S, H]
                      const scalar_t* __restrict__ tokens,      // [T, H]
                      const int32_t* __restrict__ pair_to_row,  // [T, K]
                      scalar_t* __restrict__ out,               // [T, K]
                      int64_t num_pairs, int64_t top_k, int64_t hidden) {
  using acc_t = acc_type_t<scalar_t>;
  using P = Pack<scalar_t, N>;
  const int64_t packs = hidden / N;
  // q is uniform across the warp, so every lane takes the same trip count through the loop.
  for (int64_t q = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; q < num_pairs;
       q += int64_t{gridDim.x} * blockDim.y) {
    const int64_t row = pair_to_row[q];
    acc_t acc = acc_t(0);
    if (row >= 0 && row < num_pairs) {
      const P* a = reinterpret_cast<const P*>(rows + row * hidden);
      const P* b = reinterpret_cast<const P*>(tokens + (q / top_k) * hidden);
      for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
        const P va = a[j], vb = b[j];
#pragma unroll
        for (int e = 0; e < N; ++e) acc += to_acc(va.v[e]) * to_acc(vb.v[e]);
      }
    }
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    if (threadIdx.x == 0) out[q] = from_acc<scalar_t>(acc);
  }
}

bool valid_sizes(int64_t num_tokens, int64_t top_k, int64_t hidden) {
  return num_tokens >= 0 && top_k >= 0 && hidden >= 0;
}

template <typename scalar_t, int N>
cudaError_t permute_launch(const scalar_t* x, const int32_t* sorted_pairs,
                           const int32_t* pair_to_row, const acc_type_t<scalar_t>* weights,
                           scalar_t* out, int64_t num_rows, int64_t top_k, int64_t hidden,
                           cudaStream_t stream) {
  const dim3 block = row_block(hidden / N);
  const int64_t num_tokens = num_rows / top_k;
  MOEFORGE_CUDA_CHECK(
      launch_kernel(permute_tokens_kernel<scalar_t, N>, grid_for(num_tokens, block.y), block, 0,
                    stream, x, sorted_pairs, pair_to_row, weights, out, num_tokens, top_k, hidden));
  MOEFORGE_CUDA_CHECK(launch_kernel(permute_zero_kernel<scalar_t, N>,
                                    grid_for(num_rows, kBlockThreads), dim3(kBlockThreads), 0,
                                    stream, sorted_pairs, pair_to_row, out, num_rows, hidden));
  return cudaSuccess;
}

template <typename scalar_t, int N>
cudaError_t combine_launch(const scalar_t* y, const int32_t* pair_to_row,
                           const acc_type_t<scalar_t>* weights, scalar_t* out, int64_t num_tokens,
                           int64_t top_k, int64_t hidden, cudaStream_t stream) {
  const dim3 block = row_block(hidden / N);
  MOEFORGE_CUDA_CHECK(launch_kernel(combine_kernel<scalar_t, N>, grid_for(num_tokens, block.y),
                                    block, 0, stream, y, pair_to_row, weights, out, num_tokens,
                                    top_k, hidden));
  return cudaSuccess;
}

template <typename scalar_t, int N>
cudaError_t routed_dot_launch(const scalar_t* rows, const scalar_t* tokens,
                              const int32_t* pair_to_row, scalar_t* out, int64_t num_pairs,
                              int64_t top_k, int64_t hidden, cudaStream_t stream) {
  const dim3 block(kWarp, kBlockThreads / kWarp);
  MOEFORGE_CUDA_CHECK(launch_kernel(routed_dot_kernel<scalar_t, N>, grid_for(num_pairs, block.y),
                                    block, 0, stream, rows, tokens, pair_to_row, out, num_pairs,
                                    top_k, hidden));
  return cudaSuccess;
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_permute(const scalar_t* x, const int32_t* sorted_pairs,
                           const int32_t* pair_to_row, const acc_type_t<scalar_t>* weights,
                           scalar_t* out, int64_t num_tokens, int64_t top_k, int64_t hidden,
                           cudaStream_t stream) {
  if (!valid_sizes(num_tokens, top_k, hidden)) return cudaErrorInvalidValue;
  const int64_t num_rows = num_tokens * top_k;
  if (num_rows == 0 || hidden == 0) return cudaSuccess;  // empty output
  if (vectorizable<scalar_t>(hidden, x, out)) {
    return permute_launch<scalar_t, kVec<scalar_t>>(x, sorted_pairs, pair_to_row, weights, out,
                                                    num_rows, top_k, hidden, stream);
  }
  return permute_launch<scalar_t, 1>(x, sorted_pairs, pair_to_row, weights, out, num_rows, top_k,
                                     hidden, stream);
}

template <typename scalar_t>
cudaError_t launch_combine(const scalar_t* y, const int32_t* pair_to_row,
                           const acc_type_t<scalar_t>* weights, scalar_t* out, int64_t num_tokens,
                           int64_t top_k, int64_t hidden, cudaStream_t stream) {
  if (!valid_sizes(num_tokens, top_k, hidden)) return cudaErrorInvalidValue;
  if (num_tokens == 0 || hidden == 0) return cudaSuccess;  // empty output
  if (vectorizable<scalar_t>(hidden, y, out)) {
    return combine_launch<scalar_t, kVec<scalar_t>>(y, pair_to_row, weights, out, num_tokens, top_k,
                                                    hidden, stream);
  }
  return combine_launch<scalar_t, 1>(y, pair_to_row, weights, out, num_tokens, top_k, hidden,
                                     stream);
}

template <typename scalar_t>
cudaError_t launch_routed_dot(const scalar_t* rows, const scalar_t* tokens,
                              const int32_t* pair_to_row, scalar_t* out, int64_t num_tokens,
                              int64_t top_k, int64_t hidden, cudaStream_t stream) {
  if (!valid_sizes(num_tokens, top_k, hidden)) return cudaErrorInvalidValue;
  const int64_t num_pairs = num_tokens * top_k;
  if (num_pairs == 0) return cudaSuccess;  // empty output (hidden == 0 still writes zeros)
  if (vectorizable<scalar_t>(hidden, rows, tokens)) {
    return routed_dot_launch<scalar_t, kVec<scalar_t>>(rows, tokens, pair_to_row, out, num_pairs,
                                                       top_k, hidden, stream);
  }
  return routed_dot_launch<scalar_t, 1>(rows, tokens, pair_to_row, out, num_pairs, top_k, hidden,
                                        stream);
}

#define MOEFORGE_INSTANTIATE_PERMUTE(scalar_t)                                                   \
  template cudaError_t launch_permute<scalar_t>(const scalar_t*, const int32_t*, const int32_t*, \
                                                const acc_type_t<scalar_t>*, scalar_t*, int64_t, \
                                                int64_t, int64_t, cudaStream_t);                 \
  template cudaError_t launch_combine<scalar_t>(const scalar_t*, const int32_t*,                 \
                                                const acc_type_t<scalar_t>*, scalar_t*, int64_t, \
                                                int64_t, int64_t, cudaStream_t);                 \
  template cudaError_t launch_routed_dot<scalar_t>(const scalar_t*, const scalar_t*,             \
                                                   const int32_t*, scalar_t*, int64_t, int64_t,  \
                                                   int64_t, cudaStream_t);

MOEFORGE_INSTANTIATE_PERMUTE(float)
MOEFORGE_INSTANTIATE_PERMUTE(double)
MOEFORGE_INSTANTIATE_PERMUTE(__half)
MOEFORGE_INSTANTIATE_PERMUTE(__nv_bfloat16)
#undef MOEFORGE_INSTANTIATE_PERMUTE

}  // namespace moeforge::kernels
