// GoogleTest for moeforge/kernels/sm90_layout.h (host only, no GPU): the tile schedule against a
// brute-force enumeration, the 128-byte swizzle against the address-bit form of the same
// permutation, the wgmma accumulator map as a bijection that keeps SwiGLU's gate / up pairs in
// one thread, and the descriptor's bit fields. These check the formulas' consistency with our
// reading of the hardware (docs/hopper-gemm-plan.md); the GPU confirms the reading itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/sm90_layout.h"

namespace moeforge::testing {
namespace {

namespace sm90 = kernels::sm90;

std::vector<int32_t> tile_starts(const std::vector<int32_t>& bound, int64_t block_m) {
  std::vector<int32_t> start(bound.size(), 0);
  for (size_t e = 1; e < bound.size(); ++e) {
    start[e] = start[e - 1] + static_cast<int32_t>(sm90::m_tiles(bound[e] - bound[e - 1], block_m));
  }
  return start;
}

// Every tile of the schedule, in order, checked against the expert segments: the M tiles of
// each expert in order, N fastest, each routed row in exactly one M tile, no tile for an empty
// expert, only an expert's last tile partial.
void check_schedule(const std::vector<int32_t>& offsets, int64_t rows, int64_t block_m,
                    int64_t n_tiles, const std::string& what) {
  SCOPED_TRACE(what);
  const std::vector<int64_t> m = clamped_bounds(offsets, rows);
  const std::vector<int32_t> bound(m.begin(), m.end());
  const std::vector<int32_t> start = tile_starts(bound, block_m);
  const int64_t num_experts = static_cast<int64_t>(bound.size()) - 1;
  std::vector<sm90::TileCoord> want;  // brute force: expert by expert, row block by row block
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t r = bound[e]; r < bound[e + 1]; r += block_m) {
      for (int64_t nt = 0; nt < n_tiles; ++nt) {
        want.push_back({e, r, std::min<int64_t>(block_m, bound[e + 1] - r), nt});
      }
    }
  }
  ASSERT_EQ(static_cast<int64_t>(want.size()), int64_t{start[num_experts]} * n_tiles);
  std::vector<int> covered(static_cast<size_t>(bound[num_experts]), 0);
  for (size_t t = 0; t < want.size(); ++t) {
    const sm90::TileCoord got = sm90::tile_coord<int32_t>(
        static_cast<int64_t>(t), bound.data(), start.data(), num_experts, n_tiles, block_m);
    const sm90::TileCoord& w = want[t];
    ASSERT_TRUE(got.expert == w.expert && got.row0 == w.row0 && got.rows == w.rows &&
                got.n_tile == w.n_tile)
        << "tile " << t << ": got expert " << got.expert << " rows [" << got.row0 << ", +"
        << got.rows << ") n " << got.n_tile << ", want expert " << w.expert << " rows [" << w.row0
        << ", +" << w.rows << ") n " << w.n_tile;
    ASSERT_GT(got.rows, 0);
    if (got.n_tile == 0) {
      for (int64_t r = got.row0; r < got.row0 + got.rows; ++r) ++covered[r];
    }
  }
  EXPECT_TRUE(std::all_of(covered.begin(), covered.end(), [](int c) { return c == 1; }));
}

TEST(Sm90Layout, ScheduleCoversEveryRoutedRowOnce) {
  for (const int64_t num_experts : {1, 2, 7, 128, 257, 1023}) {
    const int64_t rows = 97 * num_experts + 300;
    for (const int64_t n_tiles : {1, 3, 6}) {
      const int64_t dropped = num_experts % 3 == 0 ? 17 : 0;  // sometimes rows of no expert
      check_schedule(random_offsets(num_experts, rows, 5u + num_experts, dropped), rows, 128,
                     n_tiles,
                     "E=" + std::to_string(num_experts) + " n_tiles=" + std::to_string(n_tiles));
    }
  }
}

TEST(Sm90Layout, ScheduleEdgeCases) {
  check_schedule({0, 0, 0, 0}, 50, 128, 2, "every expert empty");
  check_schedule({0, 0, 128, 128, 129}, 129, 128, 2, "exact tile, then a 1-row tail");
  check_schedule({0, 127, 255, 383}, 400, 128, 1, "tails of 127");
  check_schedule({7, 300, -5, 1000, 90}, 500, 64, 4, "corrupt offsets (read clamped)");
  check_schedule({0, 140000, 140001, 200000}, 200000, 128, 2, ">= 131072 rows");
}

// The swizzle as a function of the byte address in a 1024-byte atom: bits [4, 7) (the 16-byte
// chunk) XOR bits [7, 10) (the row within the atom).
uint32_t swizzle_address(uint32_t address) {
  return address ^ (((address >> 7) & 7u) << 4);
}

TEST(Sm90Layout, Sw128MatchesTheAddressBitFormAndIsAPermutation) {
  std::set<uint32_t> seen;
  for (uint32_t row = 0; row < 64; ++row) {
    for (uint32_t chunk = 0; chunk < 8; ++chunk) {
      const uint32_t offset = sm90::sw128_offset(row, chunk);
      EXPECT_EQ(offset, swizzle_address(row * 128 + chunk * 16)) << row << " " << chunk;
      EXPECT_EQ(offset / 128, row);  // stays in its row
      seen.insert(offset);
    }
  }
  EXPECT_EQ(seen.size(), 64u * 8u);
  // A column of chunks (same chunk, eight consecutive rows) covers all eight 16-byte slots.
  for (uint32_t chunk = 0; chunk < 8; ++chunk) {
    std::set<uint32_t> slots;
    for (uint32_t row = 0; row < 8; ++row)
      slots.insert((sm90::sw128_offset(row, chunk) % 128) / 16);
    EXPECT_EQ(slots.size(), 8u) << "chunk " << chunk;
  }
}

