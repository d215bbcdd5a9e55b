// GoogleTest for kernels/router_loss.cu: drives launch_router_stats (once per layer, into
// consecutive row ranges of one partials buffer), launch_router_finalize (once, over all layers)
// and launch_router_loss_backward (once per layer) on cudaMalloc'd buffers whose outputs are
// poisoned with 0xFF bytes (NaN; -1 for the int64 counts; the finalize workspace too), and
// compares with a float64 host reference of csrc/cpu/router_loss.cpp's semantics:
//
//   R        = kept rows over all layers (keep[t] != 0, or every row without a mask)
//   count_e  = kept rows whose top-k (by logit, NaN ranking lowest, ties to the lower index) has e
//   psum_e   = sum over kept rows of p_e = softmax(logits)_e;  lse = logsumexp(logits)
//   aux      = E * sum_e count_e * psum_e / R^2,   z = sum over kept rows of lse^2 / R
//              (both 0 when R == 0)
//
// and of the gradient of L = g_aux * aux + g_z * z with respect to the logits, counts held fixed
// (top-k is piecewise constant). For a kept row with probabilities p and logsumexp lse,
// d psum_f / d x_e = p_f (delta_fe - p_e) and d lse / d x_e = p_e, so
//
//   dL/dx_e = g_aux * E / R^2 * sum_f count_f p_f (delta_fe - p_e) + g_z * 2 lse p_e / R
//           = c_aux * p_e * (count_e - <count, p>) + c_z * lse * p_e,
//   c_aux = g_aux * E / R^2,  c_z = 2 g_z / R,
//
// and 0 on masked rows: the formula of router_loss_backward_cpu. Every case skips without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/router_loss.h"

namespace moeforge::testing {
namespace {

using kernels::acc_type_t;
using kernels::from_acc;
using kernels::to_acc;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- tolerances ---------------------------------------------------------------------------------
// Counts are exact: the top-k compares the logits' exact values (acc_t holds every T value), and
// the float partial sums of small integers are exact.
//
// acc_rel: error of the acc_t (float; double for double) arithmetic relative to the magnitude of
// the result's terms. In units of eps = 2^-23, with M = max |logit| (<= 4 here) and E <= 1024:
// lse = mx + log(sum) is off by <= (|lse| + E/32 + 8) eps absolutely (each lane sums <= E/32
// exponentials, a 5-level shuffle tree adds the lanes, log and the final add round once each);
// every p = exp(x - lse) is then off by <= (|lse| + |x - lse| + E/32 + 12) eps <= (3M + 2 ln E +
// E/32 + 12) eps relatively (<= 70 eps); the block sums over <= 16 rows per warp and 4 warps add
// <= 20 eps (positive terms), finalize works in double. So psum and aux are within ~90 eps =
// 1.1e-5 relative, and z within that relative to z + 2 sqrt(z) (sum_rows 2 |lse| err_lse <= 2
// err_lse sqrt(R sum lse^2) by Cauchy-Schwarz: the absolute lse error matters where lse ~ 0). The
// gradient adds <count, p> (another E/32 + 5 eps) and a few roundings of c_aux, c_z: ~130 eps =
// 1.6e-5 relative to mag = |c_aux| p (count + <count, p>) + |c_z| p (|lse| + 1) (terms by absolute
// value: count - <count, p> and the two terms can cancel). We allow 2e-5, above these worst cases
// (which random data does not approach: the emulated kernels stay below 1.5e-6; the margin covers
// FMA contraction and CUDA's 1-2 ulp exp/log on a GPU). For double the same count is < 1e-13; we
// allow 1e-12.
// out_rel: rounding a float gradient to half / bf16 costs <= u_T |g| (half an ulp; u_T = 2^-11,
// 2^-8); 2 u_T leaves room for the float error to push it across a rounding boundary.
// abs: half gradients below 2^-14 are subnormal, with spacing 2^-24 whatever the reference.
struct Tolerance {
  double out_rel, acc_rel, abs;
};

template <typename T>
Tolerance tolerance() {
  if constexpr (std::is_same_v<T, __half>) {
    return {2.0 / 2048, 2e-5, std::ldexp(1.0, -24)};
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return {2.0 / 256, 2e-5, std::ldexp(1.0, -133)};
  } else if constexpr (std::is_same_v<T, float>) {
    return {0.0, 2e-5, std::ldexp(1.0, -149)};
  } else {
    return {0.0, 1e-12, std::numeric_limits<double>::denorm_min()};
  }
}

// ---- the problem --------------------------------------------------------------------------------
template <typename T>
struct Layer {
  int64_t tokens = 0;
  std::vector<T> logits;      // [tokens, E]
  std::vector<uint8_t> keep;  // [tokens]; empty: keep every row (keep == nullptr)
  bool kept(int64_t t) const { return keep.empty() || keep[t] != 0; }
};

template <typename T>
T to_t(double v) {
  return from_acc<T>(static_cast<acc_type_t<T>>(v));
}

// Random logits rounded to T: uniform in [-4, 4], or (ties) multiples of 1/4 in [-2, 2], exact in
// every type, so that rows hold many equal logits.
template <typename T>
Layer<T> random_layer(int64_t tokens, int64_t experts, bool masked, bool ties, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> cont(-4.0, 4.0);
  std::uniform_int_distribution<int> quarter(-8, 8);
  Layer<T> l;
  l.tokens = tokens;
  l.logits.resize(tokens * experts);
  for (auto& x : l.logits) x = to_t<T>(ties ? quarter(gen) / 4.0 : cont(gen));
  if (masked) {
    // Any nonzero byte keeps the row; about a third of the rows are masked.
    static const uint8_t values[] = {0, 1, 2, 255, 1, 0};
    l.keep.resize(tokens);
    for (auto& k : l.keep) k = values[gen() % 6];
  }
  return l;
}

// ---- float64 reference --------------------------------------------------------------------------
struct RowRef {
  double lse;             // NaN if the row holds a NaN
  std::vector<double> p;  // softmax; NaN if the row holds a NaN
  std::vector<int64_t> top;
};

template <typename T>
RowRef row_ref(const T* row, int64_t experts, int64_t top_k) {
  RowRef r;
  double mx = -kInf;
  for (int64_t e = 0; e < experts; ++e) {
    const double x = to_acc(row[e]);
    if (!std::isnan(x)) mx = std::max(mx, x);
  }
  double sum = 0;
  for (int64_t e = 0; e < experts; ++e) sum += std::exp(double(to_acc(row[e])) - mx);
  r.lse = mx + std::log(sum);
  r.p.resize(experts);
  for (int64_t e = 0; e < experts; ++e) r.p[e] = std::exp(double(to_acc(row[e])) - r.lse);
  // Largest logit first, NaN as -inf, ties to the lower index (a stable sort keeps index order).
  const auto rank = [&](int64_t e) {
    const double x = to_acc(row[e]);
    return std::isnan(x) ? -kInf : x;
  };
  std::vector<int64_t> order(experts);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return rank(a) > rank(b); });
  r.top.assign(order.begin(), order.begin() + top_k);
  return r;
}

