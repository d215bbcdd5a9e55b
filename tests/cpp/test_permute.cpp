// GoogleTest for kernels/permute.cu: drives launch_permute / launch_combine / launch_routed_dot on
// cudaMalloc'd buffers (outputs poisoned with 0xFF bytes, i.e. NaN) and compares with host
// references. permute and combine must match bit for bit (same rounding steps, no FMA);
// routed_dot within a bound on its summation-order error. Every case skips without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/permute.h"

namespace moeforge::testing {
namespace {

using kernels::acc_type_t;

// Host conversions that round like the kernels.
using kernels::from_acc;
using kernels::to_acc;

// ---- the problem: a random routing plan, data and weights -------------------------------------
struct Shape {
  int64_t tokens, top_k, experts, hidden;
  int64_t id_lo, id_hi;  // ids drawn from [id_lo, id_hi): outside [0, E) = dropped
};

std::string name(const Shape& s) {
  return "T=" + std::to_string(s.tokens) + " K=" + std::to_string(s.top_k) +
         " E=" + std::to_string(s.experts) + " H=" + std::to_string(s.hidden) + " ids in [" +
         std::to_string(s.id_lo) + ", " + std::to_string(s.id_hi) + ")";
}

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> all = {
      {0, 2, 4, 64, 0, 4},       // no tokens
      {5, 1, 4, 129, 0, 4},      // K = 1, odd hidden (scalar path)
      {7, 4, 4, 64, 0, 4},       // K = E
      {33, 2, 8, 129, -3, 11},   // dropped ids (negative and >= E), odd hidden
      {16, 3, 5, 1, -1, 6},      // hidden = 1
      {64, 8, 16, 520, -1, 17},  // vector path for every type (520 % 8 == 0)
      {19, 2, 3, 2048, -2, 5},   // wide rows
      {1, 1, 1, 7, 0, 1},        // single pair
      {300, 2, 4, 96, 0, 4},     // many short rows per block
      {9, 3, 4, 64, -5, -1},     // every pair dropped
  };
  return all;
}

template <typename T>
struct Problem {
  Shape shape;
  Plan plan;
  std::vector<T> x;                    // [T, H]
  std::vector<acc_type_t<T>> weights;  // [T, K]
  int64_t num_rows() const { return shape.tokens * shape.top_k; }
};

template <typename T>
Problem<T> make_problem(const Shape& s, uint32_t seed) {
  using acc_t = acc_type_t<T>;
  Problem<T> pr{s, {}, {}, {}};
  pr.plan =
      reference_plan(random_ids<int32_t>(s.tokens * s.top_k, s.id_lo, s.id_hi, seed), s.experts);
  std::mt19937 gen(seed + 1000);
  std::uniform_real_distribution<double> data(-2.0, 2.0), weight(0.0, 1.0);
  pr.x.resize(s.tokens * s.hidden);
  for (auto& v : pr.x) v = from_acc<T>(static_cast<acc_t>(data(gen)));
  pr.weights.resize(s.tokens * s.top_k);
  for (auto& w : pr.weights) w = static_cast<acc_t>(weight(gen));
  return pr;
}

// ---- host references (the CPU op's arithmetic, step for step) ---------------------------------
template <typename T>
std::vector<T> permute_ref(const std::vector<T>& x, const Plan& plan, const acc_type_t<T>* w,
                           int64_t top_k, int64_t hidden) {
  using acc_t = acc_type_t<T>;
  const int64_t rows = static_cast<int64_t>(plan.sorted_pairs.size());
  std::vector<T> out(rows * hidden, from_acc<T>(acc_t(0)));
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = plan.sorted_pairs[i];
    if (plan.pair_to_row[p] < 0) continue;
    const acc_t scale = w ? w[p] : acc_t(1);
    for (int64_t h = 0; h < hidden; ++h) {
      out[i * hidden + h] = from_acc<T>(scale * to_acc(x[(p / top_k) * hidden + h]));
    }
  }
  return out;
}

