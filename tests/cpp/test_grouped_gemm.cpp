// GoogleTest for the grouped GEMM engine (kernels/grouped_gemm*.cu): drives launch_grouped_gemm,
// launch_grouped_gemm_wgrad and launch_grouped_row_sum on cudaMalloc'd buffers and compares with
// double-precision host references. Outputs are poisoned (0xFF bytes: NaN) before each launch and
// surrounded by poisoned guard elements, so an unwritten element or a write out of bounds fails.
// Cases: experts with 0 rows, dropped tail rows, row counts and sizes that are no tile multiple
// (45, 129), k = 0, >= 131072 rows, every weight layout the ops use ([E, out, in] as x W^T,
// [E, in, out] as x W, LoRA's expert slices of lora_A / lora_B, padded strides), alpha scaling,
// accumulation into y, corrupt offsets (clamped, never out of bounds), float / double / half /
// bfloat16 and the mixed combinations of split LoRA, and bitwise determinism. launch_grouped_gemm
// also runs with GroupedGemmEngine::kWmma (the tensor-core path for half / bfloat16 on sm80+):
// every case above plus 128-row-tile edges, 16-byte-load and gathered operand paths, K edges
// inside a 16-byte chunk and gpt-oss-like sizes (k or n = 2880); other types fall back to SIMT.
// So does launch_grouped_gemm_wgrad (its tensor-core path: every wgrad case plus 16-byte-load,
// multi-tile and partial-slab shapes). Both launchers also run with a RowGather (the token
// permutation fused into the operand loads: x_rows of the forward GEMM, a_rows / b_rows of the
// weight gradient), on both engines: routing-plan indices with divisor = top_k over a token-major
// source, 16-byte and element-wise load paths, and out-of-range indices (rows of zeros, never a
// read out of bounds: the source buffer holds exactly `limit` rows). Every case that launches a
// kernel skips at run time without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/grouped_gemm.h"
#include "moeforge/kernels/numeric.h"

namespace moeforge::testing {
namespace {

using kernels::acc_type_t;

template <typename T>
T from_double(double v) {
  return kernels::from_acc<T>(static_cast<acc_type_t<T>>(v));
}

// The accumulation type of a combination of element types, as the kernels choose it.
template <typename... T>
using acc_of = std::conditional_t<(std::is_same_v<T, double> || ...), double, float>;

// Uniform in [-1, 1), rounded to T. exact: multiples of 1/4 in [-0.5, 0.5] instead, so that
// every product and every partial sum of up to ~2^20 of them is exact in float32 (the large cases
// then check that no row is lost, which a worst-case rounding bound over 70000 rows could hide).
template <typename T>
std::vector<T> random_values(size_t count, uint32_t seed, bool exact = false) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::uniform_int_distribution<int> quarters(-2, 2);
  std::vector<T> v(count);
  for (auto& x : v) x = from_double<T>(exact ? quarters(gen) / 4.0 : dist(gen));
  return v;
}

// A host vector of `count` elements with every byte 0xFF (NaN for the floating types).
template <typename T>
std::vector<T> poisoned(size_t count) {
  std::vector<T> v(count);
  std::memset(static_cast<void*>(v.data()), 0xFF, count * sizeof(T));
  return v;
}

template <typename T>
bool is_poison(const T& v) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));
  return std::all_of(bytes, bytes + sizeof(T), [](unsigned char b) { return b == 0xFF; });
}

// Poisoned elements on both sides of every output buffer.
constexpr int64_t kGuard = 67;

// Offsets [E + 1] for per-expert row counts; num_rows = offsets[E] + dropped.
std::vector<int32_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int32_t> offsets(1, 0);
  for (const int64_t c : counts) offsets.push_back(static_cast<int32_t>(offsets.back() + c));
  return offsets;
}

// The rows [m[e], m[e+1]) of each expert as the kernels read any offsets: m[0] = 0,
// m[e] = min(S, max(0, offsets[1..e])) (grouped_gemm.h).
std::vector<int64_t> clamped_bounds(const std::vector<int32_t>& offsets, int64_t num_rows) {
  std::vector<int64_t> m(offsets.size(), 0);
  int64_t running = 0;
  for (size_t e = 1; e < offsets.size(); ++e) {
    running = std::max<int64_t>(running, offsets[e]);
    m[e] = std::min(running, num_rows);
  }
  return m;
}

// Downloads a guarded buffer: checks both guards are still poison, returns the payload.
template <typename T>
std::vector<T> download_guarded(const DeviceBuffer<T>& buf, const std::string& what) {
  std::vector<T> all = buf.download();
  const int64_t n = static_cast<int64_t>(all.size()) - 2 * kGuard;
  for (int64_t i = 0; i < kGuard; ++i) {
    EXPECT_TRUE(is_poison(all[i])) << what << ": write before the output, guard " << i;
    EXPECT_TRUE(is_poison(all[kGuard + n + i])) << what << ": write past the output, guard " << i;
  }
  return std::vector<T>(all.begin() + kGuard, all.begin() + kGuard + n);
}

// A RowGather on the host side (grouped_gemm.h): row r of the operand is row index[r] / divisor
// of a source of `limit` rows, or a row of zeros when index[r] is outside [0, limit * divisor).
struct Gather {
  std::vector<int32_t> index;  // [num_rows]
  int64_t divisor = 1;
  int64_t limit = 0;
};

// The source row that operand row r reads through g, -1 for a row of zeros.
int64_t source_row(const Gather& g, int64_t r) {
  const int64_t v = g.index[r];
  if (v < 0 || v / g.divisor >= g.limit) return -1;
  return v / g.divisor;
}

// The operand the kernel reads through g, gathered explicitly on the host: [index.size(), ld],
// row r = row source_row(g, r) of src ([g.limit, ld]), or zeros.
template <typename T>
std::vector<T> gather_rows(const std::vector<T>& src, int64_t ld, const Gather& g) {
  const int64_t rows = static_cast<int64_t>(g.index.size());
  std::vector<T> out(rows * ld, from_double<T>(0.0));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = source_row(g, r);
    if (s >= 0) std::copy(src.begin() + s * ld, src.begin() + (s + 1) * ld, out.begin() + r * ld);
  }
  return out;
}

// The plan of a routing of num_tokens tokens to top_k experts each, as launch_routing makes it
// (reference_plan: sorted_pairs grouped by expert in ascending pair order, dropped pairs last), so
// that sorted_pairs with divisor top_k gathers each routed row's token from [num_tokens, ld]
// activations. Four experts with uneven loads: expert 1 gets about half the pairs (more than
// 128 rows for the sizes used here, so both engines' row tiles have edges inside an expert),
// expert 2 none, about 1 in 15 pairs are dropped (ids -1 and E alternately).
struct GatherPlan {
  Gather gather;
  std::vector<int32_t> offsets;  // [E + 1]
  std::vector<int64_t> counts;   // rows per expert
  int64_t dropped = 0;
};