struct Ref {
  double value, mag;
};

struct LossRef {
  std::vector<int64_t> counts;                    // [E], all layers
  std::vector<std::vector<double>> layer_counts;  // [L][E]
  std::vector<std::vector<double>> layer_psum;    // [L][E]
  std::vector<double> layer_zsum, layer_kept;     // [L]
  double kept = 0, aux = 0, z = 0;
  std::vector<std::vector<Ref>> grads;  // [L][T_l * E]
};

template <typename T>
LossRef loss_ref(const std::vector<Layer<T>>& layers, int64_t experts, int64_t top_k, double g_aux,
                 double g_z) {
  const size_t num_layers = layers.size();
  LossRef ref;
  ref.counts.assign(experts, 0);
  ref.layer_counts.assign(num_layers, std::vector<double>(experts, 0.0));
  ref.layer_psum.assign(num_layers, std::vector<double>(experts, 0.0));
  ref.layer_zsum.assign(num_layers, 0.0);
  ref.layer_kept.assign(num_layers, 0.0);
  std::vector<std::vector<RowRef>> rows(num_layers);
  for (size_t l = 0; l < num_layers; ++l) {
    const Layer<T>& layer = layers[l];
    for (int64_t t = 0; t < layer.tokens; ++t) {
      rows[l].push_back(row_ref(layer.logits.data() + t * experts, experts, top_k));
      if (!layer.kept(t)) continue;
      const RowRef& r = rows[l].back();
      for (const int64_t e : r.top) {
        ++ref.counts[e];
        ref.layer_counts[l][e] += 1;
      }
      for (int64_t e = 0; e < experts; ++e) ref.layer_psum[l][e] += r.p[e];
      ref.layer_zsum[l] += r.lse * r.lse;
      ref.layer_kept[l] += 1;
    }
    ref.kept += ref.layer_kept[l];
  }
  double zsum = 0, dot = 0;
  for (size_t l = 0; l < num_layers; ++l) {
    zsum += ref.layer_zsum[l];
    for (int64_t e = 0; e < experts; ++e) dot += ref.counts[e] * ref.layer_psum[l][e];
  }
  if (ref.kept > 0) {
    ref.aux = experts * dot / (ref.kept * ref.kept);
    ref.z = zsum / ref.kept;
  }
  const double inv = ref.kept > 0 ? 1 / ref.kept : 0.0;
  const double c_aux = g_aux * experts * inv * inv, c_z = 2 * g_z * inv;
  ref.grads.resize(num_layers);
  for (size_t l = 0; l < num_layers; ++l) {
    ref.grads[l].assign(layers[l].tokens * experts, Ref{0.0, 0.0});
    for (int64_t t = 0; t < layers[l].tokens; ++t) {
      if (!layers[l].kept(t)) continue;
      const RowRef& r = rows[l][t];
      double cp = 0;
      for (int64_t e = 0; e < experts; ++e) cp += ref.counts[e] * r.p[e];
      for (int64_t e = 0; e < experts; ++e) {
        const double c = ref.counts[e], p = r.p[e];
        ref.grads[l][t * experts + e] = {
            c_aux * p * (c - cp) + c_z * r.lse * p,
            std::abs(c_aux) * p * (c + cp) + std::abs(c_z) * p * (std::abs(r.lse) + 1)};
      }
    }
  }
  return ref;
}

// ---- the launches -------------------------------------------------------------------------------
template <typename T>
struct GpuResult {
  acc_type_t<T> aux, z;
  std::vector<int64_t> counts;
  std::vector<acc_type_t<T>> partials;  // [sum_l router_stats_blocks(T_l, E), width]
  std::vector<int64_t> partial_begin;   // first partial row of each layer, then the total
  std::vector<std::vector<T>> grads;    // [L][T_l * E]
};

