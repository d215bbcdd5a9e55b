// Fused router-loss kernels (see moeforge/kernels/router_loss.h).
//
// Row work is one warp per row: lanes own experts e = lane, lane + 32, ... The warp finds the
// row max and sum of exponentials with shuffles (logsumexp), adds each softmax probability to its
// lane-owned shared accumulator, and picks the top-k by K rounds of a warp arg-max (largest logit,
// ties to the lower index) over the experts not yet picked (a per-lane bit mask; E <= 1024 gives
// at most 32 experts per lane). Per-warp accumulators are summed in warp order at the end of the
// block, so every result is independent of scheduling.
#include <algorithm>
#include <climits>
#include <cmath>

#include "launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/router_loss.h"

namespace moeforge::kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
// Stats grid: about kTargetRowsPerWarp rows per warp (each row costs a warp ~K + 2 rounds of
// shuffles, one row after another, so few rows per warp keep a layer's launch short: 16 made each
// launch tens of microseconds), capped so that a layer's partial rows stay near 1 MB
// (kMaxPartialElems) whatever T: warps then grid-stride over the rows.
constexpr int kTargetRowsPerWarp = 4;
constexpr int64_t kTargetRowsPerBlock = int64_t{kWarpsPerBlock} * kTargetRowsPerWarp;
constexpr int64_t kMaxPartialElems = int64_t{1} << 18;
constexpr int kFinalizeThreads = 256;
// launch_router_finalize's first stage: blocks of 32 columns x 8 row-lanes, at most 16 chunks of
// at least 64 rows each.
constexpr int kReduceCols = kWarp;
constexpr int kReduceLanes = 8;
constexpr int kReduceUnroll = 8;
constexpr int kMaxReduceChunks = 16;
constexpr int kReduceThreads = kReduceCols * kReduceLanes;
constexpr int64_t kMinRowsPerChunk = int64_t{kReduceLanes} * kReduceUnroll;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t exp_acc(acc_t x) {
  return exp(x);
}

// Max and logsumexp of one row, computed by the whole warp.
template <typename T>
__device__ __forceinline__ acc_type_t<T> row_logsumexp(const T* __restrict__ row, int64_t E,
                                                       int lane) {
  using acc_t = acc_type_t<T>;
  acc_t mx = -INFINITY;
  for (int64_t e = lane; e < E; e += kWarp) mx = max(mx, to_acc(row[e]));
  mx = warp_max(mx);
  acc_t sum = 0;
  for (int64_t e = lane; e < E; e += kWarp) sum += exp_acc(to_acc(row[e]) - mx);
  sum = warp_sum(sum);
  return mx + log(sum);
}

// Per-warp shared accumulators of launch_router_stats: counts[E], psum[E] per warp.
template <typename acc_t>
struct WarpStats {
  acc_t* counts;
  acc_t* psum;
};

// The kernels' view of a RouterLayers batch: per layer, its stats blocks and first partial row.
template <typename T>
struct LayerTable {
  const T* logits[kRouterLayersPerLaunch];
  T* grad_logits[kRouterLayersPerLaunch];
  int64_t num_tokens[kRouterLayersPerLaunch];
  int64_t blocks[kRouterLayersPerLaunch];
  int64_t first_partial[kRouterLayersPerLaunch];
};

