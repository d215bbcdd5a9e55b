// What the two row-grouped sm_90a kernels share (contract: moeforge/kernels/grouped_gemm_sm90.h):
// grouped_gemm_sm90.cu (every thread loads and multiplies; the serial and overlapped pipelines)
// and grouped_gemm_sm90_ws.cu (a producer warpgroup loads, two consumer warpgroups multiply).
// - the schedule: the experts' row bounds and the prefix of M tiles per expert in shared memory,
//   walked tile by tile (sm90_layout.h tile_coord: 128-row M tiles over unpadded expert segments,
//   N tiles of one or, on the warp-specialised kernel's wide tiles, two B tiles fastest);
// - the operand loads of one stage through cp.async into 1024-byte aligned K-major (A) and K- or
//   MN-major (B) SW128 tiles (the warp-specialised kernel copies B with TMA instead, into the
//   same layout), with the row gather (A rows read through the routing plan) and
//   SwiGLU's B tiles (64 gate + 64 up rows); LoRA's tiles (u's rows, M_e's rank rows);
// - the epilogue of a tile from the accumulators: the bias, LoRA's up-projection on the tensor
//   cores, the store of y or h and the activation a.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../async_copy.cuh"
#include "../expert_bounds.cuh"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "moeforge/kernels/sm90_layout.h"
#include "moeforge/kernels/swiglu_math.h"
#include "tma.cuh"
#include "wgmma.cuh"

namespace moeforge::kernels::sm90 {

inline constexpr int kBM = kTileMn, kBN = kTileMn;
inline constexpr int kChunksPerRow = kBK * 2 / 16;       // 16-byte chunks per 128-byte row: 8
inline constexpr int kTileChunks = kBM * kChunksPerRow;  // of one 16 KB operand tile: 1024
inline constexpr int kGluHalf = kBN / 2;                 // gate columns, then as many up columns
static_assert(kBM == kBN, "one chunk mapping serves A and B");

// The row of x that row r of a tile (rows [row0, row0 + rows) of the routed order) reads, or -1
// for a zero row: r past the segment's tail, or (gathering) a pair outside [0, T * top_k).
__device__ __forceinline__ int64_t a_source_row(const GroupedGemmSm90Args& args, int64_t row0,
                                                int64_t rows, int r) {
  if (r >= rows) return -1;
  const int64_t routed = row0 + r;
  if (args.sorted_pairs == nullptr) return routed;
  const int32_t pair = args.sorted_pairs[routed];  // < num_tokens * top_k <= INT32_MAX
  return pair >= 0 && pair < args.num_tokens * args.top_k
             ? static_cast<int64_t>(pair / static_cast<int32_t>(args.top_k))
             : -1;
}

// Whether the B tile pairs HF's SwiGLU halves: 64 gate columns n0.. then the 64 up columns
// I + n0.. (gpt-oss's interleaved pairs are adjacent columns of an ordinary tile).
__host__ __device__ __forceinline__ bool glu_halves(const GroupedGemmSm90Args& args) {
  return args.a != nullptr && args.glu == GluVariant::kSilu;
}

// The output column that tile column c (of a tile whose first column is n0, an intermediate
// column with SwiGLU halves) stands for, or -1 past the output: n0 + c, or with SwiGLU halves
// the gate column n0 + c (c < 64) or the up column I + n0 + c - 64.
__device__ __forceinline__ int64_t output_column(const GroupedGemmSm90Args& args, int64_t n0,
                                                 int c) {
  if (!glu_halves(args)) return n0 + c < args.n ? n0 + c : -1;
  const int64_t inter = args.n / 2, j = n0 + c % kGluHalf;
  return j < inter ? (c < kGluHalf ? 0 : inter) + j : -1;
}

// One loader thread's share of a tile's copies, resolved once per tile so that a k block costs
// one address per copy (the warp-specialised producer has few registers). Thread `loader` of
// kLoaders copies kChunks 16-byte chunks of each operand tile:
// - A and a K-major B: chunk i is 16-byte column c = loader % 8 of tile row r0 + i kRowStep
//   (r0 = loader / 8), at a constant shared-memory stride (the swizzle's row bits repeat);
// - an MN-major B: chunk i is column chunk cm = loader % 16 (values 8 cm.., the second 64-value
//   block from cm = 8) of k row kr0 + i kKStep (kr0 = loader / 16).
// A rows past the segment's tail, weight rows / columns past n and k past k are zero-filled
// (src-size 0). With SwiGLU halves the B tile's rows (or columns) 0-63 are the gate rows n0..
// and 64-127 the matching up rows I + n0.. (chunks i >= kChunks / 2 of a K-major B).
// A wide tile (kBTiles = 2: 128 x 256) has two such B tiles side by side, the second kTileBytes
// after the first, for the columns one B tile further (n0 + b_tile_columns): both are planned
// and loaded alike, so a K-major pair is one 256-row operand and an MN-major pair four 64-value
// blocks kMnBlockBytes apart, each what one wgmma.m64n256k16 descriptor reads.
template <int kLoaders, int kBTiles = 1>
struct TileLoads {
  static constexpr int kChunks = kTileChunks / kLoaders;
  static constexpr int kRowStep = kLoaders / kChunksPerRow;
  static constexpr int kKStep = kLoaders / (2 * kChunksPerRow);
  static_assert(kRowStep * kChunks == kBM && kKStep * kChunks == kBK, "chunks tile evenly");
  // Chunk i's shared-memory offset is chunk 0's plus i strides only if the swizzle's row bits
  // (row % 8) repeat from chunk to chunk; the up half of SwiGLU's B is chunks >= kChunks / 2.
  static_assert(kRowStep % 8 == 0 && kKStep % 8 == 0 && kChunks % 2 == 0, "constant strides");