// stats once per layer into consecutive row ranges of one partials buffer, one finalize, then
// backward once per layer with the counts and the device scalars g_aux, g_z; every output
// poisoned with 0xFF bytes first. batched: the _layers launchers instead, kRouterLayersPerLaunch
// layers per launch, with layer 0's keep mask for all (every layer must have the same one).
// offset: the logits and gradients start `offset` elements into their buffers (misaligned rows).
template <typename T>
void run_gpu(const std::vector<Layer<T>>& layers, int64_t experts, int64_t top_k,
             acc_type_t<T> g_aux, acc_type_t<T> g_z, GpuResult<T>* out, bool batched = false,
             size_t offset = 0) {
  using acc_t = acc_type_t<T>;
  const int64_t width = kernels::router_partial_width(experts);
  out->partial_begin = {0};
  for (const auto& l : layers) {
    out->partial_begin.push_back(out->partial_begin.back() +
                                 kernels::router_stats_blocks(l.tokens, experts));
  }
  const int64_t num_partials = out->partial_begin.back();
  DeviceBuffer<acc_t> partials(num_partials * width), aux(1), z(1);
  DeviceBuffer<int64_t> counts(experts);
  DeviceBuffer<double> workspace(kernels::router_finalize_workspace_elems(num_partials, experts));
  workspace.poison(0xFF);
  DeviceBuffer<acc_t> grad_aux(std::vector<acc_t>{g_aux}), grad_z(std::vector<acc_t>{g_z});
  partials.poison(0xFF);
  aux.poison(0xFF);
  z.poison(0xFF);
  counts.poison(0xFF);
  std::vector<std::unique_ptr<DeviceBuffer<T>>> logits, grads;
  std::vector<std::unique_ptr<DeviceBuffer<uint8_t>>> keeps;
  for (const auto& l : layers) {
    std::vector<T> padded(offset, to_t<T>(kNaN));
    padded.insert(padded.end(), l.logits.begin(), l.logits.end());
    logits.push_back(std::make_unique<DeviceBuffer<T>>(padded));
    keeps.push_back(l.keep.empty() ? nullptr : std::make_unique<DeviceBuffer<uint8_t>>(l.keep));
    grads.push_back(std::make_unique<DeviceBuffer<T>>(padded.size()));
    grads.back()->poison(0xFF);
  }
  const auto logits_ptr = [&](size_t l) { return logits[l]->data() + offset; };
  const auto grads_ptr = [&](size_t l) { return grads[l]->data() + offset; };
  const auto keep_ptr = [&](size_t l) { return keeps[l] ? keeps[l]->data() : nullptr; };
  const auto batch_from = [&](size_t first) {
    kernels::RouterLayers<T> batch;
    for (size_t l = first; l < layers.size() && batch.count < kernels::kRouterLayersPerLaunch;
         ++l, ++batch.count) {
      EXPECT_EQ(layers[l].keep, layers[0].keep) << "batched layers share one mask";
      batch.logits[batch.count] = logits_ptr(l);
      batch.grad_logits[batch.count] = grads_ptr(l);
      batch.num_tokens[batch.count] = layers[l].tokens;
    }
    return batch;
  };
  for (size_t l = 0; l < layers.size(); ++l) {
    if (batched && l % kernels::kRouterLayersPerLaunch == 0) {
      MOEFORGE_ASSERT_CUDA(kernels::launch_router_stats_layers<T>(
          batch_from(l), keep_ptr(0), experts, top_k,
          partials.data() + out->partial_begin[l] * width, nullptr));
    } else if (!batched) {
      MOEFORGE_ASSERT_CUDA(kernels::launch_router_stats<T>(
          logits_ptr(l), keep_ptr(l), layers[l].tokens, experts, top_k,
          partials.data() + out->partial_begin[l] * width, nullptr));
    }
  }
  MOEFORGE_ASSERT_CUDA(
      kernels::launch_router_finalize<acc_t>(partials.data(), num_partials, experts, aux.data(),
                                             z.data(), counts.data(), workspace.data(), nullptr));
  for (size_t l = 0; l < layers.size(); ++l) {
    if (batched && l % kernels::kRouterLayersPerLaunch == 0) {
      MOEFORGE_ASSERT_CUDA(kernels::launch_router_loss_backward_layers<T>(
          batch_from(l), keep_ptr(0), counts.data(), grad_aux.data(), grad_z.data(), experts, top_k,
          nullptr));
    } else if (!batched) {
      MOEFORGE_ASSERT_CUDA(kernels::launch_router_loss_backward<T>(
          logits_ptr(l), keep_ptr(l), counts.data(), grad_aux.data(), grad_z.data(), grads_ptr(l),
          layers[l].tokens, experts, top_k, nullptr));
    }
  }
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  out->aux = aux.download()[0];
  out->z = z.download()[0];
  out->counts = counts.download();
  out->partials = partials.download();
  out->grads.clear();
  for (const auto& g : grads) {
    const std::vector<T> all = g->download();
    out->grads.emplace_back(all.begin() + offset, all.end());
  }
}

// |got - want| <= bound, false for NaN.
bool within(double got, double want, double bound) {
  return std::abs(got - want) <= bound;
}

// Compares the gradients of layer `l`; rows for which skip_row(t) is true are not compared.
template <typename T, typename Skip>
void expect_grads_close(const std::vector<T>& got, const std::vector<Ref>& want, int64_t experts,
                        const Skip& skip_row, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const Tolerance tol = tolerance<T>();
  int64_t bad = 0;
  for (size_t i = 0; i < got.size() && bad < 10; ++i) {
    if (skip_row(static_cast<int64_t>(i) / experts)) continue;
    const double g = to_acc(got[i]), w = want[i].value;
    const double bound = tol.out_rel * std::abs(w) + tol.acc_rel * want[i].mag + tol.abs;
    if (!within(g, w, bound)) {
      ADD_FAILURE() << what << ": row " << i / experts << " expert " << i % experts << " got " << g
                    << ", want " << w << " +- " << bound;
      ++bad;
    }
  }
}

// Checks everything the launches wrote against the reference (no NaN in the logits).
template <typename T>
void expect_matches(const std::vector<Layer<T>>& layers, int64_t experts, const GpuResult<T>& got,
                    const LossRef& ref) {
  const Tolerance tol = tolerance<T>();
  const double rtol = tol.acc_rel;
  EXPECT_EQ(got.counts, ref.counts);
  EXPECT_TRUE(within(got.aux, ref.aux, rtol * ref.aux)) << "aux " << got.aux << " want " << ref.aux;
  EXPECT_TRUE(within(got.z, ref.z, rtol * (ref.z + 2 * std::sqrt(ref.z))))
      << "z " << got.z << " want " << ref.z;
  if (ref.kept == 0) {
    EXPECT_EQ(got.aux, 0);
    EXPECT_EQ(got.z, 0);
  }
  // The partial rows of each layer, summed, hold that layer's statistics in the documented layout
  // [count_0..E) [psum_0..E) [zsum] [kept].
  const int64_t width = kernels::router_partial_width(experts);
  ASSERT_EQ(width, 2 * experts + 2);
  for (size_t l = 0; l < layers.size(); ++l) {
    SCOPED_TRACE("partials of layer " + std::to_string(l));
    std::vector<double> sum(width, 0.0);
    for (int64_t b = got.partial_begin[l]; b < got.partial_begin[l + 1]; ++b) {
      for (int64_t i = 0; i < width; ++i) sum[i] += got.partials[b * width + i];
    }
    for (int64_t e = 0; e < experts; ++e) {
      EXPECT_EQ(sum[e], ref.layer_counts[l][e]) << "count " << e;
      const double psum = ref.layer_psum[l][e];
      EXPECT_TRUE(within(sum[experts + e], psum, rtol * psum))
          << "psum " << e << " got " << sum[experts + e] << " want " << psum;
    }
    const double zsum = ref.layer_zsum[l], kept = ref.layer_kept[l];
    EXPECT_TRUE(within(sum[2 * experts], zsum, rtol * (zsum + 2 * std::sqrt(zsum * kept))))
        << "zsum got " << sum[2 * experts] << " want " << zsum;
    EXPECT_EQ(sum[2 * experts + 1], kept);
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    expect_grads_close(
        got.grads[l], ref.grads[l], experts, [](int64_t) { return false; },
        "grad of layer " + std::to_string(l));
    // Masked rows are exactly 0.
    for (int64_t t = 0; t < layers[l].tokens; ++t) {
      if (layers[l].kept(t)) continue;
      for (int64_t e = 0; e < experts; ++e) {
        ASSERT_EQ(to_acc(got.grads[l][t * experts + e]), 0.0) << "masked row " << t;
      }
    }
  }
}