GatherPlan gather_plan(int64_t num_tokens, int64_t top_k, uint32_t seed) {
  constexpr int64_t kExperts = 4;
  std::mt19937 gen(seed);
  std::discrete_distribution<int> pick({1, 3, 8, 0, 3});  // dropped, experts 0 .. 3
  std::vector<int32_t> ids(num_tokens * top_k);
  bool negative = false;
  for (int32_t& id : ids) {
    const int c = pick(gen);
    if (c > 0) {
      id = c - 1;
    } else {
      id = (negative = !negative) ? -1 : static_cast<int32_t>(kExperts);
    }
  }
  const Plan plan = reference_plan(ids, kExperts);
  GatherPlan out{{plan.sorted_pairs, top_k, num_tokens}, plan.offsets, {}, 0};
  for (int64_t e = 0; e < kExperts; ++e) {
    out.counts.push_back(plan.offsets[e + 1] - plan.offsets[e]);
  }
  out.dropped = num_tokens * top_k - plan.offsets[kExperts];
  return out;
}

// ---- launch_grouped_gemm ----------------------------------------------------------------------
enum class Layout {
  kOutIn,   // weight [E, n, k]: y = x W_e^T (nn.Linear, HF)
  kInOut,   // weight [E, k, n]: y = x W_e (gpt-oss)
  kLoraAT,  // lora_A [E*n, k] expert-major: W_e[kk, j] = A[e*n + j, kk] (u = x A_e^T)
  kLoraBT,  // lora_B [n, k*E] rank-major:  W_e[j, o] = B[o, j*E + e] (delta = u B_e^T)
  kPadded,  // [E, k, n] inside a [E + 1, k + 2, n + 5] allocation (padded, non-contiguous)
};

struct WeightView {
  int64_t elements, stride_e, stride_k, stride_n;
};

WeightView weight_view(Layout layout, int64_t e, int64_t k, int64_t n) {
  switch (layout) {
    case Layout::kOutIn:
      return {e * n * k, n * k, 1, k};
    case Layout::kInOut:
      return {e * k * n, k * n, n, 1};
    case Layout::kLoraAT:
      return {e * n * k, n * k, 1, k};
    case Layout::kLoraBT:
      return {n * k * e, 1, e, k * e};
    case Layout::kPadded:
      return {(e + 1) * (k + 2) * (n + 5), (k + 2) * (n + 5), n + 5, 1};
  }
  return {};
}

struct RowsCase {
  std::string name;
  std::vector<int64_t> counts;  // rows per expert
  int64_t dropped;              // rows past offsets[E]
  int64_t k, n;
  Layout layout;
  bool bias = false;
  double alpha = 1.0;
  bool accumulate = false;
  int64_t x_pad = 0;  // ldx = k + x_pad
  int64_t y_pad = 0;  // ldy = n + y_pad
};

const std::vector<RowsCase>& rows_cases() {
  static const std::vector<RowsCase> all = {
      {"empty experts, dropped tail, odd sizes",
       {0, 70, 1, 0, 129},
       5,
       45,
       129,
       Layout::kOutIn,
       true},
      {"transposed weight, alpha", {0, 70, 1, 0, 129}, 5, 45, 129, Layout::kInOut, false, 0.37},
      {"lora_A view", {33, 0, 64, 65}, 2, 45, 8, Layout::kLoraAT},
      {"lora_B view, alpha", {33, 0, 64, 65}, 2, 8, 45, Layout::kLoraBT, false, 2.0},
      {"padded strides, accumulate",
       {17, 0, 90},
       4,
       37,
       70,
       Layout::kPadded,
       true,
       -0.5,
       true,
       7,
       3},
      {"k = 0 gives the bias", {3, 2}, 1, 0, 17, Layout::kOutIn, true},
      {"every row dropped", {0, 0, 0}, 9, 12, 20, Layout::kInOut, true},
      {"no rows", {0, 0}, 0, 12, 20, Layout::kOutIn},
      {"tile multiples", {64, 128}, 0, 64, 64, Layout::kOutIn, true},
      {"long k, several n tiles", {130, 1}, 3, 300, 200, Layout::kInOut},
      {"one row per expert", {1, 1, 1, 1, 1, 1, 1}, 1, 9, 3, Layout::kOutIn, true},
  };
  return all;
}