// Block (x, l): layer l's stats block x (blocks past the layer's router_stats_blocks exit).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    router_stats_kernel(const LayerTable<T> table,
                        const uint8_t* __restrict__ keep,  // [T] or nullptr
                        int64_t E, int64_t top_k,
                        acc_type_t<T>* __restrict__ partials) {  // [sum_l blocks, 2E + 2]
  using acc_t = acc_type_t<T>;
  const int layer = blockIdx.y;
  const int64_t layer_blocks = table.blocks[layer];
  if (blockIdx.x >= layer_blocks) return;  // whole block, before any barrier
  const T* __restrict__ logits = table.logits[layer];
  const int64_t num_tokens = table.num_tokens[layer];
  acc_t* smem = dynamic_shared_memory<acc_t>();  // [warps][2E] then [warps][2]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  acc_t* counts = smem + warp * 2 * E;
  acc_t* psum = counts + E;
  acc_t* scalars = smem + kWarpsPerBlock * 2 * E;  // [warps][zsum, kept]
  for (int64_t e = lane; e < E; e += kWarp) counts[e] = psum[e] = acc_t(0);
  acc_t zsum = 0, kept = 0;  // lane 0's copies count

  // Rows warp, warp + W, warp + 2W, ... (W = all warps of the grid): a fixed assignment.
  for (int64_t t = int64_t{blockIdx.x} * kWarpsPerBlock + warp; t < num_tokens;
       t += layer_blocks * kWarpsPerBlock) {
    if (keep != nullptr && keep[t] == 0) continue;  // warp-uniform
    const T* row = logits + t * E;
    const acc_t lse = row_logsumexp(row, E, lane);
    for (int64_t e = lane; e < E; e += kWarp) psum[e] += exp_acc(to_acc(row[e]) - lse);
    uint32_t picked = 0;  // bit i: expert lane + 32 i already selected
    for (int64_t k = 0; k < top_k; ++k) {
      acc_t best = -INFINITY;
      int best_e = INT_MAX;
      for (int64_t e = lane, i = 0; e < E; e += kWarp, ++i) {
        acc_t v = to_acc(row[e]);
        if (isnan(v)) v = -INFINITY;  // NaN ranks lowest, as on the CPU: exactly top_k picks
        if (!(picked >> i & 1u) && (v > best || best_e == INT_MAX)) {
          best = v;
          best_e = static_cast<int>(e);
        }
      }
#pragma unroll
      for (int o = kWarp / 2; o > 0; o /= 2) {
        const acc_t ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
        if (ov > best || (ov == best && oe < best_e)) {
          best = ov;
          best_e = oe;
        }
      }
      // The owning lane records the pick (best_e == INT_MAX only if no expert was left, which
      // top_k <= E rules out; the guard keeps a broken invariant from writing out of bounds).
      if (best_e != INT_MAX && best_e % kWarp == lane) {
        picked |= 1u << (best_e / kWarp);
        counts[best_e] += acc_t(1);
      }
    }
    zsum += lse * lse;
    kept += acc_t(1);
  }
  if (lane == 0) {
    scalars[2 * warp] = zsum;
    scalars[2 * warp + 1] = kept;
  }
  __syncthreads();
  acc_t* out = partials + (table.first_partial[layer] + blockIdx.x) * (2 * E + 2);
  for (int64_t i = threadIdx.x; i < 2 * E; i += blockDim.x) {
    acc_t s = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) s += smem[w * 2 * E + i];
    out[i] = s;
  }
  if (threadIdx.x < 2) {
    acc_t s = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) s += scalars[2 * w + threadIdx.x];
    out[2 * E + threadIdx.x] = s;
  }
}

// Stage 1 of launch_router_finalize: column sums of the partial rows, chunk by chunk, in double.
// The rows [0, num_partials) are cut into gridDim.y <= kMaxReduceChunks contiguous chunks of
// rows_per_chunk rows (a function of num_partials alone, see reduce_rows_per_chunk). Block
// (blockIdx.x, blockIdx.y) sums columns [32 blockIdx.x, +32) of chunk blockIdx.y: thread (x, y)
// adds the rows begin + y, begin + y + 8, ... of column 32 blockIdx.x + x in ascending order
// (kReduceUnroll independent loads in flight, added in row order), then row-lane 0 adds the 8
// row-lane sums in lane order. The order of every addition is fixed by the shapes: deterministic,
// no atomics. Reads num_partials * width acc_t once, coalesced (a warp reads 32 consecutive
// columns of one row); writes [gridDim.y, width] doubles.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    router_reduce_partials_kernel(const acc_t* __restrict__ partials,  // [num_partials, width]
                                  int64_t num_partials, int64_t width, int64_t rows_per_chunk,
                                  double* __restrict__ chunk_sums) {  // [gridDim.y, width]
  __shared__ double lane_sums[kReduceLanes][kReduceCols];
  const int64_t col = int64_t{blockIdx.x} * kReduceCols + threadIdx.x;
  const int64_t begin = int64_t{blockIdx.y} * rows_per_chunk;
  const int64_t end = min(begin + rows_per_chunk, num_partials);
  double s = 0;
  if (col < width) {
    const acc_t* column = partials + col;
    int64_t b = begin + threadIdx.y;
    for (; b + (kReduceUnroll - 1) * kReduceLanes < end; b += kReduceUnroll * kReduceLanes) {
      acc_t v[kReduceUnroll];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) v[u] = column[(b + u * kReduceLanes) * width];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) s += double(v[u]);
    }
    for (; b < end; b += kReduceLanes) s += double(column[b * width]);
  }
  lane_sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < width) {
    double t = 0;
#pragma unroll
    for (int y = 0; y < kReduceLanes; ++y) t += lane_sums[y][threadIdx.x];
    chunk_sums[int64_t{blockIdx.y} * width + col] = t;
  }
}

