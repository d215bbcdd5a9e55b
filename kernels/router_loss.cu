// Fused router-loss kernels (see moeforge/kernels/router_loss.h). Two implementations:
//
// Fast path (E <= 256, top_k <= 16, float / half / bf16 rows of whole 4-byte words: every common
// router): one THREAD per row. Blocks stage tiles of consecutive rows in shared memory with
// coalesced loads; a thread computes its row's max, logsumexp and top-k threshold alone (an
// insertion network in registers, no shuffles), then threads switch to one expert column each
// for the probability sums and counts (stats) or store the gradient tile coalesced (backward).
//
// Fallback (every other supported input): one WARP per row. Lanes own experts e = lane, lane +
// 32, ... The warp finds the row max and sum of exponentials with shuffles (logsumexp), adds each
// softmax probability to its lane-owned shared accumulator, and picks the top-k by K rounds of a
// warp arg-max (largest logit, ties to the lower index) over the experts not yet picked (a
// per-lane bit mask; E <= 1024 gives at most 32 experts per lane). Per-warp accumulators are
// summed in warp order at the end of the block.
//
// Both are deterministic: every sum has an order fixed by the shapes and the element type, never
// by scheduling or the device; no atomics.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/router_loss.h"

namespace moeforge::kernels {
namespace {

constexpr int kWarp = 32;
// Fast path limits. kFastMaxRows: threads (= tile rows) per block; a tile is 128, 64 or 32 rows,
// the most that keep it within kFastSmemBytes (no opt-in, so every architecture runs the same
// tiles and so the same summation order).
constexpr int kFastMaxExperts = 256;
constexpr int kFastMaxTopK = 16;
constexpr int kFastMaxRows = 128;
constexpr int kFastMinRows = kWarp;
constexpr int kFastMaxOwned = kFastMaxExperts / kFastMinRows;  // experts per thread, column work
constexpr size_t kFastSmemBytes = 48 * 1024;
// Stats blocks for E <= kFastMaxExperts (either path) take chunks of kChunkRows rows; for larger E
// (fallback only) about kTargetRowsPerBlock rows, kTargetRowsPerWarp per warp (each row costs a
// warp ~K + 2 rounds of shuffles, one row after another, so few rows per warp keep a layer's
// launch short). Both are capped so that a layer's partial rows stay near 1 MB (kMaxPartialElems)
// whatever T: blocks then grid-stride over the rows.
constexpr int64_t kChunkRows = 128;
constexpr int kWarpsPerBlock = 4;  // fallback for E > kFastMaxExperts (stats and backward)
constexpr int kMaxFallbackWarps = 16;
constexpr int kTargetRowsPerWarp = 4;
constexpr int64_t kTargetRowsPerBlock = int64_t{kWarpsPerBlock} * kTargetRowsPerWarp;
constexpr int64_t kMaxPartialElems = int64_t{1} << 18;
// Fast backward: tiles per block (grid-stride), so that a block's prologue (counts, coefficients)
// serves more than one tile while a launch still has several waves of blocks.
constexpr int64_t kFastBackwardTilesPerBlock = 2;
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

// coef = {c_aux, c_z} = {g_aux E / R^2, 2 g_z / R}, R = sum(counts) / top_k (each kept row
// selected exactly top_k experts). Warp 0 sums the counts (integers: exact in any order), then a
// barrier: one per block, not a tree of them.
template <typename acc_t>
__device__ __forceinline__ void load_coefficients(const int64_t* __restrict__ counts, int64_t E,
                                                  int64_t top_k, const acc_t* __restrict__ grad_aux,
                                                  const acc_t* __restrict__ grad_z, acc_t* coef) {
  if (threadIdx.x < kWarp) {
    long long total = 0;
    for (int64_t e = threadIdx.x; e < E; e += kWarp) total += counts[e];
    total = warp_sum(total);
    if (threadIdx.x == 0) {
      const acc_t kept = acc_t(total / top_k);
      const acc_t inv = kept > 0 ? acc_t(1) / kept : acc_t(0);
      coef[0] = *grad_aux * acc_t(E) * inv * inv;
      coef[1] = *grad_z * acc_t(2) * inv;
    }
  }
  __syncthreads();
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

// Stats, fallback. Block (x, l): layer l's stats block x (blocks past the layer's
// router_stats_blocks exit), of fallback_warps(E, acc_t) warps.
template <typename T>
__global__ void __launch_bounds__(kMaxFallbackWarps* kWarp)
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
  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  acc_t* counts = smem + warp * 2 * E;
  acc_t* psum = counts + E;
  acc_t* scalars = smem + warps * 2 * E;  // [warps][zsum, kept]
  for (int64_t e = lane; e < E; e += kWarp) counts[e] = psum[e] = acc_t(0);
  acc_t zsum = 0, kept = 0;  // lane 0's copies count

  // Rows warp, warp + W, warp + 2W, ... (W = all warps of the grid): a fixed assignment.
  for (int64_t t = int64_t{blockIdx.x} * warps + warp; t < num_tokens; t += layer_blocks * warps) {
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
    for (int w = 0; w < warps; ++w) s += smem[w * 2 * E + i];
    out[i] = s;
  }
  if (threadIdx.x < 2) {
    acc_t s = 0;
    for (int w = 0; w < warps; ++w) s += scalars[2 * w + threadIdx.x];
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

// Backward, fallback: one warp per row, grad = c_aux * p * (count - <count, p>) + c_z * lse * p
// on kept rows, 0 else.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
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
  load_coefficients(counts, E, top_k, grad_aux, grad_z, coef);
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

// ---- Fast path: one thread per row
// ---------------------------------------------------------------- For E <= kFastMaxExperts, top_k
// <= kFastMaxTopK and rows of whole 4-byte words (float; half and bf16 with E even). A block of R
// threads (R = tile rows, a function of E and the element size only) stages a tile of R consecutive
// rows in shared memory with coalesced loads; thread r then works on row r alone (no shuffles: a
// few instructions per logit), and the column work (psum, counts, gradient stores) reads the tile
// again by expert. Rows are R-row tiles of the block's 128-row chunks, in ascending order: every
// sum has an order fixed by the shapes.

// Shared-memory tile geometry (host-chosen, see fast_layout).
struct TileLayout {
  int rows;        // R: rows per tile = threads per block (32, 64 or 128)
  int words;       // 4-byte words per row (E * sizeof(T) / 4)
  int stride;      // words between tile rows: odd, so that 32 threads reading word w of 32
                   // consecutive rows hit 32 different banks
  int unit_bytes;  // global access size of the staging copies: 16, 4 or 2 (pointer alignment)
};

// Element k of a shared-memory word holding 4 / sizeof(T) elements (little endian), and the
// reverse.
template <typename T>
__device__ __forceinline__ acc_type_t<T> word_element(uint32_t word, int k) {
  if constexpr (sizeof(T) == 4) {
    T v;
    memcpy(&v, &word, sizeof(v));
    return to_acc(v);
  } else {
    const uint16_t bits = static_cast<uint16_t>(word >> (16 * k));
    T v;
    memcpy(&v, &bits, sizeof(v));
    return to_acc(v);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_word(const acc_type_t<T>* x) {
  T v[4 / sizeof(T)];
#pragma unroll
  for (int k = 0; k < int(4 / sizeof(T)); ++k) v[k] = from_acc<T>(x[k]);
  uint32_t word;
  memcpy(&word, v, sizeof(word));
  return word;
}

// f(e, x) for every logit x = row[e] of a staged row, in ascending e.
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const uint32_t* row, int words, F&& f) {
  constexpr int kPerWord = 4 / sizeof(T);
#pragma unroll 4
  for (int w = 0; w < words; ++w) {
    const uint32_t word = row[w];
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) f(w * kPerWord + k, word_element<T>(word, k));
  }
}

// f(r, c) for unit c of row r of an n-row tile with `units` units per row, spread over the
// block's threads so that consecutive threads take consecutive units (coalesced).
template <typename F>
__device__ __forceinline__ void for_each_tile_unit(int n, int units, F&& f) {
  const int threads = blockDim.x, tid = threadIdx.x;
  if (units > threads) {
    for (int r = 0; r < n; ++r) {
      for (int c = tid; c < units; c += threads) f(r, c);
    }
    return;
  }
  const int rows_per_pass = threads / units, r0 = tid / units, c = tid - r0 * units;
  if (r0 >= rows_per_pass) return;
  // Up to kBatch loads in flight per thread before their shared-memory stores.
  constexpr int kBatch = 8;
  for (int r = r0; r < n; r += kBatch * rows_per_pass) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (r + b * rows_per_pass < n) f(r + b * rows_per_pass, c);
    }
  }
}

// Unit c of a tile row in shared memory (a 16-byte unit as four word accesses: rows start at odd
// word offsets).
template <typename Unit>
__device__ __forceinline__ void store_unit(uint32_t* tile_row, int c, const Unit& u) {
  if constexpr (sizeof(Unit) == 2) {
    reinterpret_cast<uint16_t*>(tile_row)[c] = u;
  } else {
    uint32_t w[sizeof(Unit) / 4];
    memcpy(w, &u, sizeof(Unit));
#pragma unroll
    for (int i = 0; i < int(sizeof(Unit) / 4); ++i) tile_row[c * (sizeof(Unit) / 4) + i] = w[i];
  }
}

template <typename Unit>
__device__ __forceinline__ Unit load_unit(const uint32_t* tile_row, int c) {
  Unit u;
  if constexpr (sizeof(Unit) == 2) {
    u = reinterpret_cast<const uint16_t*>(tile_row)[c];
  } else {
    uint32_t w[sizeof(Unit) / 4];
#pragma unroll
    for (int i = 0; i < int(sizeof(Unit) / 4); ++i) w[i] = tile_row[c * (sizeof(Unit) / 4) + i];
    memcpy(&u, w, sizeof(Unit));
  }
  return u;
}

// Rows [0, n) of the tile at `src` (rows of L.words words, contiguous) into shared memory.
template <typename Unit>
__device__ __forceinline__ void load_tile_units(const void* src, int n, const TileLayout& L,
                                                uint32_t* tile) {
  const Unit* __restrict__ s = static_cast<const Unit*>(src);
  const int units = L.words * 4 / int(sizeof(Unit));
  for_each_tile_unit(n, units, [&](int r, int c) {
    store_unit(tile + r * L.stride, c, s[int64_t{r} * units + c]);
  });
}

template <typename Unit>
__device__ __forceinline__ void store_tile_units(const uint32_t* tile, int n, const TileLayout& L,
                                                 void* dst) {
  Unit* __restrict__ d = static_cast<Unit*>(dst);
  const int units = L.words * 4 / int(sizeof(Unit));
  for_each_tile_unit(n, units, [&](int r, int c) {
    d[int64_t{r} * units + c] = load_unit<Unit>(tile + r * L.stride, c);
  });
}

__device__ __forceinline__ void load_tile(const void* src, int n, const TileLayout& L,
                                          uint32_t* tile) {
  if (L.unit_bytes == 16) {
    load_tile_units<uint4>(src, n, L, tile);
  } else if (L.unit_bytes == 4) {
    load_tile_units<uint32_t>(src, n, L, tile);
  } else {
    load_tile_units<uint16_t>(src, n, L, tile);
  }
}

__device__ __forceinline__ void store_tile(const uint32_t* tile, int n, const TileLayout& L,
                                           void* dst) {
  if (L.unit_bytes == 16) {
    store_tile_units<uint4>(tile, n, L, dst);
  } else if (L.unit_bytes == 4) {
    store_tile_units<uint32_t>(tile, n, L, dst);
  } else {
    store_tile_units<uint16_t>(tile, n, L, dst);
  }
}

// exp(x - m) as exp2f((x - m) log2(e)): exp2f is a single MUFU.EX2 plus range fix-ups where expf
// needs a longer range reduction; 2 ulp either way, and x - m is rounded as in the fallback. (An
// FMA x log2(e) - m log2(e) would save the subtraction but overflow for |logits| > 2.3e38.)
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float exp_shifted(float x, float m) {
  return exp2f((x - m) * kLog2e);
}

// Top-k rank of a logit: NaN ranks as -inf (fmaxf drops the NaN operand).
__device__ __forceinline__ float rank_value(float x) {
  return max(x, -INFINITY);
}

// What the column pass needs of a kept row.
struct alignas(16) RowScalars {
  float lse;  // logsumexp
  float tau;  // the top_k-th largest rank value
  int cut;    // picks: rank > tau, and rank == tau at experts <= cut
  int kept;   // 0: masked row, skipped
};

// Pass 1 over a staged row: max (NaN ignored, as in row_logsumexp) and the kCap largest rank values
// by an insertion network (min/max, no branches). Returns tau = the top_k-th largest and `need`,
// how many of the top_k picks equal tau (the others are larger).
template <typename T, int kCap>
__device__ __forceinline__ float row_max_and_kth(const uint32_t* row, int words, int top_k,
                                                 float* mx, int* need) {
  float top[kCap];
#pragma unroll
  for (int j = 0; j < kCap; ++j) top[j] = -INFINITY;
  float m = -INFINITY;
  // An explicit loop, not for_each_logit: a lambda too large to inline would keep top[] in memory.
  constexpr int kPerWord = 4 / sizeof(T);
#pragma unroll 2
  for (int w = 0; w < words; ++w) {
    const uint32_t word = row[w];
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) {
      const float x = word_element<T>(word, k);
      m = max(m, x);
      const float v = rank_value(x);
#pragma unroll
      for (int j = kCap - 1; j > 0; --j) top[j] = max(top[j], min(top[j - 1], v));
      top[0] = max(top[0], v);
    }
  }
  // tau = top[top_k - 1], the smallest of the first top_k (not indexed: that would put top[] in
  // local memory).
  float tau = INFINITY;
#pragma unroll
  for (int j = 0; j < kCap; ++j) tau = j < top_k ? min(tau, top[j]) : tau;
  int greater = 0;
#pragma unroll
  for (int j = 0; j < kCap; ++j) greater += j < top_k && top[j] > tau;
  *mx = m;
  *need = top_k - greater;
  return tau;
}

// Pass 2: sum of exp(x - mx) and the expert of the need-th logit whose rank equals tau (so the
// picks are the `need` lowest such experts: ties to the lower index).
template <typename T>
__device__ __forceinline__ float row_sum_and_cut(const uint32_t* row, int words, float mx,
                                                 float tau, int need, int* cut) {
  float sum = 0;
  int seen = 0, at = -1;
  for_each_logit<T>(row, words, [&](int e, float x) {
    sum += exp_shifted(x, mx);
    const bool eq = rank_value(x) == tau;
    seen += eq;
    at = eq && seen == need ? e : at;
  });
  *cut = at;
  return sum;
}

// Column pass of one kept row for the experts e = tid + j R this thread owns: psum += p_e,
// count += [e picked].
template <typename T>
__device__ __forceinline__ void add_row_to_columns(const uint32_t* row, const RowScalars& s, int E,
                                                   float* psum, int* count) {
  constexpr int kPerWord = 4 / sizeof(T);
  const int threads = blockDim.x;
#pragma unroll
  for (int j = 0; j < kFastMaxOwned; ++j) {
    const int e = threadIdx.x + j * threads;
    if (e >= E) break;
    const float x = word_element<T>(row[e / kPerWord], e % kPerWord);
    psum[j] += exp_shifted(x, s.lse);
    const float v = rank_value(x);
    count[j] += int(v > s.tau) | (int(v == s.tau) & int(e <= s.cut));  // no branches
  }
}

// Stats, fast path. Block (x, l): layer l's 128-row chunks x, x + B, x + 2B, ... (B = its
// router_stats_blocks), each as 128 / R tiles of R rows. Per tile: stage it; thread r: max and
// top-k values (pass 1), sum of exponentials and tie cut (pass 2) of row r, zsum += lse^2 if kept;
// then thread t adds the kept rows' p_e and picks, row by row in ascending order, for its experts
// e = t + j R. Partial row: counts and psum of the owners, zsum and kept by a fixed shuffle tree.
// Deterministic (no atomics; orders fixed by T, E and R). Per logit: 2 kCap min/max, two exp2f
// and ~20 other instructions; the logits are read from global memory once.
template <typename T, int kCap>
__global__ void __launch_bounds__(kFastMaxRows)
    router_stats_fast_kernel(const LayerTable<T> table,
                             const uint8_t* __restrict__ keep,  // [T] or nullptr
                             int E, int top_k, const TileLayout L,
                             float* __restrict__ partials) {  // [sum_l blocks, 2E + 2]
  static_assert(std::is_same_v<acc_type_t<T>, float>, "fast path: float accumulation");
  const int layer = blockIdx.y;
  const int64_t layer_blocks = table.blocks[layer];
  if (blockIdx.x >= layer_blocks) return;  // whole block, before any barrier
  const T* __restrict__ logits = table.logits[layer];
  const int64_t num_tokens = table.num_tokens[layer];
  uint32_t* tile = dynamic_shared_memory<uint32_t>();                             // [R][stride]
  RowScalars* scalars = reinterpret_cast<RowScalars*>(tile + L.rows * L.stride);  // [R]
  const int tid = threadIdx.x;
  float psum[kFastMaxOwned] = {};
  int count[kFastMaxOwned] = {};
  float zsum = 0;
  int kept = 0;
  for (int64_t chunk = blockIdx.x; chunk * kChunkRows < num_tokens; chunk += layer_blocks) {
    const int64_t chunk_end = min(num_tokens, (chunk + 1) * kChunkRows);
    for (int64_t t0 = chunk * kChunkRows; t0 < chunk_end; t0 += L.rows) {
      const int n = static_cast<int>(min(int64_t{L.rows}, chunk_end - t0));
      const bool mine = tid < n && (keep == nullptr || keep[t0 + tid] != 0);
      __syncthreads();  // the previous tile's column pass is done with the shared memory
      load_tile(logits + t0 * E, n, L, tile);
      __syncthreads();
      RowScalars s{0, 0, 0, 0};
      if (mine) {
        const uint32_t* row = tile + tid * L.stride;
        float mx;
        int need;
        s.tau = row_max_and_kth<T, kCap>(row, L.words, top_k, &mx, &need);
        const float lse = mx + log(row_sum_and_cut<T>(row, L.words, mx, s.tau, need, &s.cut));
        s.lse = lse;
        s.kept = 1;
        zsum += lse * lse;
        ++kept;
      }
      if (tid < n) scalars[tid] = s;
      __syncthreads();
      for (int r = 0; r < n; ++r) {
        const RowScalars rs = scalars[r];
        if (rs.kept) add_row_to_columns<T>(tile + r * L.stride, rs, E, psum, count);
      }
    }
  }
  float* out = partials + (table.first_partial[layer] + blockIdx.x) * (2 * E + 2);
#pragma unroll
  for (int j = 0; j < kFastMaxOwned; ++j) {
    const int e = tid + j * L.rows;
    if (e >= E) break;
    out[e] = float(count[j]);
    out[E + e] = psum[j];
  }
  // zsum and kept over the threads: a shuffle tree per warp, then the warps in order.
  __syncthreads();                                       // scalars is reused
  float* warp_sums = reinterpret_cast<float*>(scalars);  // [warps][zsum, kept]
  zsum = warp_sum(zsum);
  kept = warp_sum(kept);
  if (tid % kWarp == 0) {
    warp_sums[2 * (tid / kWarp)] = zsum;
    warp_sums[2 * (tid / kWarp) + 1] = float(kept);
  }
  __syncthreads();
  if (tid < 2) {
    float s = 0;
    for (int w = 0; w < L.rows / kWarp; ++w) s += warp_sums[2 * w + tid];
    out[2 * E + tid] = s;
  }
}

// Gradient of one kept staged row, in place: grad = p * (c_aux * (count - <count, p>) + c_z *
// lse), with p = exp(x - lse) (3 passes: max; sum of exp(x - mx) and <count, exp(x - mx)>; grad).
template <typename T>
__device__ __forceinline__ void grad_row(uint32_t* row, int words, const float* __restrict__ counts,
                                         float c_aux, float c_z) {
  constexpr int kPerWord = 4 / sizeof(T);
  float mx = -INFINITY;
  for_each_logit<T>(row, words, [&](int, float x) { mx = max(mx, x); });
  float sum = 0, dot = 0;
  for_each_logit<T>(row, words, [&](int e, float x) {
    const float u = exp_shifted(x, mx);
    sum += u;
    dot = fmaf(u, counts[e], dot);
  });
  const float lse = mx + log(sum);
  const float shift = c_z * lse - c_aux * (dot / sum);  // grad = p * (c_aux * count + shift)
#pragma unroll 4
  for (int w = 0; w < words; ++w) {
    const uint32_t word = row[w];
    float g[kPerWord];
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) {
      const int e = w * kPerWord + k;
      g[k] = exp_shifted(word_element<T>(word, k), lse) * fmaf(c_aux, counts[e], shift);
    }
    row[w] = pack_word<T>(g);
  }
}