// Runs one case of launch_grouped_gemm<TX, TW, TY> against the double reference.
template <typename TX, typename TW, typename TY>
void run_rows_case(const RowsCase& c, const std::vector<int32_t>& offsets, uint32_t seed,
                   std::vector<TY>* result = nullptr, bool exact = false,
                   kernels::GroupedGemmEngine engine = kernels::GroupedGemmEngine::kSimt,
                   const Gather* gather = nullptr) {
  SCOPED_TRACE(c.name);
  using acc = acc_of<TX, TW, TY>;
  const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
  int64_t routed = 0;
  for (const int64_t cnt : c.counts) routed += cnt;
  const int64_t num_rows = routed + c.dropped;
  const int64_t ldx = c.k + c.x_pad, ldy = c.n + c.y_pad;
  const WeightView wv = weight_view(c.layout, num_experts, c.k, c.n);
  // With a gather, x is the source of gather->limit rows and xg the rows the kernel should read.
  if (gather != nullptr) {
    ASSERT_EQ(static_cast<int64_t>(gather->index.size()), num_rows);
  }
  const int64_t x_rows = gather != nullptr ? gather->limit : num_rows;
  const std::vector<TX> x = random_values<TX>(x_rows * ldx, seed, exact);
  const std::vector<TX> gathered =
      gather != nullptr ? gather_rows(x, ldx, *gather) : std::vector<TX>{};
  const std::vector<TX>& xg = gather != nullptr ? gathered : x;
  const std::vector<TW> w = random_values<TW>(wv.elements, seed + 1, exact);
  const std::vector<TW> bias = random_values<TW>(num_experts * c.n, seed + 2, exact);
  std::vector<TY> y_init = poisoned<TY>(num_rows * ldy + 2 * kGuard);
  if (c.accumulate) {
    const std::vector<TY> y0 = random_values<TY>(num_rows * ldy, seed + 3);
    std::copy(y0.begin(), y0.end(), y_init.begin() + kGuard);
  }

  DeviceBuffer<TX> d_x(x);
  DeviceBuffer<int32_t> d_index(gather != nullptr ? gather->index : std::vector<int32_t>{});
  DeviceBuffer<TW> d_w(w), d_bias(bias);
  DeviceBuffer<int32_t> d_offsets(offsets);
  DeviceBuffer<TY> d_y(y_init);
  kernels::GroupedGemmArgs<TX, TW, TY> args;
  args.x = d_x.data();
  args.ldx = ldx;
  if (gather != nullptr) args.x_rows = {d_index.data(), gather->divisor, gather->limit};
  args.w = d_w.data();
  args.w_stride_e = wv.stride_e;
  args.w_stride_k = wv.stride_k;
  args.w_stride_n = wv.stride_n;
  args.bias = c.bias ? d_bias.data() : nullptr;
  args.bias_stride_e = c.n;
  args.expert_offsets = d_offsets.data();
  args.y = d_y.data() + kGuard;
  args.ldy = ldy;
  args.num_rows = num_rows;
  args.k = c.k;
  args.n = c.n;
  args.num_experts = num_experts;
  args.alpha = c.alpha;
  args.accumulate = c.accumulate;
  args.engine = engine;
  MOEFORGE_ASSERT_CUDA(kernels::launch_grouped_gemm(args, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<TY> got = download_guarded(d_y, "y");
  if (result != nullptr) *result = got;

  // Reference: the math definition, in double, from the (rounded) inputs.
  const std::vector<int64_t> m = clamped_bounds(offsets, num_rows);
  const double u_acc = exact ? 0.0 : std::numeric_limits<acc>::epsilon() / 2;
  const double u_out = unit_roundoff<TY>();
  std::vector<double> got_d, want, tol;
  for (int64_t r = 0; r < num_rows; ++r) {
    int64_t e = 0;
    while (e < num_experts && !(r >= m[e] && r < m[e + 1])) ++e;  // e == E: dropped row
    for (int64_t j = 0; j < ldy; ++j) {
      const TY& g = got[r * ldy + j];
      const double y0 = c.accumulate ? as_double(y_init[kGuard + r * ldy + j]) : 0.0;
      if (j >= c.n) {  // row padding: never written
        EXPECT_TRUE(c.accumulate ? as_double(g) == y0 : is_poison(g)) << "padding r=" << r;
        continue;
      }
      double sum = 0, magnitude = 0;
      if (e < num_experts) {
        for (int64_t kk = 0; kk < c.k; ++kk) {
          const double prod = as_double(xg[r * ldx + kk]) *
                              as_double(w[e * wv.stride_e + kk * wv.stride_k + j * wv.stride_n]);
          sum += prod;
          magnitude += std::abs(prod);
        }
        sum *= c.alpha;
        magnitude *= std::abs(c.alpha);
        if (c.bias) {
          sum += as_double(bias[e * c.n + j]);
          magnitude += std::abs(as_double(bias[e * c.n + j]));
        }
      }
      const double value = y0 + sum;
      magnitude += std::abs(y0);
      got_d.push_back(as_double(g));
      want.push_back(value);
      tol.push_back(u_out * std::abs(value) + subnormal_rounding<TY>() +
                    2.0 * (c.k + 3) * u_acc * magnitude);
    }
  }
  expect_close(got_d, want, tol, "y");
}

template <typename T>
class GroupedGemmTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using ElementTypes = ::testing::Types<float, double, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(GroupedGemmTest, ElementTypes);

TYPED_TEST(GroupedGemmTest, RowsMatchReference) {
  using T = TypeParam;
  uint32_t seed = 10;
  for (const RowsCase& c : rows_cases()) {
    run_rows_case<T, T, T>(c, offsets_of(c.counts), seed += 10);
  }
}

TYPED_TEST(GroupedGemmTest, RowsOver131072) {
  using T = TypeParam;
  const RowsCase c{"131072+ rows", {70000, 0, 70001}, 3, 8, 24, Layout::kOutIn, true};
  run_rows_case<T, T, T>(c, offsets_of(c.counts), 7, nullptr, /*exact=*/true);
}

TYPED_TEST(GroupedGemmTest, RowsCorruptOffsetsAreClamped) {
  // offsets[0] != 0, a decrease, a negative value and one past num_rows = 80: the kernels read
  // them as the clamped running maximum [0, 50, 50, 50, 80] and stay in bounds.
  using T = TypeParam;
  const RowsCase c{"corrupt offsets", {80}, 0, 20, 33, Layout::kOutIn, true};
  run_rows_case<T, T, T>(c, {7, 50, 20, -5, 1000}, 3);
  const RowsCase tail{"negative offsets", {40}, 0, 20, 33, Layout::kInOut};
  run_rows_case<T, T, T>(tail, {0, -3, 30}, 4);  // expert 0 empty, 1 owns [0, 30), rest dropped
}

TYPED_TEST(GroupedGemmTest, RowsDeterministic) {
  using T = TypeParam;
  const RowsCase& c = rows_cases()[0];
  std::vector<T> first, second;
  run_rows_case<T, T, T>(c, offsets_of(c.counts), 99, &first);
  run_rows_case<T, T, T>(c, offsets_of(c.counts), 99, &second);
  ASSERT_EQ(first.size(), second.size());
  EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(T)), 0);
}

// The mixed combinations split LoRA uses: half-type operands into a float32 intermediate, and a
// float32 intermediate times half-type weights into a half-type output.
template <typename T>
void run_mixed_rows_cases() {
  const RowsCase into_float{"T x T -> float", {33, 0, 64, 65}, 2, 45, 8, Layout::kLoraAT};
  run_rows_case<T, T, float>(into_float, offsets_of(into_float.counts), 5);
  const RowsCase from_float{"float x T -> T", {33, 0, 64, 65}, 2,  8, 45,
                            Layout::kLoraBT,  false,           2.0};
  run_rows_case<float, T, T>(from_float, offsets_of(from_float.counts), 6);
}

TEST(GroupedGemmMixed, HalfAndFloat) {
  MOEFORGE_SKIP_WITHOUT_GPU();
  run_mixed_rows_cases<__half>();
}

TEST(GroupedGemmMixed, BFloat16AndFloat) {
  MOEFORGE_SKIP_WITHOUT_GPU();
  run_mixed_rows_cases<__nv_bfloat16>();
}

// ---- launch_grouped_gemm, tensor-core (WMMA) path -----------------------------------------------
constexpr kernels::GroupedGemmEngine kWmma = kernels::GroupedGemmEngine::kWmma;

