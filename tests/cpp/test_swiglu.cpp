// GoogleTest for kernels/swiglu.cu: drives launch_swiglu / launch_swiglu_backward /
// launch_weighted_swiglu_backward on cudaMalloc'd buffers (outputs poisoned with 0xFF bytes, i.e.
// NaN) for both variants (kSilu: HF layout gate = h[:, :I], up = h[:, I:]; kGptOss: interleaved
// gate = h[:, 0::2], up = h[:, 1::2], clamped with alpha = 1.702, limit = 7) and compares with a
// float64 host reference computed with the swiglu_math.h functions in double, within a
// per-element bound on the error of the kernel's acc_type_t arithmetic and its final rounding (see
// Tolerance; the weighted backward's bounds are derived next to its cases). Every case that
// launches skips without a GPU; the argument checks run everywhere.
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
void expect_close(const std::vector<T>& got, const std::vector<Ref>& want, const std::string& what,
                  const Tolerance& tol = tolerance<T>()) {
  ASSERT_EQ(got.size(), want.size()) << what;
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

// The forward's 16-byte vector path (I a multiple of the vector width, aligned pointers) and its
// scalar path (taken here by shifting h and out one element off 16-byte alignment) write the same
// bits: each element's arithmetic is the same.
TYPED_TEST(SwigluTest, ForwardVectorAndScalarPathsAgreeBitwise) {
  using T = TypeParam;
  uint32_t seed = 900;
  for (const GluVariant v : variants()) {
    for (const Shape s : {Shape{5, 64}, Shape{3, 2880}, Shape{33, 768}}) {
      SCOPED_TRACE(name(s, v));
      const int64_t n_in = s.rows * 2 * s.inter, n_out = s.rows * s.inter;
      const std::vector<T> h_host = random_values<T>(n_in, seed++);
      std::vector<T> shifted_host(n_in + 1, from_acc<T>(acc_type_t<T>(1)));
      std::copy(h_host.begin(), h_host.end(), shifted_host.begin() + 1);
      DeviceBuffer<T> h(h_host), h_shifted(shifted_host), out(n_out), out_shifted(n_out + 1);
      out.poison(0xFF);
      out_shifted.poison(0xFF);
      MOEFORGE_ASSERT_CUDA(kernels::launch_swiglu<T>(h.data(), out.data(), s.rows, s.inter, v,
                                                     kAlpha, kLimit, nullptr));
      MOEFORGE_ASSERT_CUDA(kernels::launch_swiglu<T>(h_shifted.data() + 1, out_shifted.data() + 1,
                                                     s.rows, s.inter, v, kAlpha, kLimit, nullptr));
      MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
      const std::vector<T> a = out.download(), b = out_shifted.download();
      ASSERT_EQ(std::memcmp(a.data(), b.data() + 1, n_out * sizeof(T)), 0);
      EXPECT_TRUE(std::isnan(static_cast<double>(to_acc(b[0]))));  // nothing written before out
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

// ---- weighted backward (launch_weighted_swiglu_backward) ---------------------------------------
// Per row r with routing weight w = row_weights[r] (acc_t) and dy = grad_aw[r, :]:
//   grad_h[r, :]        = (da/dh)^T (w dy)                  (T)
//   weighted_act[r, :]  = w a(h[r, :])                      (T)
//   grad_row_weights[r] = sum_j dy_j a_j                    (acc_t, one fixed-order reduction)
//
// Bounds, with u = unit_roundoff<acc_t>() (2^-24; 2^-53 for double) and Tolerance as above:
//   grad_h: the kernel rounds w * dy once in acc_t and then runs the unweighted backward formula
//     on it. The reference feeds the exact w * dy (a product of a float and a T value is exact in
//     double; for double the reference rounds it exactly as the kernel does) to backward_ref.
//     d/dgate and d/dup are linear in grad, so that one extra rounding costs u |value| <= u * mag:
//     the backward bound with acc_rel + u (2x margin of acc_rel unchanged).
//   weighted_act: a costs acc_rel |a| (the forward bound), the product w * a one more rounding, u,
//     then the rounding to T (out_rel, abs): reference |w a|, acc_rel + u. (The cross term
//     acc_rel * u < 1e-12 relative is inside acc_rel's 2x margin.)
//   grad_row_weights: each term dy_j * a_j enters with a_j (1 + theta_j), |theta_j| <= acc_rel
//     (dy_j is exact: a T value read into acc_t). The kernel rounds the product once and adds it
//     in a fixed tree: each of the 256 threads sums its columns j = t, t + 256, ... in order
//     (ceil(I / 256) additions counting the one into the initial 0), then 5 warp-butterfly levels,
//     then the 8 warp totals in order (8 additions into a 0). So each term meets at most
//     d = ceil(I / 256) + 13 additions; at most I - 1 of them can round (one adding a subtree of
//     exact zeros, i.e. the initial 0 or an idle thread, is exact). With k = 1 + min(I - 1, d)
//     roundings per term (FMA contraction, dot = fma(dy, a, dot), only removes some), the standard
//     bound for a summation tree gives
//       |got - ref| <= ((1 + acc_rel)(1 + gamma_k) - 1) * sum_j |dy_j a_j| + 2 I * denorm_min,
//     gamma_k = k u / (1 - k u); the last term bounds underflow (never reached by these values).
//     The reference sums dy_j * a_ref_j in long double (64-bit significand on x86-64), so its own
//     summation error (~I 2^-64) is far below even double's acc_rel.
template <typename T>
Tolerance weighted_tolerance() {
  Tolerance tol = tolerance<T>();
  tol.acc_rel += unit_roundoff<acc_type_t<T>>();
  return tol;
}

double gamma_bound(int64_t k, double u) {
  return static_cast<double>(k) * u / (1.0 - static_cast<double>(k) * u);
}

// Upper bound on the roundings one product dy_j * a_j meets on its way to grad_row_weights[r]
// (the product included), following the kernels' reduction orders (see above): the CTA-per-row
// kernel (threads stride over columns, butterfly, warp totals) or the warp-per-row vector kernel
// (each lane sums its vectors of `vec` columns in turn, then a butterfly).
int64_t dot_roundings(int64_t inter, int64_t vec) {
  constexpr int64_t kCtaThreads = 256, kWarps = kCtaThreads / 32, kButterflyLevels = 5;
  const int64_t cta = (inter + kCtaThreads - 1) / kCtaThreads + kButterflyLevels + kWarps;
  const int64_t warp = (inter / vec + 31) / 32 * vec + kButterflyLevels;
  return 1 + std::min(inter - 1, std::max(cta, warp));
}

template <typename T>
struct WeightedInputs {
  std::vector<T> grad_aw, h;               // [rows, I], [rows, 2I]
  std::vector<acc_type_t<T>> row_weights;  // [rows]
};

template <typename T>
struct WeightedOutputs {
  std::vector<T> grad_h, weighted_act;          // weighted_act is empty when it was not requested
  std::vector<acc_type_t<T>> grad_row_weights;  // [rows]
};

// h as random_values; grad_aw non-zero in [-2, 2]; row weights in acc_t (generally not
// representable in T): routing-like values in [1/64, 1], and by row index an exact 0
// (r % 5 == 1) and negative weights in [-2, -1/64] (r % 5 == 3).
template <typename T>
WeightedInputs<T> weighted_inputs(const Shape& s, uint32_t seed) {
  using acc_t = acc_type_t<T>;
  WeightedInputs<T> in;
  in.h = random_values<T>(s.rows * 2 * s.inter, seed);
  std::mt19937 gen(seed + 7919);
  std::uniform_real_distribution<double> grad(-2.0, 2.0), weight(1.0 / 64, 1.0);
  in.grad_aw.resize(s.rows * s.inter);
  for (auto& g : in.grad_aw) {
    do {
      g = from_acc<T>(static_cast<acc_t>(grad(gen)));
    } while (to_acc(g) == 0);
  }
  in.row_weights.resize(s.rows);
  for (int64_t r = 0; r < s.rows; ++r) {
    const double w = weight(gen);
    in.row_weights[r] = static_cast<acc_t>(r % 5 == 1 ? 0.0 : r % 5 == 3 ? -2.0 * w : w);
  }
  return in;
}

// `values` after `shift` leading filler elements (1).
template <typename T>
std::vector<T> shifted(const std::vector<T>& values, int64_t shift) {
  std::vector<T> out(values.size() + shift, from_acc<T>(acc_type_t<T>(1)));
  std::copy(values.begin(), values.end(), out.begin() + shift);
  return out;
}

// Launches on fresh buffers, every output poisoned (0xFF, NaN) first. shift = 1 moves the
// element buffers one element off 16-byte alignment (the kernel's scalar path). in_place: grad_h
// written over h (the same pointer), as weighted_swiglu_backward_ launches it.
template <typename T>
void run_weighted(const WeightedInputs<T>& in, const Shape& s, GluVariant v, bool want_act,
                  WeightedOutputs<T>* out, int64_t shift = 0, bool in_place = false) {
  using acc_t = acc_type_t<T>;
  const int64_t n_act = want_act ? s.rows * s.inter : 0;
  DeviceBuffer<T> grad_aw(shifted(in.grad_aw, shift)), h(shifted(in.h, shift)),
      grad_h(s.rows * 2 * s.inter + shift), act(n_act + shift);
  DeviceBuffer<acc_t> row_weights(in.row_weights), grad_row_weights(s.rows);
  grad_h.poison(0xFF);
  act.poison(0xFF);
  grad_row_weights.poison(0xFF);
  T* const grad_h_out = in_place ? h.data() + shift : grad_h.data() + shift;
  MOEFORGE_ASSERT_CUDA(kernels::launch_weighted_swiglu_backward<T>(
      grad_aw.data() + shift, h.data() + shift, row_weights.data(), grad_h_out,
      want_act ? act.data() + shift : nullptr, grad_row_weights.data(), s.rows, s.inter, v, kAlpha,
      kLimit, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> gh = in_place ? h.download() : grad_h.download(), a = act.download();
  out->grad_h.assign(gh.begin() + shift, gh.end());
  out->weighted_act = want_act ? std::vector<T>(a.begin() + shift, a.end()) : std::vector<T>{};
  out->grad_row_weights = grad_row_weights.download();
}

// Checks every output of run_weighted against the float64 reference within the bounds above.
template <typename T>
void expect_weighted_matches_reference(const WeightedInputs<T>& in, const Shape& s, GluVariant v,
                                       const WeightedOutputs<T>& out) {
  using acc_t = acc_type_t<T>;
  const int64_t inter = s.inter;
  std::vector<Ref> want_gh(s.rows * 2 * inter), want_act(s.rows * inter);
  std::vector<double> got_dot(s.rows), want_dot(s.rows), tol_dot(s.rows);
  const double u = unit_roundoff<acc_t>();
  const double dot_rel =
      (1 + tolerance<T>().acc_rel) * (1 + gamma_bound(dot_roundings(inter, 16 / sizeof(T)), u)) - 1;
  for (int64_t r = 0; r < s.rows; ++r) {
    const T* row = in.h.data() + r * 2 * inter;
    const double w = in.row_weights[r];
    long double dot = 0, sum_abs = 0;
    for (int64_t j = 0; j < inter; ++j) {
      const int64_t gc = gate_col(v, j), uc = up_col(v, j, inter);
      const double g = to_acc(row[gc]), up = to_acc(row[uc]);
      const double dy = to_acc(in.grad_aw[r * inter + j]);
      backward_ref(v, w * dy, g, up, &want_gh[r * 2 * inter + gc], &want_gh[r * 2 * inter + uc]);
      const Ref a = forward_ref(v, g, up);
      want_act[r * inter + j] = {w * a.value, std::abs(w) * a.mag};
      const long double term = static_cast<long double>(dy) * a.value;
      dot += term;
      sum_abs += std::abs(term);
    }
    got_dot[r] = out.grad_row_weights[r];
    want_dot[r] = static_cast<double>(dot);
    tol_dot[r] = dot_rel * static_cast<double>(sum_abs) +
                 2.0 * static_cast<double>(inter) * std::numeric_limits<acc_t>::denorm_min();
  }
  const Tolerance tol = weighted_tolerance<T>();
  expect_close(out.grad_h, want_gh, "weighted grad_h", tol);
  if (!out.weighted_act.empty()) expect_close(out.weighted_act, want_act, "weighted_act", tol);
  testing::expect_close(got_dot, want_dot, tol_dot, "grad_row_weights");  // cuda_test_utils.h
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

const std::vector<Shape>& weighted_shapes() {
  static const std::vector<Shape> all = {
      {1, 1},      // one element
      {37, 1},     // I = 1: one active thread per CTA, the rest reduce zeros
      {7, 3},      // odd everything
      {2, 31},     // I below a warp
      {13, 129},   // odd I, not a multiple of 32
      {5, 256},    // exactly one column per thread
      {4, 257},    // one thread takes a second column
      {11, 700},   // I > 256, not a multiple of 32: threads stride over 2-3 columns
      {3, 2880},   // gpt-oss intermediate size: 11-12 columns per thread
      {517, 6},    // many rows: a CTA each (grid-stride only beyond 2^20 rows, see below)
      {300, 230},  // many rows, every warp busy, the last one partly
  };
  return all;
}

TYPED_TEST(SwigluTest, WeightedBackwardMatchesReference) {
  using T = TypeParam;
  uint32_t seed = 300;
  for (const GluVariant v : variants()) {
    for (const Shape& s : weighted_shapes()) {
      SCOPED_TRACE(name(s, v));
      const WeightedInputs<T> in = weighted_inputs<T>(s, seed++);
      WeightedOutputs<T> out;
      ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &out));
      expect_weighted_matches_reference(in, s, v, out);
    }
  }
}

// The 16-byte vector path (a warp per row: I a multiple of the vector width, aligned buffers)
// and the scalar path (a CTA per row; taken by shifting the buffers one element) write bitwise
// the same grad_h and weighted_act (same per-element arithmetic); grad_row_weights sums in a
// different fixed order, each within the reference's bound.
TYPED_TEST(SwigluTest, WeightedBackwardVectorAndScalarPathsAgree) {
  using T = TypeParam;
  uint32_t seed = 350;
  for (const GluVariant v : variants()) {
    for (const Shape& s : {Shape{33, 768}, Shape{5, 2880}, Shape{9, 64}, Shape{3, 16}}) {
      SCOPED_TRACE(name(s, v));
      const WeightedInputs<T> in = weighted_inputs<T>(s, seed++);
      WeightedOutputs<T> vec, scalar;
      ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &vec));
      ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &scalar, /*shift=*/1));
      expect_weighted_matches_reference(in, s, v, vec);
      expect_weighted_matches_reference(in, s, v, scalar);
      EXPECT_TRUE(same_bytes(vec.grad_h, scalar.grad_h));
      EXPECT_TRUE(same_bytes(vec.weighted_act, scalar.weighted_act));
    }
  }
}

// grad_h written over h (the launcher's contract allows grad_h == h): bitwise the out-of-place
// results on both paths and both variants, since every element is read before it is overwritten.
TYPED_TEST(SwigluTest, WeightedBackwardInPlaceEqualsOutOfPlace) {
  using T = TypeParam;
  uint32_t seed = 370;
  for (const GluVariant v : variants()) {
    for (const Shape& s : {Shape{33, 768}, Shape{5, 2880}, Shape{13, 129}, Shape{517, 6}}) {
      for (const int64_t shift : {0, 1}) {
        SCOPED_TRACE(name(s, v) + (shift ? " (scalar path)" : ""));
        const WeightedInputs<T> in = weighted_inputs<T>(s, seed++);
        WeightedOutputs<T> separate, in_place;
        ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &separate, shift));
        ASSERT_NO_FATAL_FAILURE(
            run_weighted(in, s, v, /*want_act=*/true, &in_place, shift, /*in_place=*/true));
        EXPECT_TRUE(same_bytes(separate.grad_h, in_place.grad_h));
        EXPECT_TRUE(same_bytes(separate.weighted_act, in_place.weighted_act));
        EXPECT_TRUE(same_bytes(separate.grad_row_weights, in_place.grad_row_weights));
        expect_weighted_matches_reference(in, s, v, in_place);
      }
    }
  }
}

