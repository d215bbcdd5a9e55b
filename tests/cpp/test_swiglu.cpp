// GoogleTest for kernels/swiglu.cu: drives launch_swiglu / launch_swiglu_backward on cudaMalloc'd
// buffers (outputs poisoned with 0xFF bytes, i.e. NaN) for both variants (kSilu: HF layout
// gate = h[:, :I], up = h[:, I:]; kGptOss: interleaved gate = h[:, 0::2], up = h[:, 1::2], clamped
// with alpha = 1.702, limit = 7) and compares with a float64 host reference computed with the
// swiglu_math.h functions in double, within a per-element bound on the error of the kernel's
// acc_type_t arithmetic and its final rounding (see Tolerance). Every case skips without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/swiglu.h"
#include "moeforge/kernels/swiglu_math.h"

namespace moeforge::testing {
namespace {

using kernels::acc_type_t;
using kernels::from_acc;
using kernels::GluVariant;
using kernels::to_acc;

constexpr double kAlpha = 1.702;  // gpt-oss
constexpr double kLimit = 7.0;

// ---- tolerance --------------------------------------------------------------------------------
// A kernel result y_T = round_T(y_acc), where y_acc is the swiglu_math.h formula evaluated in
// acc_type_t (float; double for double) from the very same (already rounded) inputs as the
// reference. So
//
//   |y_T - ref| <= out_rel * |ref| + acc_rel * mag + abs
//
//   acc_rel: error of the acc_t arithmetic, relative to `mag`, the same formula evaluated with
//     every term taken by absolute value (mag = |ref| for the products; for d/dgate it is
//     |grad * up'| * (s + |x * s * (1 - s)|), since s + x s (1 - s) cancels near x = -1.28). The
//     formulas are < 10 roundings deep, exp costs <= 2 ulp (CUDA expf/exp, no fast math), and the
//     rounding of alpha * gate (gpt-oss) is amplified by |alpha * gate| (1 - s) <= 21 for
//     |gate| <= 12: together < 40 eps_acc = 4.8e-6 for float; we allow 1e-5 (about 2x margin, also
//     covering FMA contraction by nvcc, which only removes roundings; the emulated kernels stay
//     below 1.4e-6). For double the same count is < 1e-14; we allow 1e-12.
//   out_rel: the final rounding to T costs at most half an ulp, i.e. u_T |y| with the unit
//     roundoff u_T = 2^-11 (half), 2^-8 (bf16); 2 u_T (between one and two ulps of the output)
//     leaves room for the acc_t error to push y_acc across a rounding boundary. 0 for float and
//     double, whose output rounding is part of acc_rel.
//   abs: half has subnormals below 2^-14, where the output spacing is 2^-24 whatever |ref| is;
//     results that small (e.g. silu(-12) * 0.01) are held to that absolute spacing instead.
//     Negligible (the smallest subnormal) for the other types.
struct Tolerance {
  double out_rel, acc_rel, abs;
};

template <typename T>
Tolerance tolerance() {
  if constexpr (std::is_same_v<T, __half>) {
    return {2.0 / 2048, 1e-5, std::ldexp(1.0, -24)};
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return {2.0 / 256, 1e-5, std::ldexp(1.0, -133)};
  } else if constexpr (std::is_same_v<T, float>) {
    return {0.0, 1e-5, std::ldexp(1.0, -149)};
  } else {
    return {0.0, 1e-12, std::numeric_limits<double>::denorm_min()};
  }
}

// A reference value and the magnitude of the terms that produced it.
struct Ref {
  double value, mag;
};

// ---- float64 references (swiglu_math.h in double) ---------------------------------------------
Ref forward_ref(GluVariant v, double gate, double up) {
  const double a = v == GluVariant::kSilu ? kernels::silu_glu(gate, up)
                                          : kernels::gpt_oss_glu(gate, up, kAlpha, kLimit);
  return {a, std::abs(a)};  // a product of factors: no cancellation
}

// d a / d gate and d a / d up, with magnitudes.
void backward_ref(GluVariant v, double grad, double gate, double up, Ref* dg, Ref* du) {
  if (v == GluVariant::kSilu) {
    kernels::silu_glu_backward(grad, gate, up, &dg->value, &du->value);
    const double s = kernels::sigmoid(gate);
    dg->mag = std::abs(grad * up) * (s + std::abs(gate * s) * (1 - s));
  } else {
    kernels::gpt_oss_glu_backward(grad, gate, up, kAlpha, kLimit, &dg->value, &du->value);
    const double g = std::min(gate, kLimit), u = std::clamp(up, -kLimit, kLimit);
    const double s = kernels::sigmoid(kAlpha * g);
    // Above the limit d/dgate is an exact 0 (a branch, no arithmetic).
    dg->mag =
        gate > kLimit ? 0.0 : std::abs(grad * (u + 1)) * (s + std::abs(kAlpha * g * s) * (1 - s));
  }
  du->mag = std::abs(du->value);
}

template <typename T>
void expect_close(const std::vector<T>& got, const std::vector<Ref>& want,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const Tolerance tol = tolerance<T>();
  int64_t bad = 0;
  for (size_t i = 0; i < got.size() && bad < 10; ++i) {
    const double g = to_acc(got[i]), w = want[i].value;
    const double bound = tol.out_rel * std::abs(w) + tol.acc_rel * want[i].mag + tol.abs;
    // Written as !(x <= bound) so that NaN (an unwritten, poisoned element) fails.
    if (!(std::abs(g - w) <= bound)) {
      ADD_FAILURE() << what << ": element " << i << " got " << g << ", want " << w << " +- "
                    << bound;
      ++bad;
    }
  }
}

// ---- the problem --------------------------------------------------------------------------------
struct Shape {
  int64_t rows, inter;
};

std::string name(const Shape& s, GluVariant v) {
  return std::string(v == GluVariant::kSilu ? "silu" : "gpt_oss") +
         " rows=" + std::to_string(s.rows) + " I=" + std::to_string(s.inter);
}

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> all = {
      {1, 1},      // one element
      {37, 1},     // I = 1: gate and up adjacent in both layouts
      {7, 3},      // odd everything
      {3, 2880},   // gpt-oss-20b/120b intermediate size
      {13, 129},   // odd I, rows * I not a multiple of the block
      {257, 5},    // many short rows, several blocks
      {11, 1001},  // odd wide rows
      {96, 768},   // Qwen3-MoE-like I, 72k outputs (a few hundred blocks)
  };
  return all;
}

const std::vector<GluVariant>& variants() {
  static const std::vector<GluVariant> all = {GluVariant::kSilu, GluVariant::kGptOss};
  return all;
}

// Random non-zero values, rounded to T: mostly in [-4, 4], some in [-12, 12] (beyond +-limit, so
// the gpt-oss clamps and zero gradients are exercised), and some exact specials: +-limit (the
// clamp boundaries, where the gradient still passes), -1 (up + 1 = 0 for gpt-oss).
template <typename T>
std::vector<T> random_values(int64_t n, uint32_t seed) {
  using acc_t = acc_type_t<T>;
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> narrow(-4.0, 4.0), wide(-12.0, 12.0);
  std::uniform_int_distribution<int> pick(0, 15);
  static const double specials[] = {kLimit, -kLimit, -1.0, 7.5, -7.5, 12.0, -12.0};
  std::vector<T> out(n);
  for (auto& v : out) {
    do {
      const int p = pick(gen);
      const double x = p < 10 ? narrow(gen) : p < 14 ? wide(gen) : specials[gen() % 7];
      v = from_acc<T>(static_cast<acc_t>(x));
    } while (to_acc(v) == 0);
  }
  return out;
}

// Columns of the gate and up values of output column j in a row of 2I values.
int64_t gate_col(GluVariant v, int64_t j) {
  return v == GluVariant::kGptOss ? 2 * j : j;
}
int64_t up_col(GluVariant v, int64_t j, int64_t inter) {
  return v == GluVariant::kGptOss ? 2 * j + 1 : inter + j;
}

template <typename T>
class SwigluTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using ElementTypes = ::testing::Types<float, double, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(SwigluTest, ElementTypes);

TYPED_TEST(SwigluTest, ForwardMatchesReference) {
  using T = TypeParam;
  uint32_t seed = 1;
  for (const GluVariant v : variants()) {
    for (const Shape& s : shapes()) {
      SCOPED_TRACE(name(s, v));
      const std::vector<T> h_host = random_values<T>(s.rows * 2 * s.inter, seed++);
      DeviceBuffer<T> h(h_host), out(s.rows * s.inter);
      out.poison(0xFF);
      MOEFORGE_ASSERT_CUDA(kernels::launch_swiglu<T>(h.data(), out.data(), s.rows, s.inter, v,
                                                     kAlpha, kLimit, nullptr));
      MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
      std::vector<Ref> want(s.rows * s.inter);
      for (int64_t r = 0; r < s.rows; ++r) {
        const T* row = h_host.data() + r * 2 * s.inter;
        for (int64_t j = 0; j < s.inter; ++j) {
          want[r * s.inter + j] =
              forward_ref(v, to_acc(row[gate_col(v, j)]), to_acc(row[up_col(v, j, s.inter)]));
        }
      }
      expect_close(out.download(), want, "swiglu");
    }
  }
}

TYPED_TEST(SwigluTest, BackwardMatchesReference) {
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  uint32_t seed = 100;
  for (const GluVariant v : variants()) {
    for (const Shape& s : shapes()) {
      SCOPED_TRACE(name(s, v));
      const std::vector<T> h_host = random_values<T>(s.rows * 2 * s.inter, seed++);
      std::vector<T> grad_host(s.rows * s.inter);
      std::mt19937 gen(seed++);
      std::uniform_real_distribution<double> dist(-2.0, 2.0);
      for (auto& g : grad_host) {
        do {
          g = from_acc<T>(static_cast<acc_t>(dist(gen)));
        } while (to_acc(g) == 0);
      }
      DeviceBuffer<T> h(h_host), grad_a(grad_host), grad_h(s.rows * 2 * s.inter);
      grad_h.poison(0xFF);
      MOEFORGE_ASSERT_CUDA(kernels::launch_swiglu_backward<T>(
          grad_a.data(), h.data(), grad_h.data(), s.rows, s.inter, v, kAlpha, kLimit, nullptr));
      MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
      std::vector<Ref> want(s.rows * 2 * s.inter);
      for (int64_t r = 0; r < s.rows; ++r) {
        const T* row = h_host.data() + r * 2 * s.inter;
        Ref* wrow = want.data() + r * 2 * s.inter;
        for (int64_t j = 0; j < s.inter; ++j) {
          const int64_t gc = gate_col(v, j), uc = up_col(v, j, s.inter);
          backward_ref(v, to_acc(grad_host[r * s.inter + j]), to_acc(row[gc]), to_acc(row[uc]),
                       &wrow[gc], &wrow[uc]);
        }
      }
      expect_close(grad_h.download(), want, "swiglu_backward");
    }
  }
}

TYPED_TEST(SwigluTest, GptOssClampBoundaries) {
  // One row of hand-picked (gate, up) pairs around the clamps. Outside [-limit, limit] (up) or
  // above limit (gate) the gradient is exactly 0; on the boundary it passes (torch.clamp).
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  const std::vector<double> gates = {7.0, 7.5, 12.0, -9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 7.0, -7.0};
  const std::vector<double> ups = {0.5, 0.5, 0.5, 0.5, 7.0, 7.5, -7.0, -7.5, -1.0, 7.0, 12.0};
  const int64_t inter = static_cast<int64_t>(gates.size());
  std::vector<T> h_host(2 * inter), grad_host(inter, from_acc<T>(acc_t(1.5)));
  for (int64_t j = 0; j < inter; ++j) {
    h_host[2 * j] = from_acc<T>(static_cast<acc_t>(gates[j]));
    h_host[2 * j + 1] = from_acc<T>(static_cast<acc_t>(ups[j]));
  }
  DeviceBuffer<T> h(h_host), grad_a(grad_host), out(inter), grad_h(2 * inter);
  out.poison(0xFF);
  grad_h.poison(0xFF);
  MOEFORGE_ASSERT_CUDA(kernels::launch_swiglu<T>(h.data(), out.data(), 1, inter,
                                                 GluVariant::kGptOss, kAlpha, kLimit, nullptr));
  MOEFORGE_ASSERT_CUDA(kernels::launch_swiglu_backward<T>(grad_a.data(), h.data(), grad_h.data(), 1,
                                                          inter, GluVariant::kGptOss, kAlpha,
                                                          kLimit, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> a = out.download(), gh = grad_h.download();
  std::vector<Ref> want_a(inter), want_gh(2 * inter);
  for (int64_t j = 0; j < inter; ++j) {
    want_a[j] = forward_ref(GluVariant::kGptOss, gates[j], ups[j]);
    backward_ref(GluVariant::kGptOss, 1.5, gates[j], ups[j], &want_gh[2 * j], &want_gh[2 * j + 1]);
  }
  expect_close(a, want_a, "swiglu");
  expect_close(gh, want_gh, "swiglu_backward");
  // The clamped forward equals the forward at the clamp; the gradients are exactly 0 or not.
  EXPECT_EQ(to_acc(a[1]), to_acc(a[0]));  // gate 7.5 acts as 7
  EXPECT_EQ(to_acc(a[2]), to_acc(a[0]));  // gate 12 acts as 7
  EXPECT_EQ(to_acc(a[5]), to_acc(a[4]));  // up 7.5 acts as 7
  EXPECT_EQ(to_acc(a[7]), to_acc(a[6]));  // up -7.5 acts as -7
  EXPECT_EQ(to_acc(a[8]), 0.0);           // up + 1 = 0
  EXPECT_NE(to_acc(gh[2 * 0]), 0.0);      // gate == limit: passes
  EXPECT_EQ(to_acc(gh[2 * 1]), 0.0);      // gate > limit: blocked
  EXPECT_EQ(to_acc(gh[2 * 2]), 0.0);
  EXPECT_NE(to_acc(gh[2 * 3]), 0.0);      // gate below -limit: not clamped
  EXPECT_NE(to_acc(gh[2 * 4 + 1]), 0.0);  // up == limit: passes
  EXPECT_EQ(to_acc(gh[2 * 5 + 1]), 0.0);  // up > limit: blocked
  EXPECT_NE(to_acc(gh[2 * 6 + 1]), 0.0);  // up == -limit: passes
  EXPECT_EQ(to_acc(gh[2 * 7 + 1]), 0.0);  // up < -limit: blocked
  EXPECT_EQ(to_acc(gh[2 * 8]), 0.0);      // up + 1 = 0: d/dgate is 0
  EXPECT_NE(to_acc(gh[2 * 9]), 0.0);      // both on the boundary: both pass
  EXPECT_NE(to_acc(gh[2 * 9 + 1]), 0.0);
  EXPECT_EQ(to_acc(gh[2 * 10 + 1]), 0.0);
}

TYPED_TEST(SwigluTest, EmptyLaunchesWriteNothing) {
  // rows = 0 or I = 0: success, no launch, not a byte written.
  using T = TypeParam;
  constexpr int64_t kElems = 64;
  DeviceBuffer<T> h(kElems), grad_a(kElems), out(kElems), grad_h(kElems);
  h.poison(0x3C);
  grad_a.poison(0x3C);
  for (const GluVariant v : variants()) {
    for (const Shape& s : {Shape{0, 16}, Shape{5, 0}, Shape{0, 0}}) {
      SCOPED_TRACE(name(s, v));
      out.poison(0xFF);
      grad_h.poison(0xFF);
      MOEFORGE_ASSERT_CUDA(kernels::launch_swiglu<T>(h.data(), out.data(), s.rows, s.inter, v,
                                                     kAlpha, kLimit, nullptr));
      MOEFORGE_ASSERT_CUDA(kernels::launch_swiglu_backward<T>(
          grad_a.data(), h.data(), grad_h.data(), s.rows, s.inter, v, kAlpha, kLimit, nullptr));
      MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
      for (const DeviceBuffer<T>* buf : {&out, &grad_h}) {
        const std::vector<T> got = buf->download();
        std::vector<unsigned char> bytes(got.size() * sizeof(T));
        std::memcpy(bytes.data(), got.data(), bytes.size());
        for (size_t i = 0; i < bytes.size(); ++i) {
          ASSERT_EQ(bytes[i], 0xFF) << "byte " << i << " of an output was written";
        }
      }
    }
  }
}

TYPED_TEST(SwigluTest, NonDefaultStream) {
  using T = TypeParam;
  const Shape s{9, 33};
  const std::vector<T> h_host = random_values<T>(s.rows * 2 * s.inter, 77);
  DeviceBuffer<T> h(h_host), out(s.rows * s.inter);
  out.poison(0xFF);
  cudaStream_t stream = nullptr;
  MOEFORGE_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());  // the poison memset ran on the legacy stream
  EXPECT_EQ(kernels::launch_swiglu<T>(h.data(), out.data(), s.rows, s.inter, GluVariant::kGptOss,
                                      kAlpha, kLimit, stream),
            cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaStreamDestroy(stream);
  std::vector<Ref> want(s.rows * s.inter);
  for (int64_t i = 0; i < s.rows * s.inter; ++i) {
    want[i] = forward_ref(GluVariant::kGptOss, to_acc(h_host[2 * i]), to_acc(h_host[2 * i + 1]));
  }
  expect_close(out.download(), want, "swiglu");
}

// Size checks happen before any CUDA call, so this one needs no device and runs everywhere.
template <typename T>
void expect_negative_sizes_rejected() {
  for (const GluVariant v : variants()) {
    EXPECT_EQ(kernels::launch_swiglu<T>(nullptr, nullptr, -1, 8, v, kAlpha, kLimit, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(kernels::launch_swiglu<T>(nullptr, nullptr, 4, -8, v, kAlpha, kLimit, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(kernels::launch_swiglu_backward<T>(nullptr, nullptr, nullptr, -1, 8, v, kAlpha,
                                                 kLimit, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(kernels::launch_swiglu_backward<T>(nullptr, nullptr, nullptr, 4, -8, v, kAlpha,
                                                 kLimit, nullptr),
              cudaErrorInvalidValue);
    // A negative size is refused even when the other one is 0 (rows * I == 0).
    EXPECT_EQ(kernels::launch_swiglu<T>(nullptr, nullptr, -1, 0, v, kAlpha, kLimit, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(kernels::launch_swiglu_backward<T>(nullptr, nullptr, nullptr, 0, -3, v, kAlpha,
                                                 kLimit, nullptr),
              cudaErrorInvalidValue);
  }
}

TEST(SwigluArguments, RejectsNegativeSizes) {
  expect_negative_sizes_rejected<float>();
  expect_negative_sizes_rejected<double>();
  expect_negative_sizes_rejected<__half>();
  expect_negative_sizes_rejected<__nv_bfloat16>();
}

}  // namespace
}  // namespace moeforge::testing