// Cases aimed at the WMMA kernel's 128 x 128 tiles, 32-deep slabs and 8-element load chunks (run
// together with rows_cases()).
const std::vector<RowsCase>& wmma_cases() {
  static const std::vector<RowsCase> all = {
      {"128-row tiles, empty experts, dropped tail",
       {0, 200, 1, 0, 129, 128},
       130,
       45,
       129,
       Layout::kOutIn,
       true},
      {"16-byte loads, x W^T, bias, accumulate",
       {129, 0, 300},
       4,
       128,
       256,
       Layout::kOutIn,
       true,
       1.0,
       true},
      {"16-byte loads, x W, bias, alpha", {200, 0, 77}, 3, 96, 136, Layout::kInOut, true, 0.5},
      {"16-byte rows, k edge inside a chunk",
       {150, 7},
       2,
       45,
       136,
       Layout::kInOut,
       false,
       1.0,
       false,
       3,
       0},
      {"gathered loads, odd ldx and n",
       {150, 7},
       2,
       37,
       131,
       Layout::kInOut,
       true,
       1.0,
       false,
       2,
       5},
      {"gpt-oss-like long k", {100, 0, 157}, 5, 2880, 200, Layout::kOutIn, true},
      {"gpt-oss-like wide n", {70, 130}, 1, 64, 2880, Layout::kInOut, true},
      {"lora_B view, many k slabs", {300, 0, 45}, 6, 136, 72, Layout::kLoraBT, false, -1.5},
      {"padded strides, several tiles", {260, 3}, 9, 100, 300, Layout::kPadded, true, 0.25, true},
  };
  return all;
}

template <typename T>
class GroupedGemmWmmaTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using HalfTypes = ::testing::Types<__half, __nv_bfloat16>;
TYPED_TEST_SUITE(GroupedGemmWmmaTest, HalfTypes);

TYPED_TEST(GroupedGemmWmmaTest, RowsMatchReference) {
  using T = TypeParam;
  uint32_t seed = 1000;
  for (const std::vector<RowsCase>* cases : {&rows_cases(), &wmma_cases()}) {
    for (const RowsCase& c : *cases) {
      run_rows_case<T, T, T>(c, offsets_of(c.counts), seed += 10, nullptr, false, kWmma);
    }
  }
}

TYPED_TEST(GroupedGemmWmmaTest, RowsIntoFloat) {
  using T = TypeParam;
  uint32_t seed = 2000;
  // rows_cases() include the LoRA views (split LoRA's x A_e^T and grad_delta B_e into float).
  for (const std::vector<RowsCase>* cases : {&rows_cases(), &wmma_cases()}) {
    for (const RowsCase& c : *cases) {
      run_rows_case<T, T, float>(c, offsets_of(c.counts), seed += 10, nullptr, false, kWmma);
    }
  }
}

TYPED_TEST(GroupedGemmWmmaTest, RowsOver131072) {
  using T = TypeParam;
  const RowsCase c{"131072+ rows", {70000, 0, 70001}, 3, 8, 24, Layout::kOutIn, true};
  run_rows_case<T, T, T>(c, offsets_of(c.counts), 7, nullptr, /*exact=*/true, kWmma);
  const RowsCase wide{"131072+ rows, 16-byte loads", {70000, 0, 70001}, 3, 32, 136, Layout::kInOut};
  run_rows_case<T, T, T>(wide, offsets_of(wide.counts), 8, nullptr, /*exact=*/true, kWmma);
}

TYPED_TEST(GroupedGemmWmmaTest, RowsCorruptOffsetsAreClamped) {
  using T = TypeParam;
  const RowsCase c{"corrupt offsets", {300}, 0, 40, 136, Layout::kOutIn, true};
  run_rows_case<T, T, T>(c, {7, 150, 20, -5, 1000}, 3, nullptr, false, kWmma);
  const RowsCase tail{"negative offsets", {200}, 0, 40, 33, Layout::kInOut};
  run_rows_case<T, T, T>(tail, {0, -3, 130}, 4, nullptr, false, kWmma);
}

TYPED_TEST(GroupedGemmWmmaTest, RowsDeterministic) {
  using T = TypeParam;
  for (const RowsCase& c : {rows_cases()[0], wmma_cases()[5]}) {
    std::vector<T> first, second;
    run_rows_case<T, T, T>(c, offsets_of(c.counts), 99, &first, false, kWmma);
    run_rows_case<T, T, T>(c, offsets_of(c.counts), 99, &second, false, kWmma);
    ASSERT_EQ(first.size(), second.size());
    EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(T)), 0) << c.name;
  }
}

// kWmma is a request: combinations the WMMA path does not cover run the SIMT kernels.
TEST(GroupedGemmWmma, OtherTypesFallBackToSimt) {
  MOEFORGE_SKIP_WITHOUT_GPU();
  const RowsCase& c = wmma_cases()[0];
  run_rows_case<float, float, float>(c, offsets_of(c.counts), 31, nullptr, false, kWmma);
  run_rows_case<double, double, double>(c, offsets_of(c.counts), 32, nullptr, false, kWmma);
  run_rows_case<float, __half, __half>(c, offsets_of(c.counts), 33, nullptr, false, kWmma);
  run_rows_case<float, __nv_bfloat16, __nv_bfloat16>(c, offsets_of(c.counts), 34, nullptr, false,
                                                     kWmma);
}

// ---- launch_grouped_gemm_wgrad ----------------------------------------------------------------
enum class OutLayout {
  kEPQ,   // G [E, p, q] contiguous
  kEQP,   // G stored [E, q, p] (the other weight orientation)
  kLora,  // G_e[o, j] = g[o, j*E + e] (PEFT's rank-major lora_B gradient), [p, q*E]
};

struct WgradCase {
  std::string name;
  std::vector<int64_t> counts;
  int64_t dropped, p, q;
  OutLayout layout;
  double alpha = 1.0;
  int64_t a_pad = 0, b_pad = 0;
};

const std::vector<WgradCase>& wgrad_cases() {
  static const std::vector<WgradCase> all = {
      {"empty experts, dropped tail, odd sizes", {0, 70, 1, 0, 129}, 5, 45, 129, OutLayout::kEPQ},
      {"other orientation, alpha", {0, 70, 1, 0, 129}, 5, 45, 129, OutLayout::kEQP, 0.5},
      {"lora_B layout, padded rows", {33, 0, 64, 65}, 2, 45, 8, OutLayout::kLora, 2.0, 3, 5},
      {"no rows at all", {0, 0, 0}, 0, 20, 9, OutLayout::kEPQ},
      {"every row dropped", {0, 0, 0}, 11, 20, 9, OutLayout::kEQP},
      {"tile multiples", {64, 128}, 0, 64, 128, OutLayout::kEPQ},
      {"one row per expert", {1, 1, 1, 1, 1}, 2, 7, 3, OutLayout::kEPQ},
  };
  return all;
}

std::vector<int64_t> out_strides(OutLayout layout, int64_t e, int64_t p, int64_t q) {
  switch (layout) {
    case OutLayout::kEPQ:
      return {p * q, q, 1};
    case OutLayout::kEQP:
      return {p * q, 1, p};
    case OutLayout::kLora:
      return {1, q * e, e};
  }
  return {};
}