TEST(Sm90Layout, Sw128MnMajorTileIsTwoSwizzledBlocks) {
  // A 64-deep k block of an MN-major 128-column tile: chunk c of k row r holds columns 8c..8c+7;
  // chunks 0-7 fill the first 64-column block, 8-15 the second, block_bytes later, each block the
  // K-major swizzled layout with k rows in place of rows. Every 16-byte slot of the two blocks
  // is used once, and a 128-column row of MN values spans both blocks in their own row.
  constexpr uint32_t kBlock = 64 * 128;
  std::set<uint32_t> seen;
  for (uint32_t row = 0; row < 64; ++row) {
    for (uint32_t chunk = 0; chunk < 16; ++chunk) {
      const uint32_t offset = sm90::sw128_mn_offset(row, chunk, kBlock);
      EXPECT_EQ(offset / kBlock, chunk / 8) << row << " " << chunk;
      EXPECT_EQ(offset % kBlock, sm90::sw128_offset(row, chunk % 8)) << row << " " << chunk;
      EXPECT_EQ((offset % kBlock) / 128, row);
      EXPECT_EQ(offset % 16, 0u);
      seen.insert(offset);
    }
  }
  EXPECT_EQ(seen.size(), 64u * 16u);
  EXPECT_EQ(*seen.rbegin(), 2 * kBlock - 16);
}

TEST(Sm90Layout, AccumulatorMapIsABijectionOntoTheTile) {
  for (const int n : {8, 16, 128, 256}) {
    std::set<std::pair<int, int>> seen;
    for (int warp = 0; warp < 4; ++warp) {
      for (int lane = 0; lane < 32; ++lane) {
        for (int i = 0; i < n / 2; ++i) {
          const sm90::FragCoord c = sm90::accumulator_coord(warp, lane, i);
          ASSERT_TRUE(c.row >= 16 * warp && c.row < 16 * warp + 16 && c.col >= 0 && c.col < n);
          seen.insert({c.row, c.col});
        }
      }
    }
    EXPECT_EQ(seen.size(), static_cast<size_t>(64 * n)) << "n=" << n;
  }
}

TEST(Sm90Layout, GateAndUpHalvesStayInOneThread) {
  // HF layout, gate and up tiles side by side in n = 256: value i + 64 is column + 128, same row.
  // gpt-oss, interleaved (gate 2j, up 2j + 1): values i and i + 1 (i even) are columns c, c + 1.
  for (int warp = 0; warp < 4; ++warp) {
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 64; ++i) {
        const sm90::FragCoord gate = sm90::accumulator_coord(warp, lane, i);
        const sm90::FragCoord up = sm90::accumulator_coord(warp, lane, i + 64);
        EXPECT_EQ(up.row, gate.row);
        EXPECT_EQ(up.col, gate.col + 128);
        if (i % 2 == 0) {
          const sm90::FragCoord next = sm90::accumulator_coord(warp, lane, i + 1);
          EXPECT_EQ(next.row, gate.row);
          EXPECT_EQ(next.col, gate.col + 1);
          EXPECT_EQ(gate.col % 2, 0);
        }
      }
    }
  }
}

TEST(Sm90Layout, DescriptorFields) {
  const uint32_t address = 0x1A400;  // 1024-byte aligned, within 228 KB
  const uint64_t d = sm90::gmma_descriptor(address, 16, 1024, sm90::GmmaLayout::kSwizzle128B);
  EXPECT_EQ(d & 0x3FFFu, address >> 4);
  EXPECT_EQ((d >> 16) & 0x3FFFu, 1u);
  EXPECT_EQ((d >> 32) & 0x3FFFu, 64u);
  EXPECT_EQ((d >> 49) & 0x7u, 0u);  // base offset
  EXPECT_EQ(d >> 62, 1u);
  // No field spills into another: the bits outside the four fields are zero.
  const uint64_t fields = 0x3FFFull | (0x3FFFull << 16) | (0x3FFFull << 32) | (3ull << 62);
  const uint64_t all =
      sm90::gmma_descriptor(0xFFFFFu, 0xFFFFFu, 0xFFFFFu, sm90::GmmaLayout::kSwizzle32B);
  EXPECT_EQ(all & ~fields, 0u);
  EXPECT_EQ(all, fields);
  // One k16 step of a K-major bf16 operand (32 bytes) moves the start field by 2.
  const uint64_t next =
      sm90::gmma_descriptor(address + 32, 16, 1024, sm90::GmmaLayout::kSwizzle128B);
  EXPECT_EQ(next - d, 2u);
  // MN-major: leading offset = the 64-column block distance (8 KB), one k16 step = 2048 bytes.
  const uint64_t mn = sm90::gmma_descriptor(address, 8192, 1024, sm90::GmmaLayout::kSwizzle128B);
  EXPECT_EQ((mn >> 16) & 0x3FFFu, 512u);
  EXPECT_EQ(sm90::gmma_descriptor(address + 2048, 8192, 1024, sm90::GmmaLayout::kSwizzle128B) - mn,
            128u);
}

}  // namespace
}  // namespace moeforge::testing
