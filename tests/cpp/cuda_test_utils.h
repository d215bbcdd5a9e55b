// Helpers shared by the GoogleTest suites that drive the torch-free CUDA launchers directly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "moeforge/kernels/numeric.h"

namespace moeforge::testing {

// True when the CUDA runtime sees at least one device (false without a driver or GPU).
inline bool have_gpu() {
  int count = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  cudaGetLastError();  // a failed query must not leak into the next check
  return ok;
}

// Skips the current test (at run time, never compiled out) when no GPU is present.
#define MOEFORGE_SKIP_WITHOUT_GPU()                                         \
  do {                                                                      \
    if (!::moeforge::testing::have_gpu()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// Asserts that a cudaError_t expression (evaluated once) is cudaSuccess.
#define MOEFORGE_ASSERT_CUDA(expr)                                                        \
  do {                                                                                    \
    const cudaError_t moeforge_test_err_ = (expr);                                        \
    ASSERT_EQ(moeforge_test_err_, cudaSuccess) << cudaGetErrorString(moeforge_test_err_); \
  } while (0)

// ---- expert offsets -----------------------------------------------------------------------------

// m(0..E): offsets clamped into [0, rows] and made non-decreasing, m(0) = 0 — how every kernel
// reads expert offsets (kernels/expert_bounds.cuh), so any offsets give valid row ranges.
inline std::vector<int64_t> clamped_bounds(const std::vector<int32_t>& offsets, int64_t rows) {
  std::vector<int64_t> m(offsets.size(), 0);
  for (size_t e = 1; e < offsets.size(); ++e) {
    const int64_t clamped = offsets[e] < 0 ? 0 : (offsets[e] > rows ? rows : offsets[e]);
    m[e] = m[e - 1] > clamped ? m[e - 1] : clamped;
  }
  return m;
}

// Valid random offsets [E + 1]: 0, E - 1 sorted cuts in [0, rows - dropped], rows - dropped (so
// some experts may be empty and the last `dropped` rows belong to no expert).
inline std::vector<int32_t> random_offsets(int64_t num_experts, int64_t rows, uint32_t seed,
                                           int64_t dropped = 0) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int64_t> pick(0, rows - dropped);
  std::vector<int32_t> offsets(1, 0);
  for (int64_t e = 1; e < num_experts; ++e) offsets.push_back(static_cast<int32_t>(pick(gen)));
  std::sort(offsets.begin() + 1, offsets.end());
  offsets.push_back(static_cast<int32_t>(rows - dropped));
  return offsets;
}

// ---- rounding and comparison ------------------------------------------------------------------

// An element as double, converted like the kernels read it.
template <typename T>
double as_double(T v) {
  return static_cast<double>(kernels::to_acc(v));
}

// Unit roundoff of an element type: the relative error of rounding to nearest into T.
template <typename T>
double unit_roundoff() {
  if constexpr (std::is_same_v<T, __half>) {
    return 1.0 / 2048;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return 1.0 / 256;
  } else {
    return std::numeric_limits<T>::epsilon() / 2;
  }
}

// The largest absolute error of rounding a result into T where T's spacing is fixed (its
// subnormal range): half the smallest subnormal. Only fp16 reaches it from the values of these
// tests (2^-25 ~ 3e-8, e.g. a product below 6.1e-5); unit_roundoff() does not hold there.
template <typename T>
double subnormal_rounding() {
  if constexpr (std::is_same_v<T, __half>) {
    return std::ldexp(1.0, -25);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return std::ldexp(1.0, -134);
  } else {
    return std::numeric_limits<T>::denorm_min() / 2;
  }
}

// Checks got against want within tol element-wise (NaN never passes), reporting a few failures.
inline void expect_close(const std::vector<double>& got, const std::vector<double>& want,
                         const std::vector<double>& tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 8; ++i) {
    if (!(std::abs(got[i] - want[i]) <= tol[i])) {
      ADD_FAILURE() << what << ": element " << i << " got " << got[i] << ", want " << want[i]
                    << " +- " << tol[i];
      ++bad;
    }
  }
}

// A device allocation of `count` elements of T, freed on destruction.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t count) : count_(count) {
    // Allocate at least one byte so that data() is a valid, distinct pointer even when empty.
    EXPECT_EQ(cudaMalloc(&ptr_, count * sizeof(T) + 1), cudaSuccess);
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() const { return static_cast<T*>(ptr_); }
  size_t size() const { return count_; }

  void upload(const std::vector<T>& host) {
    ASSERT_EQ(host.size(), count_);
    ASSERT_EQ(cudaMemcpy(ptr_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  // Fills every byte with `byte` (0xFF: NaN for floating types, -1 for int32).
  void poison(unsigned char byte) {
    ASSERT_EQ(cudaMemset(ptr_, byte, count_ * sizeof(T)), cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost),
              cudaSuccess);
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t count_;
};

// The routing plan of topk_ids (flattened, S entries) written the obvious way: for each expert in
// order its pairs in ascending p, then the dropped pairs (id < 0 or >= E) in ascending p.
struct Plan {
  std::vector<int32_t> sorted_pairs;  // [S]
  std::vector<int32_t> pair_to_row;   // [S], -1 = dropped
  std::vector<int32_t> offsets;       // [E + 1]
};

inline bool operator==(const Plan& a, const Plan& b) {
  return a.sorted_pairs == b.sorted_pairs && a.pair_to_row == b.pair_to_row &&
         a.offsets == b.offsets;
}

inline void PrintTo(const Plan& plan, std::ostream* os) {
  *os << "Plan{sorted_pairs=" << ::testing::PrintToString(plan.sorted_pairs)
      << ", pair_to_row=" << ::testing::PrintToString(plan.pair_to_row)
      << ", offsets=" << ::testing::PrintToString(plan.offsets) << "}";
}

template <typename index_t>
Plan reference_plan(const std::vector<index_t>& ids, int64_t num_experts) {
  const int64_t n = static_cast<int64_t>(ids.size());
  Plan plan{{}, std::vector<int32_t>(n, -1), {}};
  const auto valid = [&](int64_t p) { return ids[p] >= 0 && ids[p] < num_experts; };
  for (int64_t e = 0; e < num_experts; ++e) {
    plan.offsets.push_back(static_cast<int32_t>(plan.sorted_pairs.size()));
    for (int64_t p = 0; p < n; ++p) {
      if (valid(p) && ids[p] == e) {
        plan.pair_to_row[p] = static_cast<int32_t>(plan.sorted_pairs.size());
        plan.sorted_pairs.push_back(static_cast<int32_t>(p));
      }
    }
  }
  plan.offsets.push_back(static_cast<int32_t>(plan.sorted_pairs.size()));
  for (int64_t p = 0; p < n; ++p) {
    if (!valid(p)) plan.sorted_pairs.push_back(static_cast<int32_t>(p));
  }
  return plan;
}

template <typename index_t>
std::vector<index_t> random_ids(int64_t num_pairs, int64_t lo, int64_t hi, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int64_t> dist(lo, hi - 1);
  std::vector<index_t> ids(num_pairs);
  for (auto& id : ids) id = static_cast<index_t>(dist(gen));
  return ids;
}

}  // namespace moeforge::testing
