// GoogleTest for kernels/zero_rows.cu, the epilogues and offsets of the at::_grouped_mm engine
// (csrc/cuda/grouped_mm.cpp), on cudaMalloc'd buffers against host references:
//   * launch_expert_row_ends: ends[e] = min(rows, max(0, offsets[1..e+1])), exactly, for valid
//     and corrupt offsets, up to kExpertRowEndsMaxExperts experts;
//   * launch_zero_rows_from: rows from the device-read start are zero, the others (and the
//     padding columns) keep their bytes;
//   * launch_add_grouped_bias: each expert's rows get bias[e] added with one rounding into T, rows
//     of no expert become zero; with corrupt ends every row still gets one of those two outcomes
//     (the owner the kernel's binary search over the clamped ends finds, transcribed here);
//   * launch_zero_empty_groups: the blocks of experts without rows become zero, the others keep
//     their bytes.
// Outputs start as random non-zero values (or 0xFF bytes for ends), so that a missing or stray
// write shows; argument errors return cudaErrorInvalidValue. Every launching case skips without a
// GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/zero_rows.h"

namespace moeforge::testing {
namespace {

using kernels::acc_type_t;
using kernels::from_acc;
using kernels::to_acc;

template <typename T>
std::vector<T> random_nonzero(int64_t count, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-2.0, 2.0);
  std::vector<T> v(count);
  for (auto& x : v) {
    do {
      x = from_acc<T>(static_cast<acc_type_t<T>>(dist(gen)));
    } while (to_acc(x) == 0);
  }
  return v;
}

template <typename T>
bool same_bytes(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// ends[e] = min(rows, max(0, offsets[1], ..., offsets[e + 1])) = m(e + 1).
std::vector<int32_t> expected_ends(const std::vector<int32_t>& offsets, int64_t rows) {
  const std::vector<int64_t> m = clamped_bounds(offsets, rows);
  return std::vector<int32_t>(m.begin() + 1, m.end());
}

void check_row_ends(const std::vector<int32_t>& offsets, int64_t rows, const std::string& what) {
  SCOPED_TRACE(what);
  const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
  DeviceBuffer<int32_t> d_offsets(offsets), d_ends(num_experts);
  d_ends.poison(0xFF);  // -1: an unwritten entry shows
  MOEFORGE_ASSERT_CUDA(
      kernels::launch_expert_row_ends(d_offsets.data(), num_experts, rows, d_ends.data(), nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(d_ends.download(), expected_ends(offsets, rows));
}

TEST(ExpertRowEnds, ValidOffsetsPassThrough) {
  MOEFORGE_SKIP_WITHOUT_GPU();
  for (const int64_t num_experts : {1, 2, 31, 32, 33, 128, 255, 257, 1023, 1024}) {
    const int64_t rows = 37 * num_experts + 5;
    const std::vector<int32_t> offsets = random_offsets(num_experts, rows, 7u + num_experts);
    check_row_ends(offsets, rows, "E=" + std::to_string(num_experts));
    EXPECT_EQ(expected_ends(offsets, rows),
              std::vector<int32_t>(offsets.begin() + 1, offsets.end()));
  }
}

TEST(ExpertRowEnds, CorruptOffsetsAreClampedAndMadeNonDecreasing) {
  MOEFORGE_SKIP_WITHOUT_GPU();
  check_row_ends({5, -3, 10, 4, 50, 200, 7, INT32_MAX, -1}, 100, "mixed");
  check_row_ends({0, 100, 90, 80}, 100, "decreasing");
  check_row_ends({0, -5, -5}, 10, "all negative");
  check_row_ends({0, 0, 0}, 0, "no rows");
  std::mt19937 gen(11);
  std::uniform_int_distribution<int32_t> any(-2000, 3000);
  std::vector<int32_t> offsets(1001);
  for (auto& o : offsets) o = any(gen);
  check_row_ends(offsets, 2500, "1000 random experts");
}

// Never dereferenced: every call below fails its argument check first (or has nothing to
// write), so the argument tests run without a GPU.
template <typename T>
T* fake_pointer() {
  return reinterpret_cast<T*>(uintptr_t{256});
}

TEST(ExpertRowEnds, RejectsBadArguments) {
  const int32_t* offsets = fake_pointer<const int32_t>();
  int32_t* ends = fake_pointer<int32_t>();
  constexpr auto kMax = kernels::kExpertRowEndsMaxExperts;
  const auto call = [&](const int32_t* o, int64_t e, int64_t rows, int32_t* out) {
    return kernels::launch_expert_row_ends(o, e, rows, out, nullptr);
  };
  EXPECT_EQ(call(offsets, kMax + 1, 10, ends), cudaErrorInvalidValue);
  EXPECT_EQ(call(offsets, -1, 10, ends), cudaErrorInvalidValue);
  EXPECT_EQ(call(offsets, 4, -1, ends), cudaErrorInvalidValue);
  EXPECT_EQ(call(offsets, 4, int64_t{INT32_MAX} + 1, ends), cudaErrorInvalidValue);
  EXPECT_EQ(call(nullptr, 4, 10, ends), cudaErrorInvalidValue);
  EXPECT_EQ(call(offsets, 4, 10, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(call(nullptr, 0, 10, nullptr), cudaSuccess);  // nothing to write
}

template <typename T>
class ZeroRowsTest : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(ZeroRowsTest, ElementTypes);

TYPED_TEST(ZeroRowsTest, ZeroRowsFromDeviceStart) {
  using T = TypeParam;
  MOEFORGE_SKIP_WITHOUT_GPU();
  const int64_t rows = 300, cols = 19, ldy = 24;
  for (const int32_t start : {0, 1, 137, 299, 300, 5000, -4}) {
    SCOPED_TRACE("start " + std::to_string(start));
    const std::vector<T> y0 = random_nonzero<T>(rows * ldy, 3u + start);
    DeviceBuffer<T> y(y0);
    DeviceBuffer<int32_t> d_start(std::vector<int32_t>{start});
    MOEFORGE_ASSERT_CUDA(
        kernels::launch_zero_rows_from<T>(y.data(), ldy, rows, cols, d_start.data(), nullptr));
    MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
    const std::vector<T> got = y.download();
    const int64_t first = std::clamp<int64_t>(start, 0, rows);
    int bad = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < ldy; ++j) {
        const T g = got[r * ldy + j];
        const bool zeroed = r >= first && j < cols;
        const bool ok = zeroed ? as_double(g) == 0.0 : same_bytes(g, y0[r * ldy + j]);
        if (!ok && bad++ < 4) ADD_FAILURE() << "row " << r << " col " << j;
      }
    }
  }
}

// The owner of row r as add_grouped_bias_kernel finds it: the first e whose clamped end exceeds
// r (binary search), num_experts when none does.
int64_t owner_of(int64_t r, const std::vector<int32_t>& ends, int64_t rows) {
  int64_t lo = 0, hi = static_cast<int64_t>(ends.size());
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (std::clamp<int64_t>(ends[mid], 0, rows) > r) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

template <typename T>
void check_grouped_bias(const std::vector<int32_t>& ends, int64_t rows, const std::string& what) {
  SCOPED_TRACE(what);
  const int64_t num_experts = static_cast<int64_t>(ends.size());
  const int64_t cols = 21, ldy = 32, bias_stride = 24;
  const std::vector<T> y0 = random_nonzero<T>(rows * ldy, 5);
  const std::vector<T> bias = random_nonzero<T>(num_experts * bias_stride, 6);
  DeviceBuffer<T> y(y0), d_bias(bias);
  DeviceBuffer<int32_t> d_ends(ends);
  MOEFORGE_ASSERT_CUDA(kernels::launch_add_grouped_bias<T>(
      y.data(), ldy, rows, cols, d_bias.data(), bias_stride, d_ends.data(), num_experts, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> got = y.download();
  int bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t e = owner_of(r, ends, rows);
    for (int64_t j = 0; j < ldy; ++j) {
      const T g = got[r * ldy + j], before = y0[r * ldy + j];
      T want = before;
      if (j < cols) {
        want = e < num_experts ? from_acc<T>(to_acc(before) + to_acc(bias[e * bias_stride + j]))
                               : from_acc<T>(acc_type_t<T>(0));
      }
      if (!same_bytes(g, want) && bad++ < 4) {
        ADD_FAILURE() << "row " << r << " col " << j << " (expert " << e << "): got "
                      << as_double(g) << ", want " << as_double(want);
      }
    }
  }
}

TYPED_TEST(ZeroRowsTest, AddGroupedBiasPerExpertRowsAndZeroDropped) {
  using T = TypeParam;
  MOEFORGE_SKIP_WITHOUT_GPU();
  check_grouped_bias<T>({3, 3, 40, 41, 90}, 120, "empty expert, 30 dropped rows");
  check_grouped_bias<T>({0, 0, 0}, 10, "no routed row");
  check_grouped_bias<T>({60}, 60, "one expert, every row");
}

TYPED_TEST(ZeroRowsTest, AddGroupedBiasCorruptEndsStayInRange) {
  using T = TypeParam;
  MOEFORGE_SKIP_WITHOUT_GPU();
  check_grouped_bias<T>({50, 20, -7, 500, 30}, 100, "decreasing, negative, past the rows");
}

TYPED_TEST(ZeroRowsTest, ZeroEmptyGroupsOnly) {
  using T = TypeParam;
  MOEFORGE_SKIP_WITHOUT_GPU();
  const std::vector<int32_t> ends = {0, 4, 4, 9, 9, 9, 20};  // experts 0, 2, 4, 5 own no rows
  const int64_t num_experts = static_cast<int64_t>(ends.size());
  const int64_t group = 3000, stride = 3010;  // > 8 x 256 elements: several blocks per expert
  const std::vector<T> g0 = random_nonzero<T>(num_experts * stride, 8);
  DeviceBuffer<T> g(g0);
  DeviceBuffer<int32_t> d_ends(ends);
  MOEFORGE_ASSERT_CUDA(kernels::launch_zero_empty_groups<T>(g.data(), stride, group, d_ends.data(),
                                                            num_experts, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> got = g.download();
  int bad = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const bool empty = ends[e] <= (e == 0 ? 0 : ends[e - 1]);
    for (int64_t i = 0; i < stride; ++i) {
      const T v = got[e * stride + i];
      const bool ok = empty && i < group ? as_double(v) == 0.0 : same_bytes(v, g0[e * stride + i]);
      if (!ok && bad++ < 4) ADD_FAILURE() << "expert " << e << " element " << i;
    }
  }
}

TEST(ZeroRowsArguments, RejectsBadArguments) {
  float* y = fake_pointer<float>();
  const float* bias = fake_pointer<const float>();
  const int32_t* ends = fake_pointer<const int32_t>();
  using kernels::launch_add_grouped_bias;
  using kernels::launch_zero_empty_groups;
  using kernels::launch_zero_rows_from;
  EXPECT_EQ(launch_zero_rows_from<float>(y, 8, -1, 8, ends, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_zero_rows_from<float>(y, 8, 8, 8, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_add_grouped_bias<float>(y, 8, 8, 8, nullptr, 8, ends, 4, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(launch_add_grouped_bias<float>(y, 8, 8, -1, bias, 8, ends, 4, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(launch_zero_empty_groups<float>(y, 8, 8, ends, 65536, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_zero_empty_groups<float>(nullptr, 8, 8, ends, 4, nullptr),
            cudaErrorInvalidValue);
  // Nothing to write: success without touching the (null) pointers.
  EXPECT_EQ(launch_zero_rows_from<float>(nullptr, 8, 0, 8, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(launch_zero_empty_groups<float>(nullptr, 8, 0, nullptr, 4, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace moeforge::testing