// Backward, fast path. Block (x, l): tiles x, x + gridDim.x, ... of R rows of layer l. The counts
// (as float) and the coefficients are loaded once per block; per tile: stage, thread r turns row
// r into its gradient in place (zeros if masked), then the tile is stored coalesced.
template <typename T>
__global__ void __launch_bounds__(kFastMaxRows)
    router_loss_backward_fast_kernel(const LayerTable<T> table, const uint8_t* __restrict__ keep,
                                     const int64_t* __restrict__ counts,
                                     const float* __restrict__ grad_aux,
                                     const float* __restrict__ grad_z, int E, int top_k,
                                     const TileLayout L) {
  static_assert(std::is_same_v<acc_type_t<T>, float>, "fast path: float accumulation");
  const T* __restrict__ logits = table.logits[blockIdx.y];
  T* __restrict__ grad_logits = table.grad_logits[blockIdx.y];
  const int64_t num_tokens = table.num_tokens[blockIdx.y];
  uint32_t* tile = dynamic_shared_memory<uint32_t>();                   // [R][stride]
  float* count_f = reinterpret_cast<float*>(tile + L.rows * L.stride);  // [E]
  __shared__ float coef[2];
  const int tid = threadIdx.x;
  for (int e = tid; e < E; e += blockDim.x) count_f[e] = float(counts[e]);
  load_coefficients(counts, E, top_k, grad_aux, grad_z, coef);  // ends with a barrier
  const float c_aux = coef[0], c_z = coef[1];
  for (int64_t t0 = int64_t{blockIdx.x} * L.rows; t0 < num_tokens;
       t0 += int64_t{gridDim.x} * L.rows) {
    const int n = static_cast<int>(min(int64_t{L.rows}, num_tokens - t0));
    const bool kept = tid < n && (keep == nullptr || keep[t0 + tid] != 0);
    __syncthreads();  // the previous tile is stored
    load_tile(logits + t0 * E, n, L, tile);
    __syncthreads();
    uint32_t* row = tile + tid * L.stride;
    if (kept) {
      grad_row<T>(row, L.words, count_f, c_aux, c_z);
    } else if (tid < n) {
      for (int w = 0; w < L.words; ++w) row[w] = 0;  // +0 in every element type
    }
    __syncthreads();
    store_tile(tile, n, L, grad_logits + t0 * E);
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

// Fast path or fallback: a function of the shapes and the element type only (never of pointers or
// the device), so that inputs of one shape always sum in the same order.
template <typename T>
bool use_fast_path(int64_t E, int64_t top_k) {
  return sizeof(T) <= 4 && E <= kFastMaxExperts && top_k <= kFastMaxTopK &&
         E * int64_t{sizeof(T)} % 4 == 0;
}

// Warps per fallback stats block: kWarpsPerBlock for E > kFastMaxExperts (kTargetRowsPerBlock-row
// blocks); for smaller E (kChunkRows-row blocks) up to kMaxFallbackWarps, as many as keep the
// per-warp accumulators within 48 KB.
int fallback_warps(int64_t E, size_t acc_bytes) {
  if (E > kFastMaxExperts) return kWarpsPerBlock;
  int warps = kMaxFallbackWarps;
  while (warps > kWarpsPerBlock && size_t(warps) * (2 * E + 2) * acc_bytes > 48 * 1024) warps /= 2;
  return warps;
}

// Shared memory of the fast kernels: the tile, then [R] RowScalars (stats) or [E] counts
// (backward).
size_t fast_smem_bytes(const TileLayout& L, int64_t E) {
  return sizeof(uint32_t) * L.rows * L.stride +
         std::max(sizeof(RowScalars) * L.rows, sizeof(float) * E);
}

// The fast path's tile for rows of E elements of T (use_fast_path<T>): the most rows (128, 64,
// 32) within kFastSmemBytes; 16-byte global accesses where every row start allows, else 4 or 2.
template <typename T>
TileLayout fast_layout(int64_t E, const LayerTable<T>& table, int count, bool with_grads) {
  const int64_t row_bytes = E * int64_t{sizeof(T)};
  TileLayout L{};
  L.words = static_cast<int>(row_bytes / 4);
  L.stride = L.words | 1;
  L.rows = kFastMaxRows;
  while (L.rows > kFastMinRows && fast_smem_bytes(L, E) > kFastSmemBytes) L.rows /= 2;
  uintptr_t bits = static_cast<uintptr_t>(row_bytes);
  for (int l = 0; l < count; ++l) {
    bits |= reinterpret_cast<uintptr_t>(table.logits[l]);
    if (with_grads) bits |= reinterpret_cast<uintptr_t>(table.grad_logits[l]);
  }
  L.unit_bytes = bits % 16 == 0 ? 16 : bits % 4 == 0 ? 4 : 2;
  return L;
}
}  // namespace

int64_t router_stats_blocks(int64_t num_tokens, int64_t num_experts) {
  const int64_t rows = num_experts <= kFastMaxExperts ? kChunkRows : kTargetRowsPerBlock;
  const int64_t wanted = (std::max<int64_t>(num_tokens, 0) + rows - 1) / rows;
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

template <typename T, int kCap>
cudaError_t launch_stats_fast(const LayerTable<T>& table, dim3 grid, const uint8_t* keep, int64_t E,
                              int64_t top_k, float* partials, cudaStream_t stream) {
  const TileLayout L = fast_layout<T>(E, table, int(grid.y), /*with_grads=*/false);
  MOEFORGE_CUDA_CHECK(launch_kernel(router_stats_fast_kernel<T, kCap>, grid, L.rows,
                                    fast_smem_bytes(L, E), stream, table, keep, int(E), int(top_k),
                                    L, partials));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_stats_fallback(const LayerTable<T>& table, dim3 grid, const uint8_t* keep,
                                  int64_t E, int64_t top_k, acc_type_t<T>* partials,
                                  cudaStream_t stream) {
  using acc_t = acc_type_t<T>;
  const int warps = fallback_warps(E, sizeof(acc_t));
  const size_t smem = sizeof(acc_t) * (warps * 2 * E + 2 * warps);
  if (smem > 48 * 1024) {
    MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(
        router_stats_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  MOEFORGE_CUDA_CHECK(launch_kernel(router_stats_kernel<T>, grid, warps * kWarp, smem, stream,
                                    table, keep, E, top_k, partials));
  return cudaSuccess;
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
  // Every block of a layer runs even with no rows, so that all its partial rows are written.
  const dim3 grid(static_cast<unsigned>(max_blocks), static_cast<unsigned>(layers.count));
  if constexpr (sizeof(T) <= 4) {
    if (use_fast_path<T>(E, top_k)) {
      // The smallest instantiated list that holds top_k values.
      if (top_k <= 2) return launch_stats_fast<T, 2>(table, grid, keep, E, top_k, partials, stream);
      if (top_k <= 4) return launch_stats_fast<T, 4>(table, grid, keep, E, top_k, partials, stream);
      if (top_k <= 8) return launch_stats_fast<T, 8>(table, grid, keep, E, top_k, partials, stream);
      return launch_stats_fast<T, kFastMaxTopK>(table, grid, keep, E, top_k, partials, stream);
    }
  }
  return launch_stats_fallback(table, grid, keep, E, top_k, partials, stream);
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
  if constexpr (sizeof(T) <= 4) {
    if (use_fast_path<T>(E, top_k)) {
      const TileLayout L = fast_layout<T>(E, table, layers.count, /*with_grads=*/true);
      const int64_t tiles = (max_tokens + L.rows - 1) / L.rows;
      const int64_t blocks = std::clamp<int64_t>(
          (tiles + kFastBackwardTilesPerBlock - 1) / kFastBackwardTilesPerBlock, 1, 1 << 20);
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(layers.count));
      MOEFORGE_CUDA_CHECK(launch_kernel(router_loss_backward_fast_kernel<T>, grid, L.rows,
                                        fast_smem_bytes(L, E), stream, table, keep, counts,
                                        grad_aux, grad_z, int(E), int(top_k), L));
      return cudaSuccess;
    }
  }
  const int64_t blocks =
      std::clamp<int64_t>((max_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, 1 << 20);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(layers.count));
  MOEFORGE_CUDA_CHECK(launch_kernel(router_loss_backward_kernel<T>, grid, kWarpsPerBlock * kWarp, 0,
                                    stream, table, keep, counts, grad_aux, grad_z, E, top_k));
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