template <typename TA, typename TB, typename TG>
void run_wgrad_case(const WgradCase& c, const std::vector<int32_t>& offsets, uint32_t seed,
                    std::vector<TG>* result = nullptr, bool exact = false,
                    kernels::GroupedGemmEngine engine = kernels::GroupedGemmEngine::kSimt,
                    const Gather* a_gather = nullptr, const Gather* b_gather = nullptr) {
  SCOPED_TRACE(c.name);
  using acc = acc_of<TA, TB, TG>;
  const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
  int64_t routed = 0;
  for (const int64_t cnt : c.counts) routed += cnt;
  const int64_t num_rows = routed + c.dropped;
  const int64_t lda = c.p + c.a_pad, ldb = c.q + c.b_pad;
  // A gathered operand is its source of gather->limit rows; ag / bg are the rows the kernel reads.
  for (const Gather* gather : {a_gather, b_gather}) {
    if (gather != nullptr) {
      ASSERT_EQ(static_cast<int64_t>(gather->index.size()), num_rows);
    }
  }
  const std::vector<TA> a =
      random_values<TA>((a_gather != nullptr ? a_gather->limit : num_rows) * lda, seed, exact);
  const std::vector<TB> b =
      random_values<TB>((b_gather != nullptr ? b_gather->limit : num_rows) * ldb, seed + 1, exact);
  const std::vector<TA> a_gathered =
      a_gather != nullptr ? gather_rows(a, lda, *a_gather) : std::vector<TA>{};
  const std::vector<TB> b_gathered =
      b_gather != nullptr ? gather_rows(b, ldb, *b_gather) : std::vector<TB>{};
  const std::vector<TA>& ag = a_gather != nullptr ? a_gathered : a;
  const std::vector<TB>& bg = b_gather != nullptr ? b_gathered : b;
  const std::vector<int64_t> gs = out_strides(c.layout, num_experts, c.p, c.q);
  const int64_t g_elements = num_experts * c.p * c.q;
  DeviceBuffer<TA> d_a(a);
  DeviceBuffer<TB> d_b(b);
  DeviceBuffer<int32_t> d_a_index(a_gather != nullptr ? a_gather->index : std::vector<int32_t>{});
  DeviceBuffer<int32_t> d_b_index(b_gather != nullptr ? b_gather->index : std::vector<int32_t>{});
  DeviceBuffer<int32_t> d_offsets(offsets);
  DeviceBuffer<TG> d_g(poisoned<TG>(g_elements + 2 * kGuard));
  kernels::GroupedGemmWgradArgs<TA, TB, TG> args;
  args.a = d_a.data();
  args.lda = lda;
  args.b = d_b.data();
  args.ldb = ldb;
  if (a_gather != nullptr) args.a_rows = {d_a_index.data(), a_gather->divisor, a_gather->limit};
  if (b_gather != nullptr) args.b_rows = {d_b_index.data(), b_gather->divisor, b_gather->limit};
  args.expert_offsets = d_offsets.data();
  args.g = d_g.data() + kGuard;
  args.g_stride_e = gs[0];
  args.g_stride_p = gs[1];
  args.g_stride_q = gs[2];
  args.num_rows = num_rows;
  args.p = c.p;
  args.q = c.q;
  args.num_experts = num_experts;
  args.alpha = c.alpha;
  args.engine = engine;
  MOEFORGE_ASSERT_CUDA(kernels::launch_grouped_gemm_wgrad(args, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<TG> got = download_guarded(d_g, "g");
  if (result != nullptr) *result = got;

  const std::vector<int64_t> m = clamped_bounds(offsets, num_rows);
  const double u_acc = exact ? 0.0 : std::numeric_limits<acc>::epsilon() / 2;
  const double u_out = unit_roundoff<TG>();
  std::vector<double> got_d, want, tol;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t i = 0; i < c.p; ++i) {
      for (int64_t j = 0; j < c.q; ++j) {
        double sum = 0, magnitude = 0;
        for (int64_t r = m[e]; r < m[e + 1]; ++r) {
          const double prod = as_double(ag[r * lda + i]) * as_double(bg[r * ldb + j]);
          sum += prod;
          magnitude += std::abs(prod);
        }
        const double value = c.alpha * sum;
        got_d.push_back(as_double(got[e * gs[0] + i * gs[1] + j * gs[2]]));
        want.push_back(value);
        tol.push_back(u_out * std::abs(value) + subnormal_rounding<TG>() +
                      2.0 * (m[e + 1] - m[e] + 3) * u_acc * std::abs(c.alpha) * magnitude);
      }
    }
  }
  expect_close(got_d, want, tol, "g");
}

TYPED_TEST(GroupedGemmTest, WgradMatchesReference) {
  using T = TypeParam;
  uint32_t seed = 300;
  for (const WgradCase& c : wgrad_cases()) {
    run_wgrad_case<T, T, T>(c, offsets_of(c.counts), seed += 10);
  }
}

TYPED_TEST(GroupedGemmTest, WgradOver131072Rows) {
  using T = TypeParam;
  const WgradCase c{"131072+ rows", {70000, 0, 70001}, 3, 8, 24, OutLayout::kEPQ};
  run_wgrad_case<T, T, T>(c, offsets_of(c.counts), 8, nullptr, /*exact=*/true);
}

TYPED_TEST(GroupedGemmTest, WgradCorruptOffsetsAreClamped) {
  using T = TypeParam;
  const WgradCase c{"corrupt offsets", {80}, 0, 20, 33, OutLayout::kEPQ};
  run_wgrad_case<T, T, T>(c, {7, 50, 20, -5, 1000}, 9);
}

TYPED_TEST(GroupedGemmTest, WgradDeterministic) {
  using T = TypeParam;
  const WgradCase& c = wgrad_cases()[0];
  std::vector<T> first, second;
  run_wgrad_case<T, T, T>(c, offsets_of(c.counts), 98, &first);
  run_wgrad_case<T, T, T>(c, offsets_of(c.counts), 98, &second);
  ASSERT_EQ(first.size(), second.size());
  EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(T)), 0);
}

// The tensor-core weight gradient (128 x 128 tiles of G_e, rows as the reduction): the SIMT cases
// plus shapes that take its 16-byte cp.async loads, several tiles and partial slabs.
const std::vector<WgradCase>& wmma_wgrad_cases() {
  static const std::vector<WgradCase> all = {
      {"16-byte loads, two p and q tiles, empty experts, dropped tail",
       {0, 200, 1, 0, 129},
       7,
       136,
       256,
       OutLayout::kEPQ},
      {"16-byte loads, [E, out, in] orientation, alpha",
       {70, 0, 33},
       3,
       96,
       136,
       OutLayout::kEQP,
       0.5},
      {"16-byte padded rows", {45, 90}, 0, 128, 120, OutLayout::kEPQ, 1.0, 8, 8},
      {"rows not a multiple of the slab, odd features", {45, 33}, 1, 40, 27, OutLayout::kEPQ},
  };
  return all;
}