// Incoming gradients that keep dL/dx of order p (c_aux * count ~ top_k, c_z = -1), so that the
// half and bf16 gradients are mostly normal numbers.
template <typename T>
std::pair<acc_type_t<T>, acc_type_t<T>> incoming_grads(const std::vector<Layer<T>>& layers) {
  double kept = 0;
  for (const auto& l : layers) {
    for (int64_t t = 0; t < l.tokens; ++t) kept += l.kept(t);
  }
  if (kept == 0) return {1, 1};
  return {static_cast<acc_type_t<T>>(0.75 * kept), static_cast<acc_type_t<T>>(-0.5 * kept)};
}

struct Case {
  int64_t experts, top_k;
  std::vector<int64_t> tokens;  // per layer
  bool masked, ties;
};

std::string name(const Case& c) {
  std::string s = "E=" + std::to_string(c.experts) + " top_k=" + std::to_string(c.top_k) + " T=[";
  for (size_t l = 0; l < c.tokens.size(); ++l) {
    if (l > 0) s += ',';
    s += std::to_string(c.tokens[l]);
  }
  return s + "]" + (c.masked ? " masked" : "") + (c.ties ? " ties" : "");
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {1, 1, {5}, false, false},            // a single expert: p = 1, aux = 1
      {2, 1, {37}, false, false},           // E = 2
      {2, 2, {1, 37}, true, true},          // top_k = E: every kept row picks every expert
      {8, 1, {1000, 0, 37}, false, false},  // T = 1000, and an empty layer between two others
      {8, 8, {37, 37}, true, true},         // top_k = E = 8
      {60, 8, {37, 150}, true, false},      // Qwen1.5-MoE-like E (not a multiple of 32)
      {60, 2, {200}, false, true},          // many tied logits
      {128, 8, {100}, false, false},        // Qwen3-MoE-like
      {128, 2, {37, 1, 37}, true, true},    // a T = 1 layer among others
      {128, 1, {0}, false, false},          // no rows at all: R = 0, aux = z = 0
      {kernels::kRouterMaxExperts, 8, {3, 1}, false, false},  // E at the limit (> 48 KB smem)
      {128, 8, std::vector<int64_t>(20, 200), true, false},   // 20 layers: 80 partial rows
      // The one-thread-per-row path: E <= 256, top_k <= 16, rows of whole 4-byte words (float;
      // half and bf16 with E even). Tiles of 128 rows (bf16 E = 128), 64 (float E = 128, bf16
      // E = 256) or 32 (float E = 256); T = 1000, 150, 37 end in a partial tile.
      {256, 16, {150, 37}, true, true},  // both limits; top_k = 16 of many tied logits
      {256, 5, {130}, false, false},
      // E <= 256 but top_k > 16: the warp-per-row fallback with 128-row stats blocks.
      {64, 17, {130, 3}, true, true},
  };
  return all;
}

template <typename T>
class RouterLossTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using ElementTypes = ::testing::Types<float, double, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(RouterLossTest, ElementTypes);

// Random layers of case c (seeds from *seed on), run on the GPU and compared with the reference.
template <typename T>
void check_case(const Case& c, uint32_t* seed) {
  SCOPED_TRACE(name(c));
  std::vector<Layer<T>> layers;
  for (const int64_t tokens : c.tokens) {
    layers.push_back(random_layer<T>(tokens, c.experts, c.masked, c.ties, (*seed)++));
  }
  const auto [g_aux, g_z] = incoming_grads(layers);
  GpuResult<T> got;
  ASSERT_NO_FATAL_FAILURE(run_gpu(layers, c.experts, c.top_k, g_aux, g_z, &got));
  const LossRef ref = loss_ref(layers, c.experts, c.top_k, g_aux, g_z);
  expect_matches(layers, c.experts, got, ref);
}

TYPED_TEST(RouterLossTest, MatchesReference) {
  using T = TypeParam;
  uint32_t seed = 1;
  for (const Case& c : cases()) {
    ASSERT_NO_FATAL_FAILURE(check_case<T>(c, &seed));
  }
}

TYPED_TEST(RouterLossTest, ManyLayersOver131072Rows) {
  // bench_router_loss-like: many layers, so that finalize reduces thousands of partial rows
  // (20 x 104 = 2080 at E = 128). Left to the GPU by scripts/test_emulator.sh (minutes emulated);
  // RouterFinalizeTest covers the same finalize shapes there.
  using T = TypeParam;
  const std::vector<Case> many = {
      {128, 8, std::vector<int64_t>(20, 6600), false, false},
      {1, 1, std::vector<int64_t>(20, 6600), true, false},
      {kernels::kRouterMaxExperts, 8, std::vector<int64_t>(20, 130), false, false},
      // More 128-row chunks (547) than a layer's capped stats blocks (510): blocks grid-stride.
      {256, 8, {70000}, true, false},
  };
  uint32_t seed = 500;
  for (const Case& c : many) {
    ASSERT_NO_FATAL_FAILURE(check_case<T>(c, &seed));
  }
}