  int32_t a_row[kChunks];    // x's row of A chunk i, or -1 (zero)
  int32_t b_index[kBTiles];  // K-major: W_e's row of chunk 0; MN-major: W_e's column of chunk cm
  int32_t b_up_shift;        // K-major: added to the rows of the up half (chunks >= kChunks / 2)
  uint32_t b_ok[kBTiles];    // K-major: bit i, chunk i's row exists; MN-major: bit 0, the column

  __device__ __forceinline__ static int column(int loader) { return loader % kChunksPerRow; }
  __device__ __forceinline__ static int first_row(int loader) { return loader / kChunksPerRow; }
  __device__ __forceinline__ static int mn_chunk(int loader) {
    return loader % (2 * kChunksPerRow);
  }
  __device__ __forceinline__ static int first_k_row(int loader) {
    return loader / (2 * kChunksPerRow);
  }
  // Shared-memory offsets of chunk 0 within an operand tile, and the stride between chunks.
  __device__ __forceinline__ static uint32_t k_major_offset(int loader) {
    return sw128_offset(static_cast<uint32_t>(first_row(loader)),
                        static_cast<uint32_t>(column(loader)));
  }
  __device__ __forceinline__ static uint32_t mn_major_offset(int loader) {
    return sw128_mn_offset(static_cast<uint32_t>(first_k_row(loader)),
                           static_cast<uint32_t>(mn_chunk(loader)), kMnBlockBytes);
  }
  static constexpr uint32_t kKMajorStride = kRowStep * 128, kMnMajorStride = kKStep * 128;
};

// The weight column (of W_e's n, or with SwiGLU halves gate / up) that MN-major column chunk cm
// of a tile starting at n0 reads, and whether it exists.
__device__ __forceinline__ int64_t mn_major_column(const GroupedGemmSm90Args& args, int64_t n0,
                                                   int cm, bool* ok) {
  const bool halves = glu_halves(args);
  const int64_t half = cm / kChunksPerRow;
  const int64_t j = (halves ? n0 : n0 + half * 64) + (cm % kChunksPerRow) * 8;
  *ok = j < (halves ? args.n / 2 : args.n);
  return (halves && half == 1 ? args.n / 2 : 0) + j;
}

// The columns one B tile stands for: 128 output columns, or 64 intermediate ones with SwiGLU
// halves (64 gate + 64 up).
__host__ __device__ __forceinline__ int64_t b_tile_columns(const GroupedGemmSm90Args& args) {
  return glu_halves(args) ? kGluHalf : kBN;
}

template <bool BMnMajor, int kLoaders, int kBTiles = 1>
__device__ __forceinline__ TileLoads<kLoaders, kBTiles> plan_tile_loads(
    const GroupedGemmSm90Args& args, const TileCoord& tile, int64_t n0, int loader) {
  using Loads = TileLoads<kLoaders, kBTiles>;
  Loads p;
  const int r0 = Loads::first_row(loader);
#pragma unroll
  for (int i = 0; i < Loads::kChunks; ++i) {
    p.a_row[i] =
        static_cast<int32_t>(a_source_row(args, tile.row0, tile.rows, r0 + i * Loads::kRowStep));
  }
  const bool halves = glu_halves(args);
  p.b_up_shift = !BMnMajor && halves ? static_cast<int32_t>(args.n / 2 - kGluHalf) : 0;
#pragma unroll
  for (int s = 0; s < kBTiles; ++s) {
    const int64_t n0_s = n0 + s * b_tile_columns(args);  // B tile s's first column
    p.b_ok[s] = 0;
    if constexpr (BMnMajor) {
      bool ok = false;
      p.b_index[s] =
          static_cast<int32_t>(mn_major_column(args, n0_s, Loads::mn_chunk(loader), &ok));
      p.b_ok[s] = ok ? 1u : 0u;
    } else {
      const int64_t inter = args.n / 2;
      p.b_index[s] = static_cast<int32_t>(n0_s + r0);
#pragma unroll
      for (int i = 0; i < Loads::kChunks; ++i) {
        const int r = r0 + i * Loads::kRowStep;
        const bool ok = halves ? n0_s + r % kGluHalf < inter : n0_s + r < args.n;
        p.b_ok[s] |= ok ? 1u << i : 0u;
      }
    }
  }
  return p;
}

// Loader thread `loader`'s (of kLoaders) copies of the A tile (rows of x as planned) of k block
// k0 into the stage at `stage`.
template <int kLoaders, int kBTiles>
__device__ __forceinline__ void load_a_tile(const GroupedGemmSm90Args& args,
                                            const TileLoads<kLoaders, kBTiles>& p,
                                            unsigned char* stage, int64_t k0, int loader) {
  using Loads = TileLoads<kLoaders, kBTiles>;
  const int64_t k = k0 + Loads::column(loader) * 8;
  const bool k_ok = k < args.k;  // k is a multiple of 8: a chunk is all in or all out
  unsigned char* const a_dst = stage + Loads::k_major_offset(loader);
#pragma unroll
  for (int i = 0; i < Loads::kChunks; ++i) {
    const bool ok = k_ok && p.a_row[i] >= 0;
    cp_async_16_zfill(a_dst + i * Loads::kKMajorStride,
                      ok ? args.x + int64_t{p.a_row[i]} * args.ldx + k : args.x, ok ? 16 : 0);
  }
}

// Loader thread `loader`'s (of kLoaders) copies of one stage at `stage`: the A tile and the
// kBTiles B tiles after it (W_e at w_e, K-major or MN-major: BMnMajor = args.w_mn_major), k
// block k0.
template <bool BMnMajor, int kLoaders, int kBTiles = 1>
__device__ __forceinline__ void load_stage(const GroupedGemmSm90Args& args,
                                           const TileLoads<kLoaders, kBTiles>& p,
                                           unsigned char* stage, const __nv_bfloat16* w_e,
                                           int64_t k0, int loader) {
  using Loads = TileLoads<kLoaders, kBTiles>;
  load_a_tile(args, p, stage, k0, loader);
  const int64_t k = k0 + Loads::column(loader) * 8;
  const bool k_ok = k < args.k;
#pragma unroll
  for (int s = 0; s < kBTiles; ++s) {
    if constexpr (!BMnMajor) {
      unsigned char* const b_dst = stage + (1 + s) * kTileBytes + Loads::k_major_offset(loader);
#pragma unroll
      for (int i = 0; i < Loads::kChunks; ++i) {
        const int64_t row = int64_t{p.b_index[s]} + i * Loads::kRowStep +
                            (i >= Loads::kChunks / 2 ? p.b_up_shift : 0);
        const bool ok = k_ok && ((p.b_ok[s] >> i) & 1u);
        cp_async_16_zfill(b_dst + i * Loads::kKMajorStride, ok ? w_e + row * args.ldw + k : args.w,
                          ok ? 16 : 0);
      }
    } else {
      unsigned char* const b_dst = stage + (1 + s) * kTileBytes + Loads::mn_major_offset(loader);
      const int64_t k_row = k0 + Loads::first_k_row(loader);
#pragma unroll
      for (int i = 0; i < Loads::kChunks; ++i) {
        const int64_t kb = k_row + i * Loads::kKStep;
        const bool ok = p.b_ok[s] != 0 && kb < args.k;
        cp_async_16_zfill(b_dst + i * Loads::kMnMajorStride,
                          ok ? w_e + kb * args.ldw + p.b_index[s] : args.w, ok ? 16 : 0);
      }
    }
  }
}

// The k16 steps of LoRA's rank-r product (r <= kSm90MaxLoraRank = one k block).
__device__ __forceinline__ int lora_k_steps(const GroupedGemmSm90Args& args) {
  return static_cast<int>((args.lora_rank + 15) / 16);
}

// Loader thread `loader`'s (of kLoaders) copies of LoRA's operands of a tile into `tiles` (a
// stage-sized region of their own): the tile's rows of u (in expert order, zero past the
// segment's tail) as a K-major A tile with k = the rank (zero from the rank to the last k16
// step's end), and M_e's rows as an MN-major B tile, columns as the weight's (n0.., or gate and
// up columns with SwiGLU), zero past the rank. Only the chunks the k16 steps read are copied.
template <int kLoaders>
__device__ __forceinline__ void load_lora(const GroupedGemmSm90Args& args, unsigned char* tiles,
                                          const TileCoord& tile, int64_t n0, int loader) {
  using Loads = TileLoads<kLoaders>;
  const int steps = lora_k_steps(args);
  const int c = Loads::column(loader), r0 = Loads::first_row(loader);
  if (c < 2 * steps) {
    const bool c_ok = c * 8 < args.lora_rank;
    unsigned char* const dst = tiles + Loads::k_major_offset(loader);
#pragma unroll
    for (int i = 0; i < Loads::kChunks; ++i) {
      const int r = r0 + i * Loads::kRowStep;
      const bool ok = c_ok && r < tile.rows;
      cp_async_16_zfill(dst + i * Loads::kKMajorStride,
                        ok ? args.lora_u + (tile.row0 + r) * args.ld_lora_u + c * 8 : args.lora_u,
                        ok ? 16 : 0);
    }
  }
  bool col_ok = false;
  const int64_t col = mn_major_column(args, n0, Loads::mn_chunk(loader), &col_ok);
  const __nv_bfloat16* m_e = args.lora_m + tile.expert * args.lora_m_stride_e;
  unsigned char* const dst = tiles + kTileBytes + Loads::mn_major_offset(loader);
#pragma unroll
  for (int i = 0; i < Loads::kChunks; ++i) {
    const int kr = Loads::first_k_row(loader) + i * Loads::kKStep;
    if (kr < 16 * steps) {
      const bool ok = col_ok && kr < args.lora_rank;
      cp_async_16_zfill(dst + i * Loads::kMnMajorStride,
                        ok ? m_e + kr * args.ld_lora_m + col : args.lora_m, ok ? 16 : 0);
    }
  }
}

// The tile schedule of a launch, the same in every thread once build_row_schedule has run.
struct RowSchedule {
  int64_t tile_cols;  // output columns of a tile (intermediate ones with SwiGLU halves)
  int64_t n_tiles;    // N tiles per M tile, each of kBTiles B tiles (b_tile_columns)
  int64_t num_tiles;  // M tiles x N tiles
  int64_t k_blocks;   // 64-deep k blocks per tile
};

// Builds the experts' row bounds m(0..E) (bound, clamped and non-decreasing) and the exclusive
// prefix of their M tiles (tile_start) in shared memory. Every thread of the block calls it; the
// caller's __syncthreads after it publishes tile_start before row_schedule reads it.
__device__ __forceinline__ void build_tile_prefix(const GroupedGemmSm90Args& args, int32_t* bound,
                                                  int32_t* tile_start, int32_t* warp_max) {
  const int64_t E = args.num_experts;
  build_expert_bounds(args.expert_offsets, E, args.num_rows, bound, warp_max);
  if (threadIdx.x == 0) {  // E <= 1024: one thread's prefix is short next to the GEMM
    tile_start[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
      tile_start[e + 1] =
          tile_start[e] + static_cast<int32_t>(m_tiles(bound[e + 1] - bound[e], kBM));
    }
  }
}

template <int kBTiles = 1>
__device__ __forceinline__ RowSchedule row_schedule(const GroupedGemmSm90Args& args,
                                                    const int32_t* tile_start) {
  RowSchedule s;
  const bool halves = glu_halves(args);
  s.tile_cols = kBTiles * b_tile_columns(args);
  s.n_tiles = ((halves ? args.n / 2 : args.n) + s.tile_cols - 1) / s.tile_cols;
  s.num_tiles = int64_t{tile_start[args.num_experts]} * s.n_tiles;
  s.k_blocks = (args.k + kBK - 1) / kBK;
  return s;
}

// Calls body(tile, n0) for each of this CTA's tiles of the schedule, in the order every role of
// the CTA walks them (blockIdx.x, + gridDim.x, ...); n0 is the tile's first output column (an
// intermediate column with SwiGLU halves).
template <typename Body>
__device__ __forceinline__ void for_each_tile(const GroupedGemmSm90Args& args,
                                              const RowSchedule& schedule, const int32_t* bound,
                                              const int32_t* tile_start, Body&& body) {
  for (int64_t t = blockIdx.x; t < schedule.num_tiles; t += gridDim.x) {
    const TileCoord tile =
        tile_coord<int32_t>(t, bound, tile_start, args.num_experts, schedule.n_tiles, kBM);
    body(tile, tile.n_tile * schedule.tile_cols);
  }
}

// The epilogue of one B tile's columns (n0..), run by the two warpgroups that hold its
// accumulators d (warpgroup `group` rows 64 group.., `warp` / `lane` the thread's place in it):
// the bias and LoRA's up-projection when given, then y (or h and a) stored. With LoRA,
// `lora_tiles` (a shared-window address) holds the tile's LoRA operands once lora.acquire()
// returns, and lora.release() is called after the MMAs that read them have retired. A kernel
// without LoRA's region instantiates it with kLoraRegion = false (its launcher never passes
// LoRA's operands; the MMAs on them are not compiled in).
template <bool kLoraRegion = true, typename LoraSync>
__device__ __forceinline__ void finish_tile(const GroupedGemmSm90Args& args, const TileCoord& tile,
                                            int64_t n0, float (&d)[kWgmmaAcc], uint32_t lora_tiles,
                                            int group, int warp, int lane, LoraSync&& lora_sync) {
  constexpr int kAcc = kWgmmaAcc;
  const bool glu = args.a != nullptr, halves = glu_halves(args);
  const bool lora = kLoraRegion && args.lora_u != nullptr, bias = args.bias != nullptr;
  if (bias || lora) {
    // grouped_mm's bias pass and lora_expand_add_'s rule on the tile, in that order: the GEMM's
    // result rounded as the plain kernel stores it, the bias added and rounded, then u M_e on
    // the tensor cores in the freed accumulators and the fma.
    __nv_bfloat162 base[kAcc / 2];
#pragma unroll
    for (int i = 0; i < kAcc; i += 2) {
      base[i / 2] = __floats2bfloat162_rn(d[i], d[i + 1]);
      // LoRA's MMAs add to +0; without them fma(0, -0, v) below is v, -0 included.
      d[i] = d[i + 1] = lora ? 0.0f : -0.0f;
    }
    if (bias) {
      const __nv_bfloat16* b_e = args.bias + tile.expert * args.bias_stride_e;
#pragma unroll
      for (int i = 0; i < kAcc; i += 2) {  // columns (col, col + 1): col even, same half
        const int64_t col = output_column(args, n0, accumulator_coord(warp, lane, i).col);
        if (col >= 0) {
          const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(b_e + col);
          base[i / 2] = __floats2bfloat162_rn(__low2float(base[i / 2]) + __low2float(b),
                                              __high2float(base[i / 2]) + __high2float(b));
        }
      }
    }
    if constexpr (kLoraRegion) {
      if (lora) {
        lora_sync.acquire();
        fence_accumulators(d);
        wgmma_fence();
        // (ptxas adds a warpgroup.arrive before each of these branchy MMAs: once per tile.)
#pragma unroll
        for (int j = 0; j < kBK / 16; ++j) {
          if (j < lora_k_steps(args)) {  // uniform over the block
            wgmma_m64n128k16<false, true>(
                d, operand_descriptor<false>(lora_tiles + group * (64 * 128), j),
                operand_descriptor<true>(lora_tiles + kTileBytes, j));
          }
        }
        wgmma_commit_group();
        wgmma_wait<0>();
        fence_accumulators(d);
        lora_sync.release();
      }
    }
#pragma unroll
    for (int i = 0; i < kAcc; i += 2) {
      const float scale = lora ? args.lora_scale : 0.0f;
      d[i] = __fmaf_rn(scale, d[i], __low2float(base[i / 2]));
      d[i + 1] = __fmaf_rn(scale, d[i + 1], __high2float(base[i / 2]));
    }
  }

  // Value pairs (i, i + 1) are columns (c, c + 1) of one row.
  if (!halves) {  // y (or gpt-oss's h and, from its interleaved pairs, a)
#pragma unroll
    for (int i = 0; i < kAcc; i += 2) {
      const FragCoord c = accumulator_coord(warp, lane, i);
      const int64_t r = 64 * group + c.row, col = n0 + c.col;
      if (r < tile.rows && col < args.n) {
        *reinterpret_cast<__nv_bfloat162*>(args.y + (tile.row0 + r) * args.ldy + col) =
            __floats2bfloat162_rn(d[i], d[i + 1]);
      }
    }
    if (glu) {
      // gpt-oss: gate column col, up column col + 1 (col even), as swiglu pairs them, from the
      // rounded h. Value pairs i and i + 2 are rows r and r + 8 of h's columns (col, col + 1),
      // a's column col / 2; lane q ^ 1 holds a's next (or previous) column. One shuffle gives
      // the even lane row r's two adjacent a values and the odd lane row r + 8's: one 4-byte
      // store each instead of two 2-byte ones. Every lane takes part (no branch around it).
      const bool odd = (lane & 1) != 0;
#pragma unroll
      for (int i = 0; i < kAcc; i += 4) {
        const auto glu_of = [&](int v) {
          const __nv_bfloat162 h = __floats2bfloat162_rn(d[v], d[v + 1]);
          return __float2bfloat16_rn(
              gpt_oss_glu(__low2float(h), __high2float(h), args.glu_alpha, args.glu_limit));
        };
        const __nv_bfloat16 top = glu_of(i), bottom = glu_of(i + 2);  // rows r, r + 8
        const __nv_bfloat16 other = __shfl_xor_sync(0xffffffffu, odd ? top : bottom, 1);
        const FragCoord c = accumulator_coord(warp, lane, odd ? i + 2 : i);
        const int64_t r = 64 * group + c.row;
        const int64_t col = n0 + c.col - (odd ? 2 : 0);  // the even lane's h column
        if (r < tile.rows && col < args.n) {             // col and col + 2 share an 8-column group
          *reinterpret_cast<__nv_bfloat162*>(args.a + (tile.row0 + r) * args.lda + col / 2) =
              odd ? __halves2bfloat162(other, bottom) : __halves2bfloat162(top, other);
        }
      }
    }
  } else {
    // Values i < kAcc / 2 are gate columns c < 64; value i + kAcc / 2 is up column c + 64, same
    // row, same thread. h is rounded first and a computed from the rounded h, as swiglu does.
    const int64_t inter = args.n / 2;
#pragma unroll
    for (int i = 0; i < kAcc / 2; i += 2) {
      const FragCoord c = accumulator_coord(warp, lane, i);
      const int64_t r = 64 * group + c.row, j = n0 + c.col;
      if (r < tile.rows && j < inter) {
        const __nv_bfloat162 gate = __floats2bfloat162_rn(d[i], d[i + 1]);
        const __nv_bfloat162 up = __floats2bfloat162_rn(d[i + kAcc / 2], d[i + kAcc / 2 + 1]);
        __nv_bfloat16* h_row = args.y + (tile.row0 + r) * args.ldy;
        *reinterpret_cast<__nv_bfloat162*>(h_row + j) = gate;
        *reinterpret_cast<__nv_bfloat162*>(h_row + inter + j) = up;
        const __nv_bfloat162 act =
            __floats2bfloat162_rn(silu_glu(__low2float(gate), __low2float(up)),
                                  silu_glu(__high2float(gate), __high2float(up)));
        *reinterpret_cast<__nv_bfloat162*>(args.a + (tile.row0 + r) * args.lda + j) = act;
      }
    }
  }
}

// ---- the warp-specialised kernel's launch (grouped_gemm_sm90_ws.cu) ----------------------------

// Raises its dynamic shared-memory limit (a per-device setting; run once per device).
cudaError_t raise_smem_limit_warp_specialized();

// The weight W [E, n, k] (K-major) or W^T [E, k, n] (MN-major) as the 4-dimensional tensor its
// TMA copies read, in 64 x 64 boxes that are the halves of a B tile (definition and layout:
// grouped_gemm_sm90_ws.cu; the TMA probe copies through the same description).
TmaTensor4d weight_tma_tensor(const GroupedGemmSm90Args& args);

// Launches it over `sms` persistent CTAs, on 128 x 256 tiles for kWarpSpecializedWide without
// LoRA, else on 128 x 128 tiles; the arguments are already validated. *launched is false (and
// nothing is launched) where the weight's layout is one a TMA tensor map cannot describe.
cudaError_t launch_warp_specialized(const GroupedGemmSm90Args& args, int sms, cudaStream_t stream,
                                    bool* launched);

}  // namespace moeforge::kernels::sm90
