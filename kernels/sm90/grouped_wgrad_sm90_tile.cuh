// What the two K-grouped weight-gradient kernels share (contract: moeforge/kernels/
// grouped_gemm_sm90.h, GroupedWgradSm90Args): grouped_wgrad_sm90.cu (every thread loads and
// multiplies; the serial and overlapped pipelines) and grouped_wgrad_sm90_ws.cu (a producer
// warpgroup loads, two consumer warpgroups multiply: ws_pipeline.cuh).
// - the schedule: tiles (e, p tile, q tile) of 128 x 128 values of G_e, q fastest; a tile's k
//   loop covers its expert's rows, 64 at a time (none for an empty expert: its tile is zeros);
// - the operand loads of one stage: 64 consecutive routed rows of the expert, each a 128-value
//   run of A's columns (p0..) and of B's (q0..), stored MN-major (sm90_layout.h sw128_mn_offset)
//   for wgmma's two transpose immediates; rows past the expert's end and columns past p / q are
//   zero-filled, and the operand read through the routing plan resolves each row's token;
// - the store of a tile's accumulators.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../async_copy.cuh"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "moeforge/kernels/sm90_layout.h"
#include "wgmma.cuh"

namespace moeforge::kernels::sm90 {

inline constexpr int kWgradChunksPerKRow = kTileMn * 2 / 16;  // 16 per 128-value operand row

// The row of an operand that routed row r reads: r itself, or through the plan the token of
// pair sorted_pairs[r] (-1: a corrupt pair, read as a zero row).
__device__ __forceinline__ int64_t wgrad_source_row(const GroupedWgradSm90Args& args, bool gathered,
                                                    int64_t r) {
  if (!gathered) return r;
  const int32_t pair = args.sorted_pairs[r];  // < num_tokens * top_k <= INT32_MAX
  return pair >= 0 && pair < args.num_tokens * args.top_k
             ? static_cast<int64_t>(pair / static_cast<int32_t>(args.top_k))
             : -1;
}

// Loader thread `loader`'s (of kLoaders) copies of one stage at `stage`: k rows row0 + kr (kr <
// 64) of the expert (valid below row_end), columns p0.. of a into the A tile and q0.. of b into
// the B tile after it.
template <int kLoaders>
__device__ __forceinline__ void load_wgrad_stage(const GroupedWgradSm90Args& args,
                                                 unsigned char* stage, int64_t row0,
                                                 int64_t row_end, int64_t p0, int64_t q0,
                                                 int loader) {
  constexpr int kChunks = kBK * kWgradChunksPerKRow / kLoaders;
  static_assert(kChunks * kLoaders == kBK * kWgradChunksPerKRow, "chunks tile evenly");
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int id = loader + i * kLoaders;
    const int kr = id / kWgradChunksPerKRow, chunk = id % kWgradChunksPerKRow;
    const int64_t r = row0 + kr;
    const uint32_t offset =
        sw128_mn_offset(static_cast<uint32_t>(kr), static_cast<uint32_t>(chunk), kMnBlockBytes);
    const int64_t ra = r < row_end ? wgrad_source_row(args, args.gather_a, r) : -1;
    const int64_t rb = r < row_end ? wgrad_source_row(args, args.gather_b, r) : -1;
    const int64_t pa = p0 + chunk * 8, qb = q0 + chunk * 8;
    const int a_bytes =
        ra >= 0 && pa < args.p ? static_cast<int>(std::min<int64_t>(8, args.p - pa)) * 2 : 0;
    const int b_bytes =
        rb >= 0 && qb < args.q ? static_cast<int>(std::min<int64_t>(8, args.q - qb)) * 2 : 0;
    cp_async_16_zfill(stage + offset, a_bytes > 0 ? args.a + ra * args.lda + pa : args.a, a_bytes);
    cp_async_16_zfill(stage + kTileBytes + offset,
                      b_bytes > 0 ? args.b + rb * args.ldb + qb : args.b, b_bytes);
  }
}

// The tiles of a launch: E x p tiles x q tiles, q fastest.
struct WgradSchedule {
  int64_t p_tiles, q_tiles, num_tiles;
};

__device__ __forceinline__ WgradSchedule wgrad_schedule(const GroupedWgradSm90Args& args) {
  WgradSchedule s;
  s.p_tiles = (args.p + kTileMn - 1) / kTileMn;
  s.q_tiles = (args.q + kTileMn - 1) / kTileMn;
  s.num_tiles = args.num_experts * s.p_tiles * s.q_tiles;
  return s;
}

// Tile t: expert e, rows p0.. and columns q0.. of G_e, and the expert's rows [row_begin, row_end)
// (bound: m(0..E)) in k blocks of 64.
struct WgradTile {
  int64_t e, p0, q0, row_begin, row_end, k_blocks;
};

__device__ __forceinline__ WgradTile wgrad_tile(const WgradSchedule& s, const int32_t* bound,
                                                int64_t t) {
  WgradTile tile;
  tile.e = t / (s.p_tiles * s.q_tiles);
  const int64_t pq = t % (s.p_tiles * s.q_tiles);
  tile.p0 = (pq / s.q_tiles) * kTileMn;
  tile.q0 = (pq % s.q_tiles) * kTileMn;
  tile.row_begin = bound[tile.e];
  tile.row_end = bound[tile.e + 1];
  tile.k_blocks = (tile.row_end - tile.row_begin + kBK - 1) / kBK;
  return tile;
}

// Stores warpgroup `group`'s rows (p0 + 64 group..) of a tile's accumulators into G_e.
__device__ __forceinline__ void store_wgrad_tile(const GroupedWgradSm90Args& args,
                                                 const WgradTile& tile, const float (&d)[kWgmmaAcc],
                                                 int group, int warp, int lane) {
  __nv_bfloat16* g_e = args.g + tile.e * args.g_stride_e;
#pragma unroll
  for (int i = 0; i < kWgmmaAcc; i += 2) {  // value pairs (i, i + 1): columns (c, c + 1), one row
    const FragCoord c = accumulator_coord(warp, lane, i);
    const int64_t row = tile.p0 + 64 * group + c.row, col = tile.q0 + c.col;
    if (row < args.p && col < args.q) {
      *reinterpret_cast<__nv_bfloat162*>(g_e + row * args.ldg + col) =
          __floats2bfloat162_rn(d[i], d[i + 1]);
    }
  }
}

// ---- the warp-specialised kernel's launch (grouped_wgrad_sm90_ws.cu) ---------------------------

// Raises its dynamic shared-memory limit (a per-device setting; run once per device).
cudaError_t raise_smem_limit_wgrad_warp_specialized();

// Launches it over `sms` persistent CTAs; the arguments are already validated.
cudaError_t launch_wgrad_warp_specialized(const GroupedWgradSm90Args& args, int sms,
                                          cudaStream_t stream);

}  // namespace moeforge::kernels::sm90