// Layers batched into one launch (35 layers: two launches of up to 32) write exactly the partial
// rows and gradients that one launch per layer writes, with and without a shared mask.
TYPED_TEST(RouterLossTest, LayersInOneLaunchEqualOneLaunchPerLayer) {
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  const int64_t experts = 40, top_k = 3;
  for (const bool masked : {false, true}) {
    SCOPED_TRACE(masked);
    std::vector<Layer<T>> layers;
    for (int l = 0; l < 35; ++l) {
      const int64_t tokens = masked ? 70 : std::vector<int64_t>{0, 1, 17, 64, 65, 200}[l % 6];
      layers.push_back(random_layer<T>(tokens, experts, masked, l % 3 == 0, 4000 + l));
      if (masked) layers.back().keep = layers.front().keep;  // one mask for every layer
    }
    GpuResult<T> one, batched;
    run_gpu(layers, experts, top_k, acc_t(0.7), acc_t(-1.3), &one);
    run_gpu(layers, experts, top_k, acc_t(0.7), acc_t(-1.3), &batched, /*batched=*/true);
    ASSERT_EQ(one.partials.size(), batched.partials.size());
    EXPECT_EQ(std::memcmp(one.partials.data(), batched.partials.data(),
                          one.partials.size() * sizeof(acc_t)),
              0);
    EXPECT_EQ(one.counts, batched.counts);
    EXPECT_EQ(std::memcmp(&one.aux, &batched.aux, sizeof(acc_t)), 0);
    EXPECT_EQ(std::memcmp(&one.z, &batched.z, sizeof(acc_t)), 0);
    for (size_t l = 0; l < layers.size(); ++l) {
      ASSERT_EQ(one.grads[l].size(), batched.grads[l].size());
      if (one.grads[l].empty()) continue;
      EXPECT_EQ(std::memcmp(one.grads[l].data(), batched.grads[l].data(),
                            one.grads[l].size() * sizeof(T)),
                0)
          << "layer " << l;
    }
  }
}

TYPED_TEST(RouterLossTest, MisalignedRowsGiveTheSameResults) {
  // Logits and gradients 1 or 2 elements past an aligned start: the one-thread-per-row path
  // stages rows with 4- or 2-byte instead of 16-byte accesses, which must change nothing (the
  // path and every summation order depend on the shapes alone).
  using T = TypeParam;
  using acc_t = acc_type_t<T>;
  for (const int64_t experts : {8, 60, 128}) {
    SCOPED_TRACE("E=" + std::to_string(experts));
    const std::vector<Layer<T>> layers = {random_layer<T>(300, experts, true, false, 900),
                                          random_layer<T>(45, experts, false, true, 901)};
    GpuResult<T> aligned;
    ASSERT_NO_FATAL_FAILURE(run_gpu(layers, experts, 6, acc_t(0.7), acc_t(-1.3), &aligned));
    expect_matches(layers, experts, aligned, loss_ref(layers, experts, 6, acc_t(0.7), acc_t(-1.3)));
    for (const size_t offset : {1, 2}) {
      SCOPED_TRACE("offset " + std::to_string(offset));
      GpuResult<T> got;
      ASSERT_NO_FATAL_FAILURE(
          run_gpu(layers, experts, 6, acc_t(0.7), acc_t(-1.3), &got, false, offset));
      ASSERT_EQ(got.partials.size(), aligned.partials.size());
      EXPECT_EQ(std::memcmp(got.partials.data(), aligned.partials.data(),
                            got.partials.size() * sizeof(acc_t)),
                0);
      EXPECT_EQ(got.counts, aligned.counts);
      EXPECT_EQ(std::memcmp(&got.aux, &aligned.aux, sizeof(acc_t)), 0);
      EXPECT_EQ(std::memcmp(&got.z, &aligned.z, sizeof(acc_t)), 0);
      for (size_t l = 0; l < layers.size(); ++l) {
        ASSERT_EQ(got.grads[l].size(), aligned.grads[l].size());
        EXPECT_EQ(std::memcmp(got.grads[l].data(), aligned.grads[l].data(),
                              got.grads[l].size() * sizeof(T)),
                  0)
            << "layer " << l;
      }
    }
  }
}

TYPED_TEST(RouterLossTest, AllRowsMasked) {
  // R = 0: aux = z = 0 (not 0/0 = NaN), no counts, zero gradients, even with NaN logits in the
  // masked rows.
  using T = TypeParam;
  constexpr int64_t kExperts = 8, kTopK = 2;
  std::vector<Layer<T>> layers;
  for (const int64_t tokens : {37, 5}) {
    Layer<T> l = random_layer<T>(tokens, kExperts, true, false, 40 + tokens);
    std::fill(l.keep.begin(), l.keep.end(), 0);
    l.logits[kExperts + 3] = to_t<T>(kNaN);
    layers.push_back(l);
  }
  GpuResult<T> got;
  ASSERT_NO_FATAL_FAILURE(
      run_gpu(layers, kExperts, kTopK, acc_type_t<T>(1), acc_type_t<T>(1), &got));
  EXPECT_EQ(got.aux, 0);
  EXPECT_EQ(got.z, 0);
  EXPECT_EQ(got.counts, std::vector<int64_t>(kExperts, 0));
  for (const auto v : got.partials) EXPECT_EQ(v, 0);
  for (const auto& g : got.grads) {
    for (const T v : g) ASSERT_EQ(to_acc(v), 0.0);
  }
}