TYPED_TEST(SwigluTest, WeightedBackwardWithoutActivation) {
  // weighted_act == nullptr: grad_h and grad_row_weights are still right, and bitwise the same as
  // with weighted_act requested.
  using T = TypeParam;
  uint32_t seed = 400;
  for (const GluVariant v : variants()) {
    for (const Shape& s : {Shape{7, 3}, Shape{11, 700}}) {
      SCOPED_TRACE(name(s, v));
      const WeightedInputs<T> in = weighted_inputs<T>(s, seed++);
      WeightedOutputs<T> with, without;
      ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &with));
      ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/false, &without));
      expect_weighted_matches_reference(in, s, v, without);
      EXPECT_TRUE(same_bytes(with.grad_h, without.grad_h));
      EXPECT_TRUE(same_bytes(with.grad_row_weights, without.grad_row_weights));
    }
  }
}

TYPED_TEST(SwigluTest, WeightedBackwardDeterministic) {
  // The same inputs twice: every output bitwise identical (fixed-order reduction, no atomics).
  using T = TypeParam;
  for (const GluVariant v : variants()) {
    const Shape s{41, 700};
    SCOPED_TRACE(name(s, v));
    const WeightedInputs<T> in = weighted_inputs<T>(s, 500);
    WeightedOutputs<T> first, second;
    ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &first));
    ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &second));
    EXPECT_TRUE(same_bytes(first.grad_h, second.grad_h));
    EXPECT_TRUE(same_bytes(first.weighted_act, second.weighted_act));
    EXPECT_TRUE(same_bytes(first.grad_row_weights, second.grad_row_weights));
  }
}