TYPED_TEST(GroupedGemmWmmaTest, WgradMatchesReference) {
  using T = TypeParam;
  uint32_t seed = 3000;
  for (const std::vector<WgradCase>* cases : {&wgrad_cases(), &wmma_wgrad_cases()}) {
    for (const WgradCase& c : *cases) {
      run_wgrad_case<T, T, T>(c, offsets_of(c.counts), seed += 10, nullptr, false, kWmma);
    }
  }
}

TYPED_TEST(GroupedGemmWmmaTest, WgradOver131072Rows) {
  using T = TypeParam;
  const WgradCase c{"131072+ rows", {70000, 0, 70001}, 3, 8, 24, OutLayout::kEPQ};
  run_wgrad_case<T, T, T>(c, offsets_of(c.counts), 8, nullptr, /*exact=*/true, kWmma);
}

TYPED_TEST(GroupedGemmWmmaTest, WgradCorruptOffsetsAreClamped) {
  using T = TypeParam;
  const WgradCase c{"corrupt offsets", {80}, 0, 136, 33, OutLayout::kEPQ};
  run_wgrad_case<T, T, T>(c, {7, 50, 20, -5, 1000}, 9, nullptr, false, kWmma);
}

TYPED_TEST(GroupedGemmWmmaTest, WgradDeterministic) {
  using T = TypeParam;
  const WgradCase& c = wmma_wgrad_cases()[0];
  std::vector<T> first, second;
  run_wgrad_case<T, T, T>(c, offsets_of(c.counts), 98, &first, false, kWmma);
  run_wgrad_case<T, T, T>(c, offsets_of(c.counts), 98, &second, false, kWmma);
  ASSERT_EQ(first.size(), second.size());
  EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(T)), 0);
}

TEST(GroupedGemmMixed, WgradFloatTimesHalfTypes) {
  MOEFORGE_SKIP_WITHOUT_GPU();
  const WgradCase c{"float x T -> T", {33, 0, 64, 65}, 2, 8, 45, OutLayout::kEPQ};
  run_wgrad_case<float, __half, __half>(c, offsets_of(c.counts), 11);
  run_wgrad_case<float, __nv_bfloat16, __nv_bfloat16>(c, offsets_of(c.counts), 12);
}

// ---- row gathers (RowGather: x_rows, a_rows, b_rows) -------------------------------------------
constexpr kernels::GroupedGemmEngine kSimt = kernels::GroupedGemmEngine::kSimt;

// A forward case with x_rows = the plan of gather_plan(num_tokens, top_k) (rows.counts and
// rows.dropped come from the plan): x is [num_tokens, ldx] token-major.
struct GatherRowsCase {
  RowsCase rows;
  int64_t num_tokens, top_k;
};

const std::vector<GatherRowsCase>& gather_rows_cases() {
  static const std::vector<GatherRowsCase> all = {
      // ldx 47: element-wise loads on the WMMA path
      {{"x_rows, top_k 2, odd ldx, bias", {}, 0, 45, 131, Layout::kOutIn, true, 1.0, false, 2},
       150,
       2},
      // ldx 104: 16-byte cp.async loads of the gathered rows
      {{"x_rows, top_k 3, 16-byte rows, x W, bias, alpha, accumulate",
        {},
        0,
        96,
        136,
        Layout::kInOut,
        true,
        0.5,
        true,
        8,
        3},
       100,
       3},
      // ldx 48, k 45: the k edge inside a 16-byte chunk
      {{"x_rows, top_k 2, 16-byte rows, k edge inside a chunk, lora_A view, accumulate",
        {},
        0,
        45,
        70,
        Layout::kLoraAT,
        false,
        -1.5,
        true,
        3},
       140,
       2},
  };
  return all;
}

template <typename TX, typename TW, typename TY>
void run_gather_rows_case(const GatherRowsCase& gc, uint32_t seed,
                          kernels::GroupedGemmEngine engine) {
  const GatherPlan plan = gather_plan(gc.num_tokens, gc.top_k, seed);
  RowsCase c = gc.rows;
  c.counts = plan.counts;
  c.dropped = plan.dropped;
  // The shape the case is meant to have: row tiles of both engines (64, 128) end inside expert 1.
  ASSERT_GT(plan.counts[1], 128) << c.name;
  ASSERT_EQ(plan.counts[2], 0) << c.name;
  ASSERT_GT(plan.dropped, 0) << c.name;
  run_rows_case<TX, TW, TY>(c, plan.offsets, seed, nullptr, false, engine, &plan.gather);
}

TYPED_TEST(GroupedGemmTest, RowsGatherMatchReference) {
  using T = TypeParam;
  uint32_t seed = 500;
  for (const GatherRowsCase& c : gather_rows_cases()) {
    run_gather_rows_case<T, T, T>(c, seed += 10, kSimt);
  }
}

TYPED_TEST(GroupedGemmWmmaTest, RowsGatherMatchReference) {
  using T = TypeParam;
  uint32_t seed = 600;
  for (const GatherRowsCase& c : gather_rows_cases()) {
    run_gather_rows_case<T, T, T>(c, seed += 10, kWmma);
    run_gather_rows_case<T, T, float>(c, seed += 10, kWmma);  // split LoRA's x A_e^T
  }
}

TEST(GroupedGemmMixed, RowsGatherIntoFloat) {
  MOEFORGE_SKIP_WITHOUT_GPU();
  const GatherRowsCase& c = gather_rows_cases()[0];
  run_gather_rows_case<__half, __half, float>(c, 700, kSimt);
  run_gather_rows_case<__nv_bfloat16, __nv_bfloat16, float>(c, 710, kSimt);
}