// Stage 2, one block: column sums of the <= kMaxReduceChunks chunk rows in chunk order (double;
// all loads of a column issued before the adds), then a fixed-shape tree for
// sum_e count_e * psum_e.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    router_finalize_kernel(const double* __restrict__ chunk_sums,  // [num_chunks, 2E + 2]
                           int64_t num_chunks, int64_t E, acc_t* __restrict__ aux,
                           acc_t* __restrict__ z, int64_t* __restrict__ counts) {
  __shared__ double dot[kFinalizeThreads];
  __shared__ double tail[2];
  const int64_t width = 2 * E + 2;
  // Sum of column i over the chunk rows, in chunk order (x + 0.0 == x for the missing rows).
  const auto column_sum = [&](int64_t i) {
    double v[kMaxReduceChunks];
#pragma unroll
    for (int b = 0; b < kMaxReduceChunks; ++b)
      v[b] = b < num_chunks ? chunk_sums[b * width + i] : 0.0;
    double s = 0;
#pragma unroll
    for (int b = 0; b < kMaxReduceChunks; ++b) s += v[b];
    return s;
  };
  double local = 0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const double c = column_sum(e), p = column_sum(E + e);
    counts[e] = static_cast<int64_t>(c + 0.5);
    local += c * p;
  }
  if (threadIdx.x < 2) tail[threadIdx.x] = column_sum(2 * E + threadIdx.x);
  dot[threadIdx.x] = local;
  __syncthreads();
  for (int stride = kFinalizeThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) dot[threadIdx.x] += dot[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double kept = tail[1];
    *aux = kept > 0 ? acc_t(double(E) * dot[0] / (kept * kept)) : acc_t(0);
    *z = kept > 0 ? acc_t(tail[0] / kept) : acc_t(0);
  }
}

// One warp per row: grad = c_aux * p * (count - <count, p>) + c_z * lse * p on kept rows, 0 else.
// R = sum(counts) / top_k (each kept row selected exactly top_k experts).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    router_loss_backward_kernel(const LayerTable<T> table, const uint8_t* __restrict__ keep,
                                const int64_t* __restrict__ counts,
                                const acc_type_t<T>* __restrict__ grad_aux,
                                const acc_type_t<T>* __restrict__ grad_z, int64_t E,
                                int64_t top_k) {  // block (x, l): rows of layer l
  using acc_t = acc_type_t<T>;
  const T* __restrict__ logits = table.logits[blockIdx.y];
  T* __restrict__ grad_logits = table.grad_logits[blockIdx.y];
  const int64_t num_tokens = table.num_tokens[blockIdx.y];
  __shared__ acc_t coef[2];  // c_aux, c_z
  __shared__ long long count_sums[kThreads];
  // sum(counts): every thread loads its share, then a tree (integers: exact in any order). A
  // single thread looping over E dependent loads cost every block microseconds.
  long long mine = 0;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) mine += counts[e];
  count_sums[threadIdx.x] = mine;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) count_sums[threadIdx.x] += count_sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t total = count_sums[0];
    const acc_t kept = acc_t(total / top_k);
    const acc_t inv = kept > 0 ? acc_t(1) / kept : acc_t(0);
    coef[0] = *grad_aux * acc_t(E) * inv * inv;
    coef[1] = *grad_z * acc_t(2) * inv;
  }
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t t = int64_t{blockIdx.x} * kWarpsPerBlock + warp; t < num_tokens;
       t += int64_t{gridDim.x} * kWarpsPerBlock) {
    const T* row = logits + t * E;
    T* grow = grad_logits + t * E;
    if (keep != nullptr && keep[t] == 0) {
      for (int64_t e = lane; e < E; e += kWarp) grow[e] = from_acc<T>(acc_t(0));
      continue;
    }
    const acc_t lse = row_logsumexp(row, E, lane);
    acc_t dot = 0;
    for (int64_t e = lane; e < E; e += kWarp) {
      dot += exp_acc(to_acc(row[e]) - lse) * acc_t(counts[e]);
    }
    dot = warp_sum(dot);
    for (int64_t e = lane; e < E; e += kWarp) {
      const acc_t p = exp_acc(to_acc(row[e]) - lse);
      grow[e] = from_acc<T>(coef[0] * p * (acc_t(counts[e]) - dot) + coef[1] * lse * p);
    }
  }
}

