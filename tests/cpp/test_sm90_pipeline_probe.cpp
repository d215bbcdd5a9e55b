// GoogleTest for the sm90 pipeline probe (moeforge/kernels/sm90_pipeline_probe.h): the
// warp-specialised GEMM's stage hand-over - mbarrier init / arrive / parity waits,
// cp.async.mbarrier.arrive.noinc, setmaxnreg - as a copy, before any GEMM layout comes into it.
// Run it first when the warp-specialised pipeline fails on a GPU: if this passes, the primitives
// behave as kernels/sm90/mbarrier.cuh reads the PTX ISA. Skips without an sm_90 GPU and build;
// the host kernel emulator runs it (mbarriers modelled).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
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