// Out-of-range gather indices (negative, or >= limit * divisor) read rows of zeros: those rows of
// y are exactly the bias (or 0), and the kernels read nothing outside the source, which holds
// exactly `limit` rows (a 1-byte allocation for limit 0), so ASan in the emulator would see it.
template <typename T>
void run_gather_out_of_range(kernels::GroupedGemmEngine engine, uint32_t seed) {
  constexpr int64_t kTokens = 50, kTopK = 3, kRows = kTokens * kTopK;  // valid indices [0, 150)
  const std::vector<int64_t> counts = {135, 0, 10};                    // + 5 dropped rows
  const std::vector<int32_t> offsets = offsets_of(counts);
  std::vector<int32_t> index(kRows);
  std::iota(index.begin(), index.end(), 0);
  std::shuffle(index.begin(), index.end(), std::mt19937(seed));
  // Bad indices on row tile edges inside expert 0 (tiles start at each expert's first row: SIMT
  // 63 / 64 and 127 / 128, WMMA 127 / 128), on expert edges (0, 134, 135, 144) and on a dropped
  // row (147); the extreme valid indices on rows 100 and 101.
  constexpr int32_t kMin = std::numeric_limits<int32_t>::min();
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  const std::vector<std::pair<int64_t, int32_t>> bad = {
      {0, -1},       {63, kMin},  {64, kRows}, {127, kRows + 1}, {128, kMax},
      {134, -kRows}, {135, 1000}, {144, -2},   {147, kRows},
  };
  for (const auto& [r, v] : bad) index[r] = v;
  index[100] = kRows - 1;  // token kTokens - 1
  index[101] = 0;
  const Gather gather{index, kTopK, kTokens};
  const Gather empty_source{index, kTopK, 0};  // limit 0: every row reads zeros
  const struct {
    RowsCase c;
    const Gather* g;
  } runs[] = {
      {{"out-of-range indices, bias, 16-byte rows", counts, 5, 40, 33, Layout::kOutIn, true},
       &gather},
      {{"out-of-range indices, no bias, odd ldx", counts, 5, 40, 33, Layout::kInOut, false, 0.75,
        false, 1},
       &gather},
      {{"limit 0, bias", counts, 5, 40, 33, Layout::kOutIn, true}, &empty_source},
  };
  for (const auto& run : runs) {
    SCOPED_TRACE(run.c.name);
    std::vector<T> y;
    seed += 10;
    run_rows_case<T, T, T>(run.c, offsets, seed, &y, false, engine, run.g);
    ASSERT_EQ(static_cast<int64_t>(y.size()), kRows * run.c.n);
    // run_rows_case draws the bias from seed + 2.
    const std::vector<T> bias = random_values<T>(counts.size() * run.c.n, seed + 2);
    int64_t zero_rows = 0;
    for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        if (source_row(*run.g, r) >= 0) continue;
        ++zero_rows;
        for (int64_t j = 0; j < run.c.n; ++j) {
          const double want = run.c.bias ? as_double(bias[e * run.c.n + j]) : 0.0;
          EXPECT_EQ(as_double(y[r * run.c.n + j]), want) << "row " << r << ", column " << j;
        }
      }
    }
    EXPECT_EQ(zero_rows, run.g->limit == 0 ? offsets.back() : 8);
  }
}

TYPED_TEST(GroupedGemmTest, RowsGatherOutOfRangeReadsZeros) {
  run_gather_out_of_range<TypeParam>(kSimt, 800);
}

TYPED_TEST(GroupedGemmWmmaTest, RowsGatherOutOfRangeReadsZeros) {
  run_gather_out_of_range<TypeParam>(kWmma, 900);
}

// A weight-gradient case with a_rows or b_rows (not both) = the plan of
// gather_plan(num_tokens, top_k): the gathered operand is [num_tokens, ld] token-major, the other
// one expert-sorted. out_of_range: a few routed rows get indices outside [0, limit * divisor)
// (rows of zeros: they add nothing to G_e).
struct GatherWgradCase {
  WgradCase wgrad;  // counts / dropped come from the plan
  int64_t num_tokens, top_k;
  bool gather_b;  // gather b's rows, else a's
  bool out_of_range;
};

// The gathered operand's features (p for a_rows, q for b_rows) span several tiles of both
// engines (64 and 128), so that the tile's feature offset matters.
const std::vector<GatherWgradCase>& gather_wgrad_cases() {
  static const std::vector<GatherWgradCase> all = {
      {{"a_rows, top_k 2, odd lda and ldb", {}, 0, 131, 45, OutLayout::kEPQ, 1.0, 2, 0},
       150,
       2,
       false,
       false},
      {{"b_rows, top_k 3, 16-byte rows, [E, out, in], alpha",
        {},
        0,
        96,
        136,
        OutLayout::kEQP,
        0.5,
        0,
        8},
       100,
       3,
       true,
       false},
      {{"a_rows, 16-byte rows, out-of-range indices, lora_B layout",
        {},
        0,
        136,
        27,
        OutLayout::kLora,
        2.0},
       90,
       2,
       false,
       true},
      {{"b_rows, odd ldb, out-of-range indices", {}, 0, 27, 131, OutLayout::kEPQ, 1.0, 5, 2},
       70,
       3,
       true,
       true},
  };
  return all;
}

template <typename T>
void run_gather_wgrad_case(const GatherWgradCase& gc, uint32_t seed,
                           kernels::GroupedGemmEngine engine) {
  GatherPlan plan = gather_plan(gc.num_tokens, gc.top_k, seed);
  WgradCase c = gc.wgrad;
  c.counts = plan.counts;
  c.dropped = plan.dropped;
  if (gc.out_of_range) {
    Gather& g = plan.gather;
    const int64_t begin1 = plan.offsets[1], end = plan.offsets.back();
    ASSERT_GT(plan.counts[0], 0) << c.name;
    ASSERT_GT(plan.counts[1], 33) << c.name;
    const int32_t past = static_cast<int32_t>(g.limit * g.divisor);  // the first bad index
    g.index[0] = -1;
    g.index[begin1] = std::numeric_limits<int32_t>::min();
    g.index[begin1 + 31] = past;  // the last row of a 32-row slab
    g.index[begin1 + 32] = std::numeric_limits<int32_t>::max();
    g.index[end - 1] = past + 1;
    g.index[end - 2] = past - 1;  // the last valid index
  }
  const Gather* gather = &plan.gather;
  run_wgrad_case<T, T, T>(c, plan.offsets, seed, nullptr, false, engine,
                          gc.gather_b ? nullptr : gather, gc.gather_b ? gather : nullptr);
}

TYPED_TEST(GroupedGemmTest, WgradGatherMatchesReference) {
  uint32_t seed = 1100;
  for (const GatherWgradCase& c : gather_wgrad_cases()) {
    run_gather_wgrad_case<TypeParam>(c, seed += 10, kSimt);
  }
}

TYPED_TEST(GroupedGemmWmmaTest, WgradGatherMatchesReference) {
  uint32_t seed = 1200;
  for (const GatherWgradCase& c : gather_wgrad_cases()) {
    run_gather_wgrad_case<TypeParam>(c, seed += 10, kWmma);
  }
}