TYPED_TEST(SwigluTest, WeightedBackwardZeroAndNegativeWeights) {
  // Every row holds the same h and grad_aw, with weights 1, -1, 0, -0, 0.3, -2.5. grad_row_weights
  // does not depend on w: bitwise the same in every row, also where w = 0. Rounding is symmetric,
  // so w = -1 gives exactly the negated grad_h and weighted_act of w = 1; w = +-0 gives exact
  // zeros there.
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  const std::vector<double> weights = {1.0, -1.0, 0.0, -0.0, 0.3, -2.5};
  for (const GluVariant v : variants()) {
    const Shape s{static_cast<int64_t>(weights.size()), 300};
    SCOPED_TRACE(name(s, v));
    const WeightedInputs<T> one = weighted_inputs<T>(Shape{1, s.inter}, 600);
    WeightedInputs<T> in;
    for (const double w : weights) {
      in.h.insert(in.h.end(), one.h.begin(), one.h.end());
      in.grad_aw.insert(in.grad_aw.end(), one.grad_aw.begin(), one.grad_aw.end());
      in.row_weights.push_back(static_cast<acc_t>(w));
    }
    WeightedOutputs<T> out;
    ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &out));
    expect_weighted_matches_reference(in, s, v, out);
    const int64_t gh_row = 2 * s.inter, act_row = s.inter;
    for (int64_t k = 0; k < gh_row; ++k) {
      const double pos = to_acc(out.grad_h[k]);
      ASSERT_EQ(to_acc(out.grad_h[gh_row + k]), -pos) << "grad_h, w = -1, column " << k;
      ASSERT_EQ(to_acc(out.grad_h[2 * gh_row + k]), 0.0) << "grad_h, w = 0, column " << k;
      ASSERT_EQ(to_acc(out.grad_h[3 * gh_row + k]), 0.0) << "grad_h, w = -0, column " << k;
    }
    for (int64_t j = 0; j < act_row; ++j) {
      const double pos = to_acc(out.weighted_act[j]);
      ASSERT_EQ(to_acc(out.weighted_act[act_row + j]), -pos) << "weighted_act, w = -1, " << j;
      ASSERT_EQ(to_acc(out.weighted_act[2 * act_row + j]), 0.0) << "weighted_act, w = 0, " << j;
      ASSERT_EQ(to_acc(out.weighted_act[3 * act_row + j]), 0.0) << "weighted_act, w = -0, " << j;
    }
    // Row 0's value is finite and non-zero (checked above), so == is bitwise equality.
    EXPECT_NE(out.grad_row_weights[0], acc_t(0));
    for (int64_t r = 1; r < s.rows; ++r) {
      EXPECT_EQ(out.grad_row_weights[r], out.grad_row_weights[0]) << "row " << r;
    }
  }
}