TYPED_TEST(RouterLossTest, TiesGoToTheLowerIndex) {
  // Single rows, so that the counts are the selected set itself.
  using T = TypeParam;
  struct TieCase {
    std::vector<double> row;
    int64_t top_k;
    std::vector<int64_t> want;
  };
  std::vector<double> wide(70, 0.0);  // ties on one lane (1, 33, 65) and across lanes (0 vs 1)
  wide[65] = wide[33] = wide[1] = 2.0;
  wide[0] = wide[2] = 1.0;
  std::vector<double> equal40(40, -1.25);
  const std::vector<TieCase> tie_cases = {
      {{0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}, 3, {0, 1, 2}},
      {{1, 3, 3, 1, 3}, 2, {1, 2}},
      {{1, 3, 3, 1, 3}, 3, {1, 2, 4}},
      {{1, 3, 3, 1, 3}, 4, {0, 1, 2, 4}},
      {{-0.0, 0.0, -1, -0.0}, 2, {0, 1}},  // -0 == +0
      {wide, 1, {1}},
      {wide, 3, {1, 33, 65}},
      {wide, 5, {0, 1, 2, 33, 65}},
      {equal40, 33, {}},  // all equal: experts 0..32
  };
  for (const TieCase& tc : tie_cases) {
    const int64_t experts = static_cast<int64_t>(tc.row.size());
    SCOPED_TRACE("E=" + std::to_string(experts) + " top_k=" + std::to_string(tc.top_k));
    std::vector<int64_t> want_set = tc.want;
    if (want_set.empty()) {
      want_set.resize(tc.top_k);
      std::iota(want_set.begin(), want_set.end(), int64_t{0});
    }
    std::vector<int64_t> want(experts, 0);
    for (const int64_t e : want_set) want[e] = 1;
    Layer<T> layer;
    layer.tokens = 1;
    for (const double x : tc.row) layer.logits.push_back(to_t<T>(x));
    const std::vector<Layer<T>> layers = {layer};
    GpuResult<T> got;
    ASSERT_NO_FATAL_FAILURE(
        run_gpu(layers, experts, tc.top_k, acc_type_t<T>(1), acc_type_t<T>(1), &got));
    EXPECT_EQ(got.counts, want);
    expect_matches(layers, experts, got, loss_ref(layers, experts, tc.top_k, 1.0, 1.0));
  }
}

TYPED_TEST(RouterLossTest, NanLogits) {
  // NaN ranks lowest (as -inf; ties among NaN and -inf to the lower index), so every kept row
  // still selects exactly top_k experts. As on the CPU (csrc/cpu/router_loss.cpp), a kept NaN row
  // makes its softmax and logsumexp NaN: aux, z and that row's gradient are NaN, the other rows'
  // gradients are unaffected. Masked, the NaN rows are not read at all.
  using T = TypeParam;
  for (const int64_t experts : {8, 40}) {
    constexpr int64_t kTokens = 6, kTopK = 3;
    Layer<T> layer = random_layer<T>(kTokens, experts, false, false, 7 + experts);
    T* row1 = layer.logits.data() + 1 * experts;
    T* row3 = layer.logits.data() + 3 * experts;
    T* row4 = layer.logits.data() + 4 * experts;
    for (int64_t e = 0; e < experts; ++e) {
      row1[e] = to_t<T>(kNaN);                                      // all NaN: picks 0, 1, 2
      if (e % 2 == 0) row3[e] = to_t<T>(kNaN);                      // NaN at even experts
      row4[e] = to_t<T>(e == 4 ? 0.5 : e % 3 == 0 ? kNaN : -kInf);  // 4, then 0, 1 (tied at -inf)
    }
    const auto has_nan = [](int64_t t) { return t == 1 || t == 3 || t == 4; };
    for (const bool mask_nan_rows : {false, true}) {
      SCOPED_TRACE("E=" + std::to_string(experts) + (mask_nan_rows ? " NaN rows masked" : ""));
      if (mask_nan_rows) layer.keep = {1, 0, 1, 0, 0, 1};
      const std::vector<Layer<T>> layers = {layer};
      const auto [g_aux, g_z] = incoming_grads(layers);
      GpuResult<T> got;
      ASSERT_NO_FATAL_FAILURE(run_gpu(layers, experts, kTopK, g_aux, g_z, &got));
      const LossRef ref = loss_ref(layers, experts, kTopK, g_aux, g_z);
      EXPECT_EQ(got.counts, ref.counts);
      EXPECT_EQ(std::accumulate(got.counts.begin(), got.counts.end(), int64_t{0}),
                int64_t(ref.kept) * kTopK);
      if (mask_nan_rows) {
        expect_matches(layers, experts, got, ref);
        continue;
      }
      EXPECT_GE(got.counts[0], 2);  // rows 1 and 4
      EXPECT_GE(got.counts[1], 2);
      EXPECT_GE(got.counts[4], 1);
      EXPECT_TRUE(std::isnan(got.aux)) << got.aux;
      EXPECT_TRUE(std::isnan(got.z)) << got.z;
      expect_grads_close(got.grads[0], ref.grads[0], experts, has_nan, "grad of the finite rows");
      for (int64_t t = 0; t < kTokens; ++t) {
        if (!has_nan(t)) continue;
        for (int64_t e = 0; e < experts; ++e) {
          EXPECT_TRUE(std::isnan(to_acc(got.grads[0][t * experts + e])))
              << "row " << t << " expert " << e;
        }
      }
    }
  }
}