bool valid(int64_t num_tokens, int64_t E, int64_t top_k) {
  return num_tokens >= 0 && E >= 1 && E <= kRouterMaxExperts && top_k >= 1 && top_k <= E;
}

// Rows per chunk of router_reduce_partials_kernel: a function of num_partials alone (not of the
// device), so that the summation order, and so the result, is the same everywhere.
int64_t reduce_rows_per_chunk(int64_t num_partials) {
  return std::max(kMinRowsPerChunk, (num_partials + kMaxReduceChunks - 1) / kMaxReduceChunks);
}

int64_t reduce_chunks(int64_t num_partials) {
  if (num_partials <= 0) return 0;
  const int64_t rows = reduce_rows_per_chunk(num_partials);
  return (num_partials + rows - 1) / rows;
}

}  // namespace

int64_t router_stats_blocks(int64_t num_tokens, int64_t num_experts) {
  const int64_t wanted =
      (std::max<int64_t>(num_tokens, 0) + kTargetRowsPerBlock - 1) / kTargetRowsPerBlock;
  const int64_t cap = std::max<int64_t>(
      16, kMaxPartialElems / router_partial_width(std::max<int64_t>(num_experts, 1)));
  return std::clamp<int64_t>(wanted, 1, cap);
}

int64_t router_finalize_workspace_elems(int64_t num_partials, int64_t num_experts) {
  if (num_experts < 1) return 0;
  return reduce_chunks(num_partials) * router_partial_width(num_experts);
}

// The kernels' table of `layers`, or false when the batch is malformed.
template <typename T>
bool layer_table(const RouterLayers<T>& layers, int64_t E, LayerTable<T>* table) {
  if (layers.count < 0 || layers.count > kRouterLayersPerLaunch) return false;
  int64_t first = 0;
  for (int l = 0; l < layers.count; ++l) {
    if (layers.num_tokens[l] < 0) return false;
    table->logits[l] = layers.logits[l];
    table->grad_logits[l] = layers.grad_logits[l];
    table->num_tokens[l] = layers.num_tokens[l];
    table->blocks[l] = router_stats_blocks(layers.num_tokens[l], E);
    table->first_partial[l] = first;
    first += table->blocks[l];
  }
  return true;
}