// ---- launch_grouped_row_sum -------------------------------------------------------------------
template <typename T>
void run_row_sum_case(const std::vector<int64_t>& counts, int64_t dropped, int64_t q, int64_t b_pad,
                      uint32_t seed, std::vector<T>* result = nullptr, bool exact = false) {
  using acc = acc_type_t<T>;
  const std::vector<int32_t> offsets = offsets_of(counts);
  const int64_t num_experts = static_cast<int64_t>(counts.size());
  const int64_t num_rows = offsets.back() + dropped, ldb = q + b_pad;
  const std::vector<T> b = random_values<T>(num_rows * ldb, seed, exact);
  DeviceBuffer<T> d_b(b), d_out(poisoned<T>(num_experts * q + 2 * kGuard));
  DeviceBuffer<int32_t> d_offsets(offsets);
  MOEFORGE_ASSERT_CUDA(kernels::launch_grouped_row_sum(d_b.data(), ldb, d_offsets.data(),
                                                       d_out.data() + kGuard, q, num_rows, q,
                                                       num_experts, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> got = download_guarded(d_out, "row sums");
  if (result != nullptr) *result = got;
  const double u_acc = exact ? 0.0 : std::numeric_limits<acc>::epsilon() / 2;
  std::vector<double> got_d, want, tol;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t j = 0; j < q; ++j) {
      double sum = 0, magnitude = 0;
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        sum += as_double(b[r * ldb + j]);
        magnitude += std::abs(as_double(b[r * ldb + j]));
      }
      got_d.push_back(as_double(got[e * q + j]));
      want.push_back(sum);
      tol.push_back(unit_roundoff<T>() * std::abs(sum) + subnormal_rounding<T>() +
                    2.0 * (counts[e] + 3) * u_acc * magnitude);
    }
  }
  expect_close(got_d, want, tol, "row sums");
}

TYPED_TEST(GroupedGemmTest, RowSumMatchesReference) {
  using T = TypeParam;
  run_row_sum_case<T>({0, 70, 1, 0, 129}, 5, 129, 0, 1);
  run_row_sum_case<T>({33, 0, 64, 65}, 2, 45, 3, 2);
  run_row_sum_case<T>({0, 0}, 4, 17, 0, 3);
  run_row_sum_case<T>({70000, 0, 70001}, 3, 40, 0, 4, nullptr, /*exact=*/true);
  std::vector<T> first, second;
  run_row_sum_case<T>({0, 70, 1, 0, 129}, 5, 129, 0, 5, &first);
  run_row_sum_case<T>({0, 70, 1, 0, 129}, 5, 129, 0, 5, &second);
  EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(T)), 0);
}

// ---- argument checks: before any CUDA call, so these run without a GPU ------------------------
template <typename T>
void expect_bad_arguments_rejected(kernels::GroupedGemmEngine engine) {
  // Never dereferenced: every call below fails its argument check first.
  T* fake = reinterpret_cast<T*>(uintptr_t{256});
  const int32_t* fake_offsets = reinterpret_cast<const int32_t*>(uintptr_t{256});
  kernels::GroupedGemmArgs<T, T, T> rows;
  rows.engine = engine;
  rows.x = fake;
  rows.w = fake;
  rows.y = fake;
  rows.expert_offsets = fake_offsets;
  rows.num_rows = -1;
  rows.k = rows.n = rows.num_experts = 4;
  EXPECT_EQ(kernels::launch_grouped_gemm(rows, nullptr), cudaErrorInvalidValue);
  rows.num_rows = 4;
  rows.y = nullptr;
  EXPECT_EQ(kernels::launch_grouped_gemm(rows, nullptr), cudaErrorInvalidValue);
  rows.y = fake;
  // A gather (index set) with divisor outside [1, 2^31) or limit < 0.
  rows.x_rows = {fake_offsets, 0, 4};
  EXPECT_EQ(kernels::launch_grouped_gemm(rows, nullptr), cudaErrorInvalidValue) << "divisor 0";
  rows.x_rows.divisor = -3;
  EXPECT_EQ(kernels::launch_grouped_gemm(rows, nullptr), cudaErrorInvalidValue) << "divisor < 0";
  rows.x_rows.divisor = int64_t{1} << 31;  // the kernels divide in 32 bits
  EXPECT_EQ(kernels::launch_grouped_gemm(rows, nullptr), cudaErrorInvalidValue) << "divisor 2^31";
  rows.x_rows = {fake_offsets, 2, -1};
  EXPECT_EQ(kernels::launch_grouped_gemm(rows, nullptr), cudaErrorInvalidValue) << "limit < 0";
  rows.x_rows = {};
  rows.n = 65535 * 64 + 1;  // beyond grid.y
  EXPECT_EQ(kernels::launch_grouped_gemm(rows, nullptr), cudaErrorInvalidValue);
  rows.num_rows = 0;  // nothing to do: success without touching the device
  EXPECT_EQ(kernels::launch_grouped_gemm(rows, nullptr), cudaSuccess);

  kernels::GroupedGemmWgradArgs<T, T, T> wgrad;
  wgrad.a = fake;
  wgrad.b = fake;
  wgrad.g = fake;
  wgrad.expert_offsets = fake_offsets;
  wgrad.num_rows = 4;
  wgrad.p = -2;
  wgrad.q = wgrad.num_experts = 4;
  EXPECT_EQ(kernels::launch_grouped_gemm_wgrad(wgrad, nullptr), cudaErrorInvalidValue);
  wgrad.p = 4;
  wgrad.a_rows = {fake_offsets, 0, 4};
  EXPECT_EQ(kernels::launch_grouped_gemm_wgrad(wgrad, nullptr), cudaErrorInvalidValue)
      << "a divisor 0";
  wgrad.a_rows = {fake_offsets, 1, -2};
  EXPECT_EQ(kernels::launch_grouped_gemm_wgrad(wgrad, nullptr), cudaErrorInvalidValue)
      << "a limit < 0";
  wgrad.a_rows = {};
  wgrad.b_rows = {fake_offsets, 0, 4};
  EXPECT_EQ(kernels::launch_grouped_gemm_wgrad(wgrad, nullptr), cudaErrorInvalidValue)
      << "b divisor 0";
  wgrad.b_rows = {fake_offsets, 3, -1};
  EXPECT_EQ(kernels::launch_grouped_gemm_wgrad(wgrad, nullptr), cudaErrorInvalidValue)
      << "b limit < 0";
  wgrad.b_rows = {};
  wgrad.num_experts = 65536;  // beyond grid.z
  EXPECT_EQ(kernels::launch_grouped_gemm_wgrad(wgrad, nullptr), cudaErrorInvalidValue);
  wgrad.num_experts = 0;
  EXPECT_EQ(kernels::launch_grouped_gemm_wgrad(wgrad, nullptr), cudaSuccess);

  EXPECT_EQ(kernels::launch_grouped_row_sum<T>(fake, 4, fake_offsets, fake, 4, 4, -1, 2, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(kernels::launch_grouped_row_sum<T>(fake, 4, nullptr, fake, 4, 4, 4, 2, nullptr),
            cudaErrorInvalidValue);
}

TEST(GroupedGemmArguments, RejectsBadArguments) {
  for (const kernels::GroupedGemmEngine engine : {kernels::GroupedGemmEngine::kSimt, kWmma}) {
    expect_bad_arguments_rejected<float>(engine);
    expect_bad_arguments_rejected<double>(engine);
    expect_bad_arguments_rejected<__half>(engine);
    expect_bad_arguments_rejected<__nv_bfloat16>(engine);
  }
}

}  // namespace
}  // namespace moeforge::testing