template <typename T>
std::vector<T> combine_ref(const std::vector<T>& y, const std::vector<int32_t>& pair_to_row,
                           const acc_type_t<T>* w, int64_t tokens, int64_t top_k, int64_t hidden) {
  using acc_t = acc_type_t<T>;
  std::vector<T> out(tokens * hidden);
  std::vector<acc_t> acc(hidden);
  for (int64_t t = 0; t < tokens; ++t) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t row = pair_to_row[t * top_k + k];
      if (row < 0) continue;
      const acc_t scale = w ? w[t * top_k + k] : acc_t(1);
      for (int64_t h = 0; h < hidden; ++h) acc[h] += scale * to_acc(y[row * hidden + h]);
    }
    for (int64_t h = 0; h < hidden; ++h) out[t * hidden + h] = from_acc<T>(acc[h]);
  }
  return out;
}

// Exact equality of every element, reported by index (NaN, e.g. an unwritten poisoned element,
// never compares equal).
template <typename T>
void expect_bitwise_equal(const std::vector<T>& got, const std::vector<T>& want,
                          const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size() && bad < 10; ++i) {
    const double g = to_acc(got[i]), w = to_acc(want[i]);
    if (!(g == w)) {
      ADD_FAILURE() << what << ": element " << i << " got " << g << ", want " << w;
      ++bad;
    }
  }
}

template <typename T>
class PermuteTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using ElementTypes = ::testing::Types<float, double, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(PermuteTest, ElementTypes);

TYPED_TEST(PermuteTest, PermuteMatchesReference) {
  using T = TypeParam;
  uint32_t seed = 1;
  for (const Shape& s : shapes()) {
    for (const bool weighted : {false, true}) {
      SCOPED_TRACE(name(s) + (weighted ? " weighted" : " unweighted"));
      const Problem<T> pr = make_problem<T>(s, seed++);
      const auto* w = weighted ? pr.weights.data() : nullptr;
      DeviceBuffer<T> x(pr.x), out(pr.num_rows() * s.hidden);
      DeviceBuffer<int32_t> sorted_pairs(pr.plan.sorted_pairs), pair_to_row(pr.plan.pair_to_row);
      DeviceBuffer<acc_type_t<T>> weights(pr.weights);
      out.poison(0xFF);
      MOEFORGE_ASSERT_CUDA(kernels::launch_permute<T>(
          x.data(), sorted_pairs.data(), pair_to_row.data(), weighted ? weights.data() : nullptr,
          out.data(), s.tokens, s.top_k, s.hidden, nullptr));
      MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
      expect_bitwise_equal(out.download(), permute_ref(pr.x, pr.plan, w, s.top_k, s.hidden),
                           "permute");
    }
  }
}

TYPED_TEST(PermuteTest, CombineMatchesReference) {
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  uint32_t seed = 100;
  for (const Shape& s : shapes()) {
    for (const bool weighted : {false, true}) {
      SCOPED_TRACE(name(s) + (weighted ? " weighted" : " unweighted"));
      const Problem<T> pr = make_problem<T>(s, seed++);
      // y: random expert outputs, one row per routed pair.
      std::mt19937 gen(seed);
      std::uniform_real_distribution<double> data(-2.0, 2.0);
      std::vector<T> y_host(pr.num_rows() * s.hidden);
      for (auto& v : y_host) v = from_acc<T>(static_cast<acc_t>(data(gen)));
      DeviceBuffer<T> y(y_host), out(s.tokens * s.hidden);
      DeviceBuffer<int32_t> pair_to_row(pr.plan.pair_to_row);
      DeviceBuffer<acc_t> weights(pr.weights);
      out.poison(0xFF);
      MOEFORGE_ASSERT_CUDA(kernels::launch_combine<T>(
          y.data(), pair_to_row.data(), weighted ? weights.data() : nullptr, out.data(), s.tokens,
          s.top_k, s.hidden, nullptr));
      MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
      expect_bitwise_equal(
          out.download(),
          combine_ref(y_host, pr.plan.pair_to_row, weighted ? pr.weights.data() : nullptr, s.tokens,
                      s.top_k, s.hidden),
          "combine");
    }
  }
}