TYPED_TEST(SwigluTest, WeightedBackwardEmptyShapes) {
  // rows = 0: success, not a byte written (null pointers included). I = 0: grad_row_weights is
  // the empty dot product, an exact 0 in every row; nothing else is written, and the [rows, 0]
  // operands may be null.
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  constexpr int64_t kElems = 64;
  DeviceBuffer<T> h(kElems), grad_aw(kElems), grad_h(kElems), act(kElems);
  DeviceBuffer<acc_t> row_weights(kElems), grad_row_weights(kElems);
  h.poison(0x3C);
  grad_aw.poison(0x3C);
  row_weights.poison(0x3C);
  const auto expect_untouched = [](const auto& buf, const char* what) {
    const auto got = buf.download();
    std::vector<unsigned char> bytes(got.size() * sizeof(got[0]));
    std::memcpy(bytes.data(), got.data(), bytes.size());
    for (size_t i = 0; i < bytes.size(); ++i) {
      ASSERT_EQ(bytes[i], 0xFF) << "byte " << i << " of " << what << " was written";
    }
  };
  for (const GluVariant v : variants()) {
    SCOPED_TRACE(v == GluVariant::kSilu ? "silu" : "gpt_oss");
    grad_h.poison(0xFF);
    act.poison(0xFF);
    grad_row_weights.poison(0xFF);
    for (const int64_t inter : {int64_t{0}, int64_t{16}}) {
      MOEFORGE_ASSERT_CUDA(kernels::launch_weighted_swiglu_backward<T>(
          grad_aw.data(), h.data(), row_weights.data(), grad_h.data(), act.data(),
          grad_row_weights.data(), 0, inter, v, kAlpha, kLimit, nullptr));
      MOEFORGE_ASSERT_CUDA(kernels::launch_weighted_swiglu_backward<T>(
          nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, inter, v, kAlpha, kLimit,
          nullptr));
    }
    MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
    expect_untouched(grad_h, "grad_h");
    expect_untouched(act, "weighted_act");
    expect_untouched(grad_row_weights, "grad_row_weights");

    constexpr int64_t kRows = 5;
    MOEFORGE_ASSERT_CUDA(kernels::launch_weighted_swiglu_backward<T>(
        grad_aw.data(), h.data(), row_weights.data(), grad_h.data(), act.data(),
        grad_row_weights.data(), kRows, 0, v, kAlpha, kLimit, nullptr));
    MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
    expect_untouched(grad_h, "grad_h");
    expect_untouched(act, "weighted_act");
    std::vector<acc_t> grw = grad_row_weights.download();
    for (int64_t r = 0; r < kElems; ++r) {
      if (r < kRows) {
        EXPECT_EQ(grw[r], acc_t(0)) << "row " << r;
      } else {
        unsigned char bytes[sizeof(acc_t)];
        std::memcpy(bytes, &grw[r], sizeof(acc_t));
        for (const unsigned char b : bytes) ASSERT_EQ(b, 0xFF) << "grad_row_weights[" << r << "]";
      }
    }
    grad_row_weights.poison(0xFF);
    MOEFORGE_ASSERT_CUDA(kernels::launch_weighted_swiglu_backward<T>(
        nullptr, nullptr, row_weights.data(), nullptr, nullptr, grad_row_weights.data(), kRows, 0,
        v, kAlpha, kLimit, nullptr));
    MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
    grw = grad_row_weights.download();
    for (int64_t r = 0; r < kRows; ++r) EXPECT_EQ(grw[r], acc_t(0)) << "row " << r;
  }
}

