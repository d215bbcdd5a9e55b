// Layout and scheduling arithmetic for the planned sm_90a grouped GEMM (docs/hopper-gemm-plan.md,
// stage S0): pure host / device functions, so that the CPU tests (tests/cpp/test_sm90_layout.cpp)
// check them before any GPU runs a kernel built on them. No kernel uses them yet.
//
//   tile schedule  M tiles of block_m rows over unpadded expert segments (the bounds m(0..E) of
//                  expert_bounds.cuh), N tiles fastest; the tail tile of an expert is partial
//   sw128_offset   where 16-byte chunk c of row r of a K-major tile with 128-byte rows lives
//                  under the 128-byte swizzle (TMA's SWIZZLE_128B, wgmma's B128 layout);
//                  sw128_mn_offset the same for an MN-major tile of 64-value blocks
//   accumulator    which (row, column) of an m64nNk16 fp32 wgmma result a thread's value i is
//   gmma_descriptor  the 64-bit shared-memory matrix descriptor wgmma reads its operands through
//
// The swizzle, fragment and descriptor formulas are our reading of the PTX ISA and of public code
// (the plan cites it); the tests check them for internal consistency, and only a GPU run of the
// kernel can confirm that the hardware agrees.
#pragma once

#include <cstdint>

#include "moeforge/kernels/host_device.h"

namespace moeforge::kernels::sm90 {

// ---- tile schedule --------------------------------------------------------------------------

// M tiles of an expert with `rows` rows (0 for an empty expert).
MOEFORGE_HOST_DEVICE int64_t m_tiles(int64_t rows, int64_t block_m) {
  return rows > 0 ? (rows + block_m - 1) / block_m : 0;
}

// One tile of the schedule: rows [row0, row0 + rows) of `expert` (rows <= block_m; fewer in the
// expert's last tile) and columns [n_tile * block_n, ...).
struct TileCoord {
  int64_t expert;
  int64_t row0;
  int64_t rows;
  int64_t n_tile;
};

// Tile t of the schedule, for t in [0, tile_start[E] * n_tiles). bound: m(0..E), non-decreasing
// with m(0) = 0 (expert_bounds.cuh); tile_start: [E + 1], tile_start[e] = sum of m_tiles over
// experts < e. N is fastest (t = mt * n_tiles + nt): the N tiles of one M tile run on neighbouring
// CTAs at once, so the rows they gather come from HBM about once. Empty experts own no tile: the
// expert of M tile mt is the largest e with tile_start[e] <= mt.
template <typename index_t>
MOEFORGE_HOST_DEVICE TileCoord tile_coord(int64_t t, const index_t* bound,
                                          const index_t* tile_start, int64_t num_experts,
                                          int64_t n_tiles, int64_t block_m) {
  const int64_t mt = t / n_tiles;
  int64_t lo = 0, hi = num_experts;  // tile_start[lo] <= mt < tile_start[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(tile_start[mid]) <= mt) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t row0 = static_cast<int64_t>(bound[lo]) + (mt - tile_start[lo]) * block_m;
  const int64_t end = static_cast<int64_t>(bound[lo + 1]);
  return {lo, row0, end - row0 < block_m ? end - row0 : block_m, t % n_tiles};
}

// ---- 128-byte swizzle -----------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a K-major tile of 128-byte rows
// (64 bf16), 1024-byte aligned: the chunk index XOR the row's low three bits, so that the eight
// rows of an 8 x 128-byte atom spread each column of chunks over all eight 16-byte bank groups.
MOEFORGE_HOST_DEVICE uint32_t sw128_offset(uint32_t row, uint32_t chunk) {
  return row * 128u + ((chunk ^ (row & 7u)) << 4);
}

// The same for an MN-major tile (k rows of MN values): chunk c (0..15) of k row `row` holds MN
// values 8c .. 8c + 7 of a 128-wide tile, stored as two blocks of 64 (one 128-byte row per k, 8 k
// rows per swizzle atom), the second `block_bytes` after the first (wgmma's leading byte offset).
MOEFORGE_HOST_DEVICE uint32_t sw128_mn_offset(uint32_t row, uint32_t chunk, uint32_t block_bytes) {
  return (chunk / 8u) * block_bytes + sw128_offset(row, chunk % 8u);
}

// ---- wgmma accumulators ---------------------------------------------------------------------

struct FragCoord {
  int row;
  int col;
};

// The (row, column) of value i (0 <= i < N / 2) that lane `lane` of warp `warp` (0..3 within its
// warpgroup) holds of an m64nNk16 fp32 result: each warp owns 16 rows; values come in fours per
// 8 columns — (row, col), (row, col + 1), (row + 8, col), (row + 8, col + 1) with row = 16 warp +
// lane / 4 and col = 8 (i / 4) + 2 (lane % 4).
MOEFORGE_HOST_DEVICE FragCoord accumulator_coord(int warp, int lane, int i) {
  return {16 * warp + lane / 4 + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (lane % 4) + (i & 1)};
}

// ---- shared-memory matrix descriptor ---------------------------------------------------------

// Layout types of the descriptor's top two bits.
enum class GmmaLayout : uint32_t {
  kInterleave = 0,
  kSwizzle128B = 1,
  kSwizzle64B = 2,
  kSwizzle32B = 3
};

// wgmma's 64-bit shared-memory descriptor: start address, leading and stride byte offsets (each
// in 16-byte units, 14 bits), base offset 0 (operand tiles 1024-byte aligned), layout type in
// bits 62-63. For a K-major bf16 operand under the 128-byte swizzle: stride offset 1024 bytes
// (one 8-row atom), leading offset unused, and each k16 step advances the start by 32 bytes. For
// an MN-major one (sw128_mn_offset): stride offset 1024 bytes (8 k rows), leading offset the
// distance between 64-value MN blocks, and each k16 step advances the start by 2048 bytes.
MOEFORGE_HOST_DEVICE uint64_t gmma_descriptor(uint32_t smem_address, uint32_t leading_byte_offset,
                                              uint32_t stride_byte_offset, GmmaLayout layout) {
  const uint64_t start = (smem_address >> 4) & 0x3FFFu;
  const uint64_t leading = (leading_byte_offset >> 4) & 0x3FFFu;
  const uint64_t stride = (stride_byte_offset >> 4) & 0x3FFFu;
  return start | (leading << 16) | (stride << 32) | (uint64_t{static_cast<uint32_t>(layout)} << 62);
}

}  // namespace moeforge::kernels::sm90