TYPED_TEST(PermuteTest, RoutedDotMatchesReference) {
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  const double acc_roundoff = std::numeric_limits<acc_t>::epsilon();
  uint32_t seed = 200;
  for (const Shape& s : shapes()) {
    SCOPED_TRACE(name(s));
    const Problem<T> pr = make_problem<T>(s, seed++);
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> data(-2.0, 2.0);
    std::vector<T> rows_host(pr.num_rows() * s.hidden);
    for (auto& v : rows_host) v = from_acc<T>(static_cast<acc_t>(data(gen)));
    DeviceBuffer<T> rows(rows_host), tokens(pr.x), out(pr.num_rows());
    DeviceBuffer<int32_t> pair_to_row(pr.plan.pair_to_row);
    out.poison(0xFF);
    MOEFORGE_ASSERT_CUDA(kernels::launch_routed_dot<T>(rows.data(), tokens.data(),
                                                       pair_to_row.data(), out.data(), s.tokens,
                                                       s.top_k, s.hidden, nullptr));
    MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
    const std::vector<T> got = out.download();
    for (int64_t q = 0; q < pr.num_rows(); ++q) {
      const int64_t row = pr.plan.pair_to_row[q], t = q / s.top_k;
      double want = 0, magnitude = 0;
      if (row >= 0) {
        for (int64_t h = 0; h < s.hidden; ++h) {
          const double prod = double(to_acc(rows_host[row * s.hidden + h])) *
                              double(to_acc(pr.x[t * s.hidden + h]));
          want += prod;
          magnitude += std::abs(prod);
        }
      }
      // Summation error of any order in acc_t, then one rounding to T.
      const double tol =
          2 * s.hidden * acc_roundoff * magnitude + 2 * unit_roundoff<T>() * std::abs(want) + 1e-30;
      const double g = to_acc(got[q]);
      EXPECT_TRUE(std::abs(g - want) <= tol)
          << "pair " << q << " got " << g << ", want " << want << " +- " << tol;
      if (row < 0) {
        EXPECT_EQ(g, 0.0) << "dropped pair " << q;
      }
    }
  }
}