// Argument checks happen before any CUDA call, so this one needs no device and runs everywhere.
template <typename T>
void expect_bad_sizes_rejected() {
  using acc_t = acc_type_t<T>;
  constexpr int64_t kMax = kernels::kRouterMaxExperts;
  struct Sizes {
    int64_t tokens, experts, top_k;
  };
  for (const Sizes& s : {Sizes{4, kMax + 1, 2}, Sizes{4, 8, 9}, Sizes{4, 8, 0}, Sizes{4, 0, 1},
                         Sizes{-1, 8, 2}, Sizes{0, 4, 5}, Sizes{4, 8, -1}, Sizes{4, -8, 2}}) {
    SCOPED_TRACE("T=" + std::to_string(s.tokens) + " E=" + std::to_string(s.experts) +
                 " top_k=" + std::to_string(s.top_k));
    EXPECT_EQ(kernels::launch_router_stats<T>(nullptr, nullptr, s.tokens, s.experts, s.top_k,
                                              nullptr, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(
        kernels::launch_router_loss_backward<T>(nullptr, nullptr, nullptr, nullptr, nullptr,
                                                nullptr, s.tokens, s.experts, s.top_k, nullptr),
        cudaErrorInvalidValue);
  }
  // A dummy (never dereferenced) workspace, so that only the size is wrong.
  double dummy = 0;
  for (const int64_t experts : {int64_t{0}, int64_t{-3}, kMax + 1}) {
    EXPECT_EQ(kernels::launch_router_finalize<acc_t>(nullptr, 1, experts, nullptr, nullptr, nullptr,
                                                     &dummy, nullptr),
              cudaErrorInvalidValue);
  }
  EXPECT_EQ(kernels::launch_router_finalize<acc_t>(nullptr, -1, 8, nullptr, nullptr, nullptr,
                                                   &dummy, nullptr),
            cudaErrorInvalidValue);
  // Rows to reduce but no workspace.
  for (const int64_t rows : {int64_t{1}, int64_t{64}, int64_t{12288}}) {
    EXPECT_EQ(kernels::launch_router_finalize<acc_t>(nullptr, rows, 8, nullptr, nullptr, nullptr,
                                                     nullptr, nullptr),
              cudaErrorInvalidValue)
        << rows;
  }
}

TEST(RouterLossArguments, RejectsBadSizes) {
  expect_bad_sizes_rejected<float>();
  expect_bad_sizes_rejected<double>();
  expect_bad_sizes_rejected<__half>();
  expect_bad_sizes_rejected<__nv_bfloat16>();
}

TEST(RouterLossArguments, PartialsShape) {
  EXPECT_EQ(kernels::router_partial_width(1), 4);
  EXPECT_EQ(kernels::router_partial_width(128), 258);
  // At least one partial row even without tokens (finalize then reads zeros), never fewer for
  // more tokens, and capped: a layer's partials stay near 1 MB (2^18 elements) whatever T.
  for (const int64_t experts : {1, 128, 1024}) {
    SCOPED_TRACE(experts);
    EXPECT_GE(kernels::router_stats_blocks(0, experts), 1);
    int64_t previous = kernels::router_stats_blocks(0, experts);
    for (const int64_t tokens :
         std::vector<int64_t>{1, 63, 64, 65, 1000, 100000, int64_t{1} << 40}) {
      const int64_t blocks = kernels::router_stats_blocks(tokens, experts);
      EXPECT_GE(blocks, previous) << tokens;
      EXPECT_LE(blocks * kernels::router_partial_width(experts),
                std::max<int64_t>(16 * kernels::router_partial_width(experts), int64_t{1} << 18));
      previous = blocks;
    }
  }
}

TEST(RouterLossArguments, FinalizeWorkspaceSize) {
  // No rows, no workspace; else between one and 16 rows of partial width (fixed, however many
  // partial rows there are).
  EXPECT_EQ(kernels::router_finalize_workspace_elems(0, 128), 0);
  for (const int64_t experts : {int64_t{1}, int64_t{128}, kernels::kRouterMaxExperts}) {
    const int64_t width = kernels::router_partial_width(experts);
    for (const int64_t rows : {1, 63, 64, 65, 1000, 1024, 1025, 12288, 12289, 1 << 24}) {
      const int64_t elems = kernels::router_finalize_workspace_elems(rows, experts);
      EXPECT_EQ(elems % width, 0) << rows;
      EXPECT_GE(elems, width) << rows;
      EXPECT_LE(elems, 16 * width) << rows;
    }
  }
}

// ---- launch_router_finalize alone, on synthetic partial rows ------------------------------------
// Shapes that launch_router_stats would need minutes to produce in the emulator: up to 12288
// partial rows (bench_router_loss: 48 layers x 256 blocks), E = 1 and E = kRouterMaxExperts.

// Random partial rows in the documented layout: counts and kept small integers (exact in float),
// psum and zsum positive with exponents spread over 2^-20 .. 2^20, so that a change of summation
// order changes the low bits of the result (which the determinism check would see).
template <typename acc_t>
std::vector<acc_t> random_partials(int64_t rows, int64_t experts, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> count(0, 64), exponent(-20, 20);
  std::uniform_real_distribution<double> mantissa(1.0, 2.0);
  const int64_t width = kernels::router_partial_width(experts);
  std::vector<acc_t> p(rows * width);
  for (int64_t b = 0; b < rows; ++b) {
    acc_t* row = p.data() + b * width;
    for (int64_t e = 0; e < experts; ++e) {
      row[e] = static_cast<acc_t>(count(gen));
      row[experts + e] = static_cast<acc_t>(std::ldexp(mantissa(gen), exponent(gen)));
    }
    row[2 * experts] = static_cast<acc_t>(std::ldexp(mantissa(gen), exponent(gen)));
    row[2 * experts + 1] = static_cast<acc_t>(count(gen));
  }
  return p;
}

struct FinalizeRef {
  std::vector<int64_t> counts;
  double aux = 0, z = 0;
};

// The column sums in float64, then the formulas of the header.
template <typename acc_t>
FinalizeRef finalize_ref(const std::vector<acc_t>& partials, int64_t rows, int64_t experts) {
  const int64_t width = kernels::router_partial_width(experts);
  std::vector<double> sum(width, 0.0);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t i = 0; i < width; ++i) sum[i] += partials[b * width + i];
  }
  FinalizeRef ref;
  double dot = 0;
  for (int64_t e = 0; e < experts; ++e) {
    ref.counts.push_back(static_cast<int64_t>(sum[e]));
    dot += sum[e] * sum[experts + e];
  }
  const double kept = sum[2 * experts + 1];
  if (kept > 0) {
    ref.aux = experts * dot / (kept * kept);
    ref.z = sum[2 * experts] / kept;
  }
  return ref;
}

template <typename acc_t>
struct FinalizeResult {
  acc_t aux, z;
  std::vector<int64_t> counts;
};