template <typename T>
cudaError_t launch_router_stats_layers(const RouterLayers<T>& layers, const uint8_t* keep,
                                       int64_t E, int64_t top_k, acc_type_t<T>* partials,
                                       cudaStream_t stream) {
  LayerTable<T> table{};
  if (!valid(0, E, top_k) || !layer_table(layers, E, &table)) return cudaErrorInvalidValue;
  if (layers.count == 0) return cudaSuccess;
  int64_t max_blocks = 1;
  for (int l = 0; l < layers.count; ++l) max_blocks = std::max(max_blocks, table.blocks[l]);
  using acc_t = acc_type_t<T>;
  const size_t smem = sizeof(acc_t) * (kWarpsPerBlock * 2 * E + 2 * kWarpsPerBlock);
  if (smem > 48 * 1024) {
    MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(
        router_stats_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  // Every block of a layer runs even with no rows, so that all its partial rows are written.
  const dim3 grid(static_cast<unsigned>(max_blocks), static_cast<unsigned>(layers.count));
  MOEFORGE_CUDA_CHECK(launch_kernel(router_stats_kernel<T>, grid, kThreads, smem, stream, table,
                                    keep, E, top_k, partials));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_router_stats(const T* logits, const uint8_t* keep, int64_t num_tokens, int64_t E,
                                int64_t top_k, acc_type_t<T>* partials, cudaStream_t stream) {
  if (!valid(num_tokens, E, top_k)) return cudaErrorInvalidValue;
  RouterLayers<T> one;
  one.logits[0] = logits;
  one.num_tokens[0] = num_tokens;
  one.count = 1;
  return launch_router_stats_layers(one, keep, E, top_k, partials, stream);
}

template <typename acc_t>
cudaError_t launch_router_finalize(const acc_t* partials, int64_t num_partials, int64_t E,
                                   acc_t* aux, acc_t* z, int64_t* counts, double* workspace,
                                   cudaStream_t stream) {
  if (E < 1 || E > kRouterMaxExperts || num_partials < 0) return cudaErrorInvalidValue;
  if (num_partials > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t width = router_partial_width(E);
  const int64_t chunks = reduce_chunks(num_partials);
  if (chunks > 0) {
    const dim3 grid(static_cast<unsigned>((width + kReduceCols - 1) / kReduceCols),
                    static_cast<unsigned>(chunks));
    MOEFORGE_CUDA_CHECK(launch_kernel(
        router_reduce_partials_kernel<acc_t>, grid, dim3(kReduceCols, kReduceLanes), 0, stream,
        partials, num_partials, width, reduce_rows_per_chunk(num_partials), workspace));
  }
  MOEFORGE_CUDA_CHECK(launch_kernel(router_finalize_kernel<acc_t>, 1, kFinalizeThreads, 0, stream,
                                    static_cast<const double*>(workspace), chunks, E, aux, z,
                                    counts));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_router_loss_backward_layers(const RouterLayers<T>& layers, const uint8_t* keep,
                                               const int64_t* counts, const acc_type_t<T>* grad_aux,
                                               const acc_type_t<T>* grad_z, int64_t E,
                                               int64_t top_k, cudaStream_t stream) {
  LayerTable<T> table{};
  if (!valid(0, E, top_k) || !layer_table(layers, E, &table)) return cudaErrorInvalidValue;
  int64_t max_tokens = 0;
  for (int l = 0; l < layers.count; ++l) max_tokens = std::max(max_tokens, table.num_tokens[l]);
  if (layers.count == 0 || max_tokens == 0) return cudaSuccess;
  const int64_t blocks =
      std::clamp<int64_t>((max_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, 1 << 20);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(layers.count));
  MOEFORGE_CUDA_CHECK(launch_kernel(router_loss_backward_kernel<T>, grid, kThreads, 0, stream,
                                    table, keep, counts, grad_aux, grad_z, E, top_k));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_router_loss_backward(const T* logits, const uint8_t* keep, const int64_t* counts,
                                        const acc_type_t<T>* grad_aux, const acc_type_t<T>* grad_z,
                                        T* grad_logits, int64_t num_tokens, int64_t E,
                                        int64_t top_k, cudaStream_t stream) {
  if (!valid(num_tokens, E, top_k)) return cudaErrorInvalidValue;
  RouterLayers<T> one;
  one.logits[0] = logits;
  one.grad_logits[0] = grad_logits;
  one.num_tokens[0] = num_tokens;
  one.count = 1;
  return launch_router_loss_backward_layers(one, keep, counts, grad_aux, grad_z, E, top_k, stream);
}

#define MOEFORGE_INSTANTIATE_ROUTER_LOSS(T)                                                        \
  template cudaError_t launch_router_stats_layers<T>(                                              \
      const RouterLayers<T>&, const uint8_t*, int64_t, int64_t, acc_type_t<T>*, cudaStream_t);     \
  template cudaError_t launch_router_loss_backward_layers<T>(                                      \
      const RouterLayers<T>&, const uint8_t*, const int64_t*, const acc_type_t<T>*,                \
      const acc_type_t<T>*, int64_t, int64_t, cudaStream_t);                                       \
  template cudaError_t launch_router_stats<T>(const T*, const uint8_t*, int64_t, int64_t, int64_t, \
                                              acc_type_t<T>*, cudaStream_t);                       \
  template cudaError_t launch_router_loss_backward<T>(                                             \
      const T*, const uint8_t*, const int64_t*, const acc_type_t<T>*, const acc_type_t<T>*, T*,    \
      int64_t, int64_t, int64_t, cudaStream_t);

MOEFORGE_INSTANTIATE_ROUTER_LOSS(float)
MOEFORGE_INSTANTIATE_ROUTER_LOSS(double)
MOEFORGE_INSTANTIATE_ROUTER_LOSS(__half)
MOEFORGE_INSTANTIATE_ROUTER_LOSS(__nv_bfloat16)
#undef MOEFORGE_INSTANTIATE_ROUTER_LOSS

template cudaError_t launch_router_finalize<float>(const float*, int64_t, int64_t, float*, float*,
                                                   int64_t*, double*, cudaStream_t);
template cudaError_t launch_router_finalize<double>(const double*, int64_t, int64_t, double*,
                                                    double*, int64_t*, double*, cudaStream_t);

}  // namespace moeforge::kernels