TYPED_TEST(PermuteTest, PermuteCombineRoundTrip) {
  // combine(permute(x), w) = (sum of the kept weights) * x, up to rounding.
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  const Shape s{40, 4, 8, 136, -1, 9};
  const Problem<T> pr = make_problem<T>(s, 7);
  DeviceBuffer<T> x(pr.x), rows(pr.num_rows() * s.hidden), out(s.tokens * s.hidden);
  DeviceBuffer<int32_t> sorted_pairs(pr.plan.sorted_pairs), pair_to_row(pr.plan.pair_to_row);
  DeviceBuffer<acc_t> weights(pr.weights);
  rows.poison(0xFF);
  out.poison(0xFF);
  MOEFORGE_ASSERT_CUDA(kernels::launch_permute<T>(x.data(), sorted_pairs.data(), pair_to_row.data(),
                                                  nullptr, rows.data(), s.tokens, s.top_k, s.hidden,
                                                  nullptr));
  MOEFORGE_ASSERT_CUDA(kernels::launch_combine<T>(rows.data(), pair_to_row.data(), weights.data(),
                                                  out.data(), s.tokens, s.top_k, s.hidden,
                                                  nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> got = out.download();
  for (int64_t t = 0; t < s.tokens; ++t) {
    double wsum = 0;
    for (int64_t k = 0; k < s.top_k; ++k) {
      if (pr.plan.pair_to_row[t * s.top_k + k] >= 0) wsum += pr.weights[t * s.top_k + k];
    }
    for (int64_t h = 0; h < s.hidden; ++h) {
      const double want = wsum * to_acc(pr.x[t * s.hidden + h]);
      const double tol =
          8 * (unit_roundoff<T>() + std::numeric_limits<acc_t>::epsilon()) * std::abs(want) + 1e-30;
      ASSERT_NEAR(to_acc(got[t * s.hidden + h]), want, tol) << "t=" << t << " h=" << h;
    }
  }
}

TYPED_TEST(PermuteTest, UnalignedPointersUseScalarPath) {
  // hidden is a multiple of 16 bytes, but the data starts one element past an aligned address.
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  const Shape s{12, 2, 4, 64, -1, 5};
  const Problem<T> pr = make_problem<T>(s, 11);
  std::vector<T> x_shifted(pr.x.size() + 1, from_acc<T>(acc_t(0)));
  std::copy(pr.x.begin(), pr.x.end(), x_shifted.begin() + 1);
  DeviceBuffer<T> x(x_shifted), out(pr.num_rows() * s.hidden + 1), back(s.tokens * s.hidden + 1);
  DeviceBuffer<int32_t> sorted_pairs(pr.plan.sorted_pairs), pair_to_row(pr.plan.pair_to_row);
  DeviceBuffer<acc_t> weights(pr.weights);
  out.poison(0xFF);
  back.poison(0xFF);
  MOEFORGE_ASSERT_CUDA(kernels::launch_permute<T>(
      x.data() + 1, sorted_pairs.data(), pair_to_row.data(), weights.data(), out.data() + 1,
      s.tokens, s.top_k, s.hidden, nullptr));
  MOEFORGE_ASSERT_CUDA(kernels::launch_combine<T>(out.data() + 1, pair_to_row.data(), nullptr,
                                                  back.data() + 1, s.tokens, s.top_k, s.hidden,
                                                  nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> permuted = permute_ref(pr.x, pr.plan, pr.weights.data(), s.top_k, s.hidden);
  std::vector<T> got = out.download();
  got.erase(got.begin());
  expect_bitwise_equal(got, permuted, "permute");
  std::vector<T> got_back = back.download();
  got_back.erase(got_back.begin());
  expect_bitwise_equal(
      got_back, combine_ref(permuted, pr.plan.pair_to_row, nullptr, s.tokens, s.top_k, s.hidden),
      "combine");
}

TYPED_TEST(PermuteTest, CorruptPlanIndicesCountAsDropped) {
  // Out-of-range entries in sorted_pairs / pair_to_row must neither crash nor read out of bounds:
  // the rows they name are treated as dropped.
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  const int64_t tokens = 3, top_k = 2, hidden = 24, rows = tokens * top_k;
  std::vector<T> x_host(tokens * hidden);
  for (size_t i = 0; i < x_host.size(); ++i) x_host[i] = from_acc<T>(acc_t(1 + i % 5));
  const std::vector<int32_t> sorted_pairs_host = {0, 1000000, -7, 3, 6, 5};
  const std::vector<int32_t> pair_to_row_host = {0, 99, -1, 3, 1 << 30, 5};
  DeviceBuffer<T> x(x_host), out(rows * hidden), back(tokens * hidden), dots(rows);
  DeviceBuffer<int32_t> sorted_pairs(sorted_pairs_host), pair_to_row(pair_to_row_host);
  out.poison(0xFF);
  back.poison(0xFF);
  dots.poison(0xFF);
  MOEFORGE_ASSERT_CUDA(kernels::launch_permute<T>(x.data(), sorted_pairs.data(), pair_to_row.data(),
                                                  nullptr, out.data(), tokens, top_k, hidden,
                                                  nullptr));
  MOEFORGE_ASSERT_CUDA(kernels::launch_combine<T>(out.data(), pair_to_row.data(), nullptr,
                                                  back.data(), tokens, top_k, hidden, nullptr));
  MOEFORGE_ASSERT_CUDA(kernels::launch_routed_dot<T>(out.data(), x.data(), pair_to_row.data(),
                                                     dots.data(), tokens, top_k, hidden, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> permuted = out.download();
  // Rows 0 (p=0), 3 (p=3) and 5 (p=5) are routed; 1, 2 (p out of range) and 4 (p=6) are zero.
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = sorted_pairs_host[i];
    const bool routed = i == 0 || i == 3 || i == 5;
    for (int64_t h = 0; h < hidden; ++h) {
      const double want = routed ? to_acc(x_host[(p / top_k) * hidden + h]) : 0.0;
      ASSERT_EQ(to_acc(permuted[i * hidden + h]), want) << "row " << i << " h " << h;
    }
  }
  // combine skips rows 99 and 2^30 (>= S) like dropped ones; routed_dot gives them 0.
  expect_bitwise_equal(back.download(),
                       combine_ref(permuted, {0, -1, -1, 3, -1, 5}, nullptr, tokens, top_k, hidden),
                       "combine");
  const std::vector<T> d = dots.download();
  EXPECT_EQ(to_acc(d[1]), 0.0);
  EXPECT_EQ(to_acc(d[2]), 0.0);
  EXPECT_EQ(to_acc(d[4]), 0.0);
}

TYPED_TEST(PermuteTest, PermuteWritesOnlyRowsThePlanMapsBothWays) {
  // Row i gets its pair's token only when pair_to_row maps that pair back to i; every other row
  // (here row 0: sorted_pairs[0] = 0 but pair 0 maps to row 1) is zero, and no row is left
  // unwritten (the output is poisoned first).
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  const int64_t tokens = 2, top_k = 2, hidden = 40, rows = tokens * top_k;
  std::vector<T> x_host(tokens * hidden);
  for (size_t i = 0; i < x_host.size(); ++i) x_host[i] = from_acc<T>(acc_t(1 + i % 7));
  const std::vector<int32_t> sorted_pairs_host = {0, 0, 3, 2};
  const std::vector<int32_t> pair_to_row_host = {1, -1, 3, 2};
  const std::vector<acc_t> w_host = {acc_t(0.5), acc_t(3), acc_t(-2), acc_t(0.25)};
  DeviceBuffer<T> x(x_host), out(rows * hidden);
  DeviceBuffer<int32_t> sorted_pairs(sorted_pairs_host), pair_to_row(pair_to_row_host);
  DeviceBuffer<acc_t> w(w_host);
  for (const bool weighted : {false, true}) {
    SCOPED_TRACE(weighted);
    out.poison(0xFF);
    MOEFORGE_ASSERT_CUDA(kernels::launch_permute<T>(
        x.data(), sorted_pairs.data(), pair_to_row.data(), weighted ? w.data() : nullptr,
        out.data(), tokens, top_k, hidden, nullptr));
    MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
    const std::vector<T> got = out.download();
    const int64_t token_of_row[] = {-1, 0, 1, 1};  // -1: zero
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t p = sorted_pairs_host[i], t = token_of_row[i];
      const acc_t scale = weighted && t >= 0 ? w_host[p] : acc_t(1);
      for (int64_t h = 0; h < hidden; ++h) {
        const double want =
            t < 0 ? 0.0 : to_acc(from_acc<T>(acc_t(scale * to_acc(x_host[t * hidden + h]))));
        ASSERT_EQ(to_acc(got[i * hidden + h]), want) << "row " << i << " h " << h;
      }
    }
  }
}

// Argument checks happen before any CUDA call, so this one needs no device and runs everywhere.
template <typename T>
void expect_negative_sizes_rejected() {
  EXPECT_EQ(
      kernels::launch_permute<T>(nullptr, nullptr, nullptr, nullptr, nullptr, -1, 2, 8, nullptr),
      cudaErrorInvalidValue);
  EXPECT_EQ(kernels::launch_combine<T>(nullptr, nullptr, nullptr, nullptr, 2, 2, -8, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(kernels::launch_routed_dot<T>(nullptr, nullptr, nullptr, nullptr, 2, -1, 8, nullptr),
            cudaErrorInvalidValue);
}

TEST(PermuteArguments, RejectsNegativeSizes) {
  expect_negative_sizes_rejected<float>();
  expect_negative_sizes_rejected<double>();
  expect_negative_sizes_rejected<__half>();
  expect_negative_sizes_rejected<__nv_bfloat16>();
}

}  // namespace
}  // namespace moeforge::testing
