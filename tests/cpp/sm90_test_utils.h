// Shared by the GoogleTest suites of the sm_90a kernels (test_grouped_gemm_sm90.cpp,
// test_grouped_wgrad_sm90.cpp): the skip for devices / builds without them, nonzero random bf16
// data, and the fixture that runs each case once per main-loop pipeline.
#pragma once

#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"

#define MOEFORGE_SKIP_WITHOUT_SM90()                                                       \
  do {                                                                                     \
    MOEFORGE_SKIP_WITHOUT_GPU();                                                           \
    bool supported = false;                                                                \
    MOEFORGE_ASSERT_CUDA(::moeforge::kernels::grouped_gemm_sm90_supported(&supported));    \
    if (!supported) GTEST_SKIP() << "needs a compute capability 9.0 GPU and sm_90a build"; \
  } while (0)

namespace moeforge::testing {

// count bf16 values, uniform in [-scale, scale], none zero.
inline std::vector<__nv_bfloat16> random_bf16(int64_t count, uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<__nv_bfloat16> v(count);
  for (auto& x : v) {
    do {
      x = __float2bfloat16(static_cast<float>(scale * dist(gen)));
    } while (__bfloat162float(x) == 0.0f);
  }
  return v;
}

// The pipeline every launch of a suite uses (set by Sm90PipelineTest for each case).
inline kernels::Sm90Pipeline g_pipeline = kernels::Sm90Pipeline::kSerial;

inline kernels::Sm90Pipeline other_pipeline(kernels::Sm90Pipeline p) {
  return p == kernels::Sm90Pipeline::kSerial ? kernels::Sm90Pipeline::kOverlapped
                                             : kernels::Sm90Pipeline::kSerial;
}

class Sm90PipelineTest : public ::testing::TestWithParam<kernels::Sm90Pipeline> {
 protected:
  void SetUp() override { g_pipeline = GetParam(); }
  void TearDown() override { g_pipeline = kernels::Sm90Pipeline::kSerial; }
};

inline std::string pipeline_name(const ::testing::TestParamInfo<kernels::Sm90Pipeline>& info) {
  switch (info.param) {
    case kernels::Sm90Pipeline::kSerial:
      return "Serial";
    case kernels::Sm90Pipeline::kOverlapped:
      return "Overlapped";
    case kernels::Sm90Pipeline::kWarpSpecialized:
      return "WarpSpecialized";
    case kernels::Sm90Pipeline::kWarpSpecializedWide:
      return "WarpSpecializedWide";
    default:
      return "Pipeline" + std::to_string(static_cast<int>(info.param));
  }
}

}  // namespace moeforge::testing

// Runs every TEST_P of `suite` (a Sm90PipelineTest) under each of the listed pipelines.
#define MOEFORGE_INSTANTIATE_FOR_PIPELINES(suite, ...)                       \
  INSTANTIATE_TEST_SUITE_P(Pipelines, suite, ::testing::Values(__VA_ARGS__), \
                           ::moeforge::testing::pipeline_name)