// One launch_router_finalize on uploaded partials; outputs and workspace poisoned with `poison`.
template <typename acc_t>
void run_finalize(const std::vector<acc_t>& host_partials, int64_t rows, int64_t experts,
                  unsigned char poison, FinalizeResult<acc_t>* out) {
  DeviceBuffer<acc_t> partials(host_partials), aux(1), z(1);
  DeviceBuffer<int64_t> counts(experts);
  DeviceBuffer<double> workspace(kernels::router_finalize_workspace_elems(rows, experts));
  aux.poison(poison);
  z.poison(poison);
  counts.poison(poison);
  workspace.poison(poison);
  MOEFORGE_ASSERT_CUDA(kernels::launch_router_finalize<acc_t>(partials.data(), rows, experts,
                                                              aux.data(), z.data(), counts.data(),
                                                              workspace.data(), nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  out->aux = aux.download()[0];
  out->z = z.download()[0];
  out->counts = counts.download();
}

template <typename acc_t>
class RouterFinalizeTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using AccTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(RouterFinalizeTest, AccTypes);

// Relative error of aux and z: the float64 sums of positive terms are within (rows + E) * 2^-53
// relative (< 2e-12 here), then rounded once to acc_t.
template <typename acc_t>
double finalize_rtol() {
  return std::is_same_v<acc_t, float> ? 2e-7 : 1e-11;
}

TYPED_TEST(RouterFinalizeTest, ManyPartialRowsMatchReference) {
  using acc_t = TypeParam;
  struct Shape {
    int64_t experts, rows;
  };
  // Row counts around the chunking (64 rows per chunk up to 1024 rows, then 16 chunks), and
  // widths around the 32-column blocks (E = 15: width 32).
  const std::vector<Shape> shapes = {{1, 1},
                                     {1, 5},
                                     {1, 12288},
                                     {1, 100000},
                                     {15, 64},
                                     {15, 65},
                                     {128, 1},
                                     {128, 63},
                                     {128, 64},
                                     {128, 65},
                                     {128, 1000},
                                     {128, 1024},
                                     {128, 1025},
                                     {128, 1580},
                                     {128, 12288},
                                     {128, 12289},
                                     {kernels::kRouterMaxExperts, 1},
                                     {kernels::kRouterMaxExperts, 17},
                                     {kernels::kRouterMaxExperts, 3000}};
  uint32_t seed = 100;
  for (const Shape& sh : shapes) {
    SCOPED_TRACE("E=" + std::to_string(sh.experts) + " rows=" + std::to_string(sh.rows));
    const std::vector<acc_t> partials = random_partials<acc_t>(sh.rows, sh.experts, seed++);
    FinalizeResult<acc_t> got;
    ASSERT_NO_FATAL_FAILURE(run_finalize(partials, sh.rows, sh.experts, 0xFF, &got));
    const FinalizeRef ref = finalize_ref(partials, sh.rows, sh.experts);
    const double rtol = finalize_rtol<acc_t>();
    EXPECT_EQ(got.counts, ref.counts);
    EXPECT_TRUE(within(got.aux, ref.aux, rtol * ref.aux))
        << "aux " << got.aux << " want " << ref.aux;
    EXPECT_TRUE(within(got.z, ref.z, rtol * ref.z)) << "z " << got.z << " want " << ref.z;
  }
}

TYPED_TEST(RouterFinalizeTest, Deterministic) {
  // Same partials, differently poisoned outputs and workspace: bitwise the same results.
  using acc_t = TypeParam;
  for (const int64_t experts : {int64_t{1}, int64_t{128}, kernels::kRouterMaxExperts}) {
    const int64_t rows = experts == kernels::kRouterMaxExperts ? 1500 : 12288;
    SCOPED_TRACE("E=" + std::to_string(experts) + " rows=" + std::to_string(rows));
    const std::vector<acc_t> partials = random_partials<acc_t>(rows, experts, 7 + experts);
    FinalizeResult<acc_t> first, second;
    ASSERT_NO_FATAL_FAILURE(run_finalize(partials, rows, experts, 0xFF, &first));
    ASSERT_NO_FATAL_FAILURE(run_finalize(partials, rows, experts, 0x00, &second));
    EXPECT_EQ(std::memcmp(&first.aux, &second.aux, sizeof(acc_t)), 0)
        << first.aux << " vs " << second.aux;
    EXPECT_EQ(std::memcmp(&first.z, &second.z, sizeof(acc_t)), 0) << first.z << " vs " << second.z;
    EXPECT_EQ(first.counts, second.counts);
  }
}

TYPED_TEST(RouterFinalizeTest, NoPartialRows) {
  // Nothing to reduce: no workspace needed, R = 0 so aux = z = 0, and no counts.
  using acc_t = TypeParam;
  constexpr int64_t kExperts = 8;
  DeviceBuffer<acc_t> aux(1), z(1);
  DeviceBuffer<int64_t> counts(kExperts);
  aux.poison(0xFF);
  z.poison(0xFF);
  counts.poison(0xFF);
  MOEFORGE_ASSERT_CUDA(kernels::launch_router_finalize<acc_t>(
      nullptr, 0, kExperts, aux.data(), z.data(), counts.data(), nullptr, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(aux.download()[0], 0);
  EXPECT_EQ(z.download()[0], 0);
  EXPECT_EQ(counts.download(), std::vector<int64_t>(kExperts, 0));
}

}  // namespace
TEST(RouterLossArguments, LayerBatchesRejectBadArguments) {
  kernels::RouterLayers<float> batch;
  batch.count = kernels::kRouterLayersPerLaunch + 1;
  EXPECT_EQ(kernels::launch_router_stats_layers<float>(batch, nullptr, 8, 2, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(kernels::launch_router_loss_backward_layers<float>(batch, nullptr, nullptr, nullptr,
                                                               nullptr, 8, 2, nullptr),
            cudaErrorInvalidValue);
  batch.count = 1;
  batch.num_tokens[0] = -1;
  EXPECT_EQ(kernels::launch_router_stats_layers<float>(batch, nullptr, 8, 2, nullptr, nullptr),
            cudaErrorInvalidValue);
  batch.num_tokens[0] = 4;
  EXPECT_EQ(kernels::launch_router_stats_layers<float>(batch, nullptr, 8, 9, nullptr, nullptr),
            cudaErrorInvalidValue);  // top_k > E
  batch.count = 0;                   // nothing to do
  EXPECT_EQ(kernels::launch_router_stats_layers<float>(batch, nullptr, 8, 2, nullptr, nullptr),
            cudaSuccess);
}

}  // namespace moeforge::testing
