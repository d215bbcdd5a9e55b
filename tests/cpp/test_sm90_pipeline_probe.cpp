// GoogleTest for the sm90 pipeline probe (moeforge/kernels/sm90_pipeline_probe.h): the
// warp-specialised GEMM's stage hand-over - mbarrier init / arrive / parity waits,
// cp.async.mbarrier.arrive.noinc, setmaxnreg - as a copy, before any GEMM layout comes into it.
// Run it first when the warp-specialised pipeline fails on a GPU: if this passes, the primitives
// behave as kernels/sm90/mbarrier.cuh reads the PTX ISA. Sm90TmaProbe does the same for one TMA
// copy (kernels/sm90/tma.cuh): the driver's encoding, the 128-byte swizzle, the zero fill and the
// expect_tx byte count as the warp-specialised GEMM's weight loads assume them. Skips without an
// sm_90 GPU and build; the host kernel emulator runs it (mbarriers and TMA modelled).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/sm90_pipeline_probe.h"
#include "sm90_test_utils.h"

namespace moeforge::testing {
namespace {

// out = in + 1 word by word through `stages` stages, `rounds` rounds over `blocks` blocks; out
// starts as 0xFF bytes, so a round no consumer wrote, or wrote from an unlanded stage (the
// emulator's 0xFF), shows.
void check_probe(int64_t rounds, int stages, int blocks) {
  SCOPED_TRACE("rounds " + std::to_string(rounds) + ", stages " + std::to_string(stages) +
               ", blocks " + std::to_string(blocks));
  const int64_t words = rounds * kernels::kSm90ProbeWordsPerRound;
  std::vector<uint32_t> in(words);
  for (int64_t i = 0; i < words; ++i) in[i] = static_cast<uint32_t>(i * 2654435761u + 7u);
  DeviceBuffer<uint32_t> d_in(in), d_out(words);
  d_out.poison(0xFF);
  ASSERT_EQ(kernels::launch_sm90_pipeline_probe(d_in.data(), d_out.data(), rounds, stages, blocks,
                                                nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint32_t> out = d_out.download();
  int bad = 0;
  for (int64_t i = 0; i < words && bad < 8; ++i) {
    if (out[i] != in[i] + 1) {
      ADD_FAILURE() << "word " << i << " (round " << i / kernels::kSm90ProbeWordsPerRound
                    << "): got " << out[i] << ", want " << in[i] + 1;
      ++bad;
    }
  }
}

TEST(Sm90PipelineProbe, OneRound) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_probe(1, 2, 1);
}

TEST(Sm90PipelineProbe, PhasesWrapManyTimes) {
  // 40 rounds through 1, 2, 3 and 5 stages in one block: every barrier's phase flips 8-40 times.
  MOEFORGE_SKIP_WITHOUT_SM90();
  for (int stages : {1, 2, 3, 5}) check_probe(40, stages, 1);
}

TEST(Sm90PipelineProbe, ManyBlocks) {
  // More blocks than rounds (idle blocks exit at once), and uneven rounds per block.
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_probe(3, 4, 8);
  check_probe(61, kernels::kSm90ProbeMaxStages, 7);
}

// One 64 x 64 box of a [rows, cols] matrix (row stride ld) at (row0, col0) through the TMA probe:
// box row r's value c must sit at byte 128 r + 16 ((c / 8) ^ (r % 8)) + 2 (c % 8), and be zero
// where the box leaves the matrix. The output starts as 0xFF bytes.
void check_tma_box(int64_t rows, int64_t cols, int64_t ld, int32_t row0, int32_t col0) {
  SCOPED_TRACE("box at row " + std::to_string(row0) + ", column " + std::to_string(col0) + " of " +
               std::to_string(rows) + " x " + std::to_string(cols));
  std::vector<__nv_bfloat16> src(rows * ld);
  for (int64_t i = 0; i < rows * ld; ++i) {  // distinct, never zero
    src[i] = __float2bfloat16(static_cast<float>(1 + i % 251) * (i % 2 ? 1.0f : -1.0f));
  }
  DeviceBuffer<__nv_bfloat16> d_src(src);
  DeviceBuffer<unsigned char> d_out(kernels::kSm90TmaProbeBytes);
  d_out.poison(0xFF);
  ASSERT_EQ(kernels::launch_sm90_tma_probe(d_src.data(), rows, cols, ld, row0, col0, d_out.data(),
                                           nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<unsigned char> out = d_out.download();
  int bad = 0;
  for (int r = 0; r < 64; ++r) {
    for (int c = 0; c < 64; ++c) {
      const int64_t gr = int64_t{row0} + r, gc = int64_t{col0} + c;
      uint16_t want = 0, got = 0;
      if (gr >= 0 && gr < rows && gc >= 0 && gc < cols) std::memcpy(&want, &src[gr * ld + gc], 2);
      std::memcpy(&got, &out[128 * r + 16 * ((c / 8) ^ (r % 8)) + 2 * (c % 8)], 2);
      if (got != want && bad++ < 8) {
        ADD_FAILURE() << "box row " << r << ", column " << c << ": got bits " << got << ", want "
                      << want << (want == 0 ? " (outside the matrix: zero)" : "");
      }
    }
  }
}

TEST(Sm90TmaProbe, BoxInside) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_tma_box(200, 160, 168, 70, 32);
}

TEST(Sm90TmaProbe, BoxAcrossTheEdgesReadsZeros) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_tma_box(200, 160, 168, 170, 128);  // 30 rows and 32 columns inside
  check_tma_box(200, 160, 168, -10, -8);   // negative coordinates
}

TEST(Sm90TmaProbe, BoxWhollyOutsideReadsZerosAndLands) {
  // Such boxes occur in the GEMM (a B tile past n): their bytes must still complete the barrier.
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_tma_box(200, 160, 168, 0, 192);
  check_tma_box(50, 64, 64, 64, 0);
}

TEST(Sm90TmaProbe, RejectsLayoutsATensorMapCannotDescribe) {
  alignas(16) static unsigned char out[16];
  alignas(16) static __nv_bfloat16 src[64];
  EXPECT_EQ(kernels::launch_sm90_tma_probe(src, 4, 12, 12, 0, 0, out, nullptr),
            cudaErrorInvalidValue);  // a 24-byte row stride is not a multiple of 16
  EXPECT_EQ(kernels::launch_sm90_tma_probe(src, 4, 16, 8, 0, 0, out, nullptr),
            cudaErrorInvalidValue);  // ld < cols
  EXPECT_EQ(kernels::launch_sm90_tma_probe(src + 1, 4, 16, 16, 0, 0, out, nullptr),
            cudaErrorInvalidValue);  // base not 16-byte aligned
}

TEST(Sm90PipelineProbe, RejectsBadArguments) {
  // Checked before anything is read or launched (runs without a GPU: the pointers are never
  // dereferenced).
  alignas(16) static uint32_t words[8];
  const auto launch = [&](int64_t rounds, int stages, int blocks, const uint32_t* in) {
    return kernels::launch_sm90_pipeline_probe(in, words, rounds, stages, blocks, nullptr);
  };
  EXPECT_EQ(launch(-1, 2, 1, words), cudaErrorInvalidValue);
  EXPECT_EQ(launch(1, 0, 1, words), cudaErrorInvalidValue);
  EXPECT_EQ(launch(1, kernels::kSm90ProbeMaxStages + 1, 1, words), cudaErrorInvalidValue);
  EXPECT_EQ(launch(1, 2, 0, words), cudaErrorInvalidValue);
  EXPECT_EQ(launch(1, 2, 1, words + 1), cudaErrorInvalidValue);  // 4-byte aligned only
}

}  // namespace
}  // namespace moeforge::testing