TYPED_TEST(SwigluTest, WeightedBackwardGridStrideOver131072Rows) {
  // The CTA-per-row launcher starts min(rows, 2^20) CTAs, so only more than 2^20 rows make a CTA
  // take a second row (grid-stride); the vector kernel (I = 16: a multiple of every vector width)
  // runs 2^14 CTAs of 8 warps, so past 131072 rows its warps take several. Left to the GPU:
  // scripts/test_emulator.sh skips "Over131072" cases.
  using T = TypeParam;
  for (const Shape s : {Shape{(int64_t{1} << 20) + 37, 3}, Shape{(int64_t{1} << 18) + 37, 16}}) {
    for (const GluVariant v : variants()) {
      SCOPED_TRACE(name(s, v));
      const WeightedInputs<T> in = weighted_inputs<T>(s, v == GluVariant::kSilu ? 700 : 701);
      WeightedOutputs<T> out;
      ASSERT_NO_FATAL_FAILURE(run_weighted(in, s, v, /*want_act=*/true, &out));
      expect_weighted_matches_reference(in, s, v, out);
    }
  }
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

// The weighted backward's argument checks, also before any CUDA call. The pointers that are not
// under test point at host memory, which is never touched since every call fails up front.
template <typename T>
void expect_weighted_bad_arguments_rejected() {
  using acc_t = acc_type_t<T>;
  std::vector<T> buf(64);
  std::vector<acc_t> accs(8);
  T* const p = buf.data();
  acc_t* const a = accs.data();
  const auto launch = [](const T* grad_aw, const T* h, const acc_t* w, T* grad_h, T* act,
                         acc_t* grw, int64_t rows, int64_t inter, GluVariant v) {
    return kernels::launch_weighted_swiglu_backward<T>(grad_aw, h, w, grad_h, act, grw, rows, inter,
                                                       v, kAlpha, kLimit, nullptr);
  };
  for (const GluVariant v : variants()) {
    // Negative sizes, whatever the other size and the pointers.
    EXPECT_EQ(launch(p, p, a, p, p, a, -1, 4, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(p, p, a, p, p, a, -1, 0, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, -1, 4, v),
              cudaErrorInvalidValue);
    EXPECT_EQ(launch(p, p, a, p, p, a, 2, -4, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(p, p, a, p, p, a, 0, -4, v), cudaErrorInvalidValue);
    // rows > 0 needs row_weights and grad_row_weights (also when I = 0)...
    EXPECT_EQ(launch(p, p, nullptr, p, p, a, 2, 4, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(p, p, nullptr, p, p, a, 2, 0, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(p, p, a, p, p, nullptr, 2, 4, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(nullptr, nullptr, a, nullptr, nullptr, nullptr, 2, 0, v),
              cudaErrorInvalidValue);
    // ... and I > 0 the [rows, I] / [rows, 2I] operands; weighted_act alone may be null.
    EXPECT_EQ(launch(nullptr, p, a, p, p, a, 2, 4, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(p, nullptr, a, p, p, a, 2, 4, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(p, p, a, nullptr, p, a, 2, 4, v), cudaErrorInvalidValue);
    EXPECT_EQ(launch(p, p, a, nullptr, nullptr, a, 2, 4, v), cudaErrorInvalidValue);
    // rows = 0 is a successful no-op, null pointers included.
    EXPECT_EQ(launch(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, v), cudaSuccess);
    EXPECT_EQ(launch(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0, v), cudaSuccess);
  }
}

TEST(SwigluArguments, WeightedBackwardRejectsBadArguments) {
  expect_weighted_bad_arguments_rejected<float>();
  expect_weighted_bad_arguments_rejected<double>();
  expect_weighted_bad_arguments_rejected<__half>();
  expect_weighted_bad_arguments_rejected<__nv_bfloat16>();
}

}  // namespace
}  // namespace moeforge::testing
