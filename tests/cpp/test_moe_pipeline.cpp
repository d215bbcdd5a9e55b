// GoogleTest that chains the torch-free launchers of kernels/ into the forward pass of an MoE
// expert layer and checks it against a float64 host reference:
//
//   launch_routing        topk_ids [T, K] -> sorted_pairs [S], pair_to_row [T, K], offsets [E + 1]
//   launch_permute        x [T, H] -> x_sorted [S, H]                       (S = T * K rows)
//   launch_grouped_gemm   h = x_sorted @ gate_up_e^T, gate_up [E, 2I, H] -> h [S, 2I]
//   launch_swiglu         a = silu(h[:, :I]) * h[:, I:]                  -> a [S, I]
//   launch_grouped_gemm   y_sorted = a @ down_e^T, down [E, H, I]        -> y_sorted [S, H]
//   launch_combine        out[t] = sum_k w[t, k] * y_sorted[pair_to_row[t, k]]  -> out [T, H]
//
// The plan stays on the device (no host synchronisation between the launches), so the same chain
// also runs captured in a CUDA graph: the graph is replayed on new ids / tokens / weights uploaded
// into the captured input buffers (other expert counts, other empty experts), which shows that
// nothing host-side was baked in. Every case has dropped pairs (ids -1 and E). Intermediates and
// outputs are poisoned with 0xFF bytes (NaN, or -1 for the int32 plan) before every run.
//
// A third test runs the chain with the permute fused into the gate_up GEMM (RowGather) and
// requires h and out bitwise equal to the permuting chain's.
//
// Checks: the plan exactly; x_sorted bit for bit; the dropped rows of every intermediate exactly
// zero; h, a, y_sorted and out against the float64 reference of the inputs within a propagated
// rounding-error bound (derived under "the error model" below); and, stage by stage, a, y_sorted
// and out against a reference computed from the device's own previous stage, with the tight bound
// of that stage alone (out bit for bit: combine rounds exactly like the host code below). Types:
// float (SIMT GEMMs) and __nv_bfloat16 / __half (GroupedGemmEngine::kWmma, the tensor-core path on
// sm80+). Every case skips at run time without a GPU.
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
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/grouped_gemm.h"
#include "moeforge/kernels/numeric.h"
#include "moeforge/kernels/permute.h"
#include "moeforge/kernels/routing.h"
#include "moeforge/kernels/swiglu.h"
#include "moeforge/kernels/swiglu_math.h"

namespace moeforge::testing {
namespace {

using kernels::acc_type_t;
using kernels::from_acc;
using kernels::GroupedGemmEngine;
using kernels::to_acc;

// ---- the error model ---------------------------------------------------------------------------
// Every kernel of the chain reads element-type (T) values, computes in float (acc_type_t<T>) and
// rounds its result once to T. With u = the unit roundoff of T, u_f = 2^-24 that of float and
// eta = the absolute rounding error in T's subnormal range (only fp16 reaches it: 2^-25), one
// stage with exact inputs z and stored inputs z~, |z~ - z| <= e_z, has the error
//   |stored - exact| <= prop + comp + u * (|exact| + prop + comp) + eta
// where prop is the exact function's change from z to z~ (first order, bounded below per stage),
// comp the float evaluation error of the kernel on z~, and the last two terms the rounding to T.
//   GEMM over k terms, any summation order (SIMT or tensor cores, fp32 accumulation):
//     comp <= 2 (k + 3) u_f sum |x~| |w|, the bound of tests/cpp/test_grouped_gemm.cpp (gamma_k
//     u_f = k u_f / (1 - k u_f) for the sum, one more rounding for float products, and a factor 2
//     for tensor-core accumulation that is not IEEE-rounded);
//     prop <= sum |w| e_x.
//   SwiGLU a = silu(g) * up, computed as g * (1 / (1 + exp(-g))) * up in float: expf is within
//     2 ulp (CUDA; glibc's within 1) = 4 u_f relative, 1 + exp(-g) passes that on and adds u_f,
//     the division (IEEE, no fast-math) u_f, the two products u_f each: comp <= 8 u_f |a~|, taken
//     as kSwigluRelErr = 10 u_f |a~| for the second-order terms.
//     prop <= |silu(g~)| e_up + |up| L e_g with L = max |silu'| = 1.0998... < 1.1 (at g ~ 2.4),
//     and |silu(g~)| <= |silu(g)| + L e_g.
//   combine, K weighted terms summed in float in a fixed order (explicitly rounded, no FMA):
//     comp <= 2 (K + 2) u_f sum_k w_k |y~_k|; prop <= sum_k w_k e_y.
// permute is exact (a copy). The bounds are first order in u; the factors 2 and 10 / 8 cover
// the rest for these sizes (k u_f < 1e-4). For bf16 / fp16 the rounding of h and a to T dominates,
// so the end-to-end bound of out is a few u of the magnitudes involved, which is what those types
// can deliver; the stage-local checks below have only the last stage's terms.
constexpr double kFloatRoundoff = 1.0 / (1 << 24);
constexpr double kSwigluRelErr = 10 * kFloatRoundoff;
constexpr double kSiluLipschitz = 1.1;

// The bound after rounding a value whose pre-rounding error is at most `err` into T.
template <typename T>
double rounded(double value, double err) {
  return err + unit_roundoff<T>() * (std::abs(value) + err) + subnormal_rounding<T>();
}

// Engine of the grouped GEMMs per element type: tensor cores for the half types.
template <typename T>
constexpr GroupedGemmEngine engine_of() {
  return std::is_same_v<T, float> ? GroupedGemmEngine::kSimt : GroupedGemmEngine::kWmma;
}

// ---- the problem -------------------------------------------------------------------------------
// One set of inputs: ids are drawn with ~8% -1 and ~4% E (dropped), the rest over the experts,
// with probability `skew` on one hot expert; expert `empty` (-1: none) gets no pairs.
struct InputSpec {
  uint32_t seed;
  int64_t empty;
  double skew;
};

struct Case {
  std::string name;
  int64_t tokens, top_k, experts, hidden, inter;
  bool ids64;  // topk_ids as int64 (else int32)
  InputSpec sets[3];
  int64_t rows() const { return tokens * top_k; }
};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {"T=37 K=2 E=8 H=64 I=48", 37, 2, 8, 64, 48, true, {{1, -1, 0.0}, {2, 3, 0.0}, {3, -1, 0.7}}},
      // Expert 2 gets no tokens (expert 5 in the second set); the third set sends 179 of the 256
      // rows to one expert (more than one 128-row tile of the tensor-core kernel).
      {"T=64 K=4 E=6 H=136 I=40, expert 2 empty",
       64,
       4,
       6,
       136,
       40,
       false,
       {{11, 2, 0.0}, {12, 5, 0.3}, {13, -1, 0.8}}},
      // H and I no multiples of 8: element-wise loads in both GEMMs, permute and combine.
      {"T=29 K=3 E=5 H=44 I=27",
       29,
       3,
       5,
       44,
       27,
       true,
       {{21, 4, 0.0}, {22, -1, 0.5}, {23, 0, 0.0}}},
  };
  return all;
}

template <typename T, typename index_t>
struct Inputs {
  std::vector<index_t> ids;            // [T, K]
  std::vector<T> x;                    // [T, H]
  std::vector<T> gate_up;              // [E, 2I, H]
  std::vector<T> down;                 // [E, H, I]
  std::vector<acc_type_t<T>> weights;  // [T, K]
};

template <typename T>
std::vector<T> uniform_values(size_t count, double scale, std::mt19937& gen) {
  std::uniform_real_distribution<double> dist(-scale, scale);
  std::vector<T> v(count);
  for (auto& e : v) e = from_acc<T>(static_cast<acc_type_t<T>>(dist(gen)));
  return v;
}

template <typename T, typename index_t>
Inputs<T, index_t> make_inputs(const Case& c, const InputSpec& spec) {
  const int64_t e_count = c.experts, s = c.rows(), h = c.hidden, i = c.inter;
  std::mt19937 gen(spec.seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::uniform_int_distribution<int64_t> expert(0, e_count - 1);
  int64_t hot = (spec.seed * 7) % e_count;
  if (hot == spec.empty) hot = (hot + 1) % e_count;
  Inputs<T, index_t> in;
  in.ids.resize(s);
  for (auto& id : in.ids) {
    const double r = unit(gen);
    int64_t e = r < 0.08 ? -1 : r < 0.12 ? e_count : unit(gen) < spec.skew ? hot : expert(gen);
    if (e >= 0 && e == spec.empty) e = (e + 1) % e_count;
    id = static_cast<index_t>(e);
  }
  // At least one pair of each dropped kind.
  in.ids[spec.seed % s] = index_t{-1};
  in.ids[s - 1 - spec.seed % 3] = static_cast<index_t>(e_count);
  // Scales that keep h, a and y of order one: x in [-1, 1], weights in [-2, 2] / sqrt(fan-in).
  in.x = uniform_values<T>(c.tokens * h, 1.0, gen);
  in.gate_up = uniform_values<T>(e_count * 2 * i * h, 2.0 / std::sqrt(double(h)), gen);
  in.down = uniform_values<T>(e_count * h * i, 2.0 / std::sqrt(double(i)), gen);
  in.weights.resize(s);
  for (auto& w : in.weights) w = static_cast<acc_type_t<T>>(unit(gen));
  return in;
}

// ---- the float64 reference and its error bounds ------------------------------------------------
// Per routed row r (expert-sorted, pair p = sorted_pairs[r]): value and error bound of h, a, y.
struct Reference {
  Plan plan;
  std::vector<double> h, h_err;      // [S, 2I]
  std::vector<double> a, a_err;      // [S, I]
  std::vector<double> y, y_err;      // [S, H]
  std::vector<double> out, out_err;  // [T, H]
};

// Expert of each row of the plan (E for the dropped rows).
std::vector<int64_t> row_experts(const Plan& plan) {
  const int64_t e_count = static_cast<int64_t>(plan.offsets.size()) - 1;
  std::vector<int64_t> expert(plan.sorted_pairs.size(), e_count);
  for (int64_t e = 0; e < e_count; ++e) {
    for (int64_t r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) expert[r] = e;
  }
  return expert;
}

template <typename T, typename index_t>
Reference reference(const Case& c, const Inputs<T, index_t>& in) {
  const int64_t s = c.rows(), h = c.hidden, i = c.inter, k = c.top_k;
  const double u_f = kFloatRoundoff, l = kSiluLipschitz;
  Reference ref;
  ref.plan = reference_plan(in.ids, c.experts);
  const std::vector<int64_t> expert = row_experts(ref.plan);
  ref.h.assign(s * 2 * i, 0.0);
  ref.h_err.assign(s * 2 * i, 0.0);
  ref.a.assign(s * i, 0.0);
  ref.a_err.assign(s * i, 0.0);
  ref.y.assign(s * h, 0.0);
  ref.y_err.assign(s * h, 0.0);
  for (int64_t r = 0; r < s; ++r) {
    const int64_t e = expert[r];
    if (e == c.experts) continue;  // dropped row: every stage gives exact zeros
    const int64_t t = ref.plan.sorted_pairs[r] / k;
    for (int64_t n = 0; n < 2 * i; ++n) {
      const T* w = in.gate_up.data() + (e * 2 * i + n) * h;
      double sum = 0, mag = 0;
      for (int64_t kk = 0; kk < h; ++kk) {
        const double prod = as_double(in.x[t * h + kk]) * as_double(w[kk]);
        sum += prod;
        mag += std::abs(prod);
      }
      ref.h[r * 2 * i + n] = sum;
      ref.h_err[r * 2 * i + n] = rounded<T>(sum, 2.0 * (h + 3) * u_f * mag);
    }
    for (int64_t j = 0; j < i; ++j) {
      const double g = ref.h[r * 2 * i + j], up = ref.h[r * 2 * i + i + j];
      const double eg = ref.h_err[r * 2 * i + j], eu = ref.h_err[r * 2 * i + i + j];
      const double a = kernels::silu_glu(g, up);
      const double prop =
          (std::abs(kernels::silu_glu(g, 1.0)) + l * eg) * eu + l * std::abs(up) * eg;
      ref.a[r * i + j] = a;
      ref.a_err[r * i + j] = rounded<T>(a, prop + kSwigluRelErr * (std::abs(a) + prop));
    }
    for (int64_t n = 0; n < h; ++n) {
      const T* w = in.down.data() + (e * h + n) * i;
      double sum = 0, mag = 0, prop = 0;
      for (int64_t j = 0; j < i; ++j) {
        const double wd = std::abs(as_double(w[j]));
        sum += ref.a[r * i + j] * as_double(w[j]);
        mag += (std::abs(ref.a[r * i + j]) + ref.a_err[r * i + j]) * wd;
        prop += ref.a_err[r * i + j] * wd;
      }
      ref.y[r * h + n] = sum;
      ref.y_err[r * h + n] = rounded<T>(sum, prop + 2.0 * (i + 3) * u_f * mag);
    }
  }
  ref.out.assign(c.tokens * h, 0.0);
  ref.out_err.assign(c.tokens * h, 0.0);
  for (int64_t t = 0; t < c.tokens; ++t) {
    for (int64_t n = 0; n < h; ++n) {
      double sum = 0, mag = 0, prop = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const int64_t row = ref.plan.pair_to_row[t * k + kk];
        if (row < 0) continue;
        const double w = in.weights[t * k + kk];
        sum += w * ref.y[row * h + n];
        mag += w * (std::abs(ref.y[row * h + n]) + ref.y_err[row * h + n]);
        prop += w * ref.y_err[row * h + n];
      }
      ref.out[t * h + n] = sum;
      ref.out_err[t * h + n] = rounded<T>(sum, prop + 2.0 * (k + 2) * u_f * mag);
    }
  }
  return ref;
}

// ---- device buffers and the chain --------------------------------------------------------------
template <typename T, typename index_t>
struct Pipeline {
  explicit Pipeline(const Case& shape)
      : c(shape),
        ids(shape.rows()),
        x(shape.tokens * shape.hidden),
        gate_up(shape.experts * 2 * shape.inter * shape.hidden),
        down(shape.experts * shape.hidden * shape.inter),
        weights(shape.rows()),
        sorted_pairs(shape.rows()),
        pair_to_row(shape.rows()),
        offsets(shape.experts + 1),
        x_sorted(shape.rows() * shape.hidden),
        h(shape.rows() * 2 * shape.inter),
        a(shape.rows() * shape.inter),
        y_sorted(shape.rows() * shape.hidden),
        out(shape.tokens * shape.hidden) {
    EXPECT_EQ(kernels::routing_workspace_bytes(shape.rows(), shape.experts, &workspace_bytes),
              cudaSuccess);
    workspace = std::make_unique<DeviceBuffer<unsigned char>>(workspace_bytes);
  }

  void upload(const Inputs<T, index_t>& in) {
    ids.upload(in.ids);
    x.upload(in.x);
    gate_up.upload(in.gate_up);
    down.upload(in.down);
    weights.upload(in.weights);
  }

  // 0xFF bytes everywhere the chain writes: NaN in the data, -1 in the plan.
  void poison() {
    for (DeviceBuffer<int32_t>* b : {&sorted_pairs, &pair_to_row, &offsets}) b->poison(0xFF);
    for (DeviceBuffer<T>* b : {&x_sorted, &h, &a, &y_sorted, &out}) b->poison(0xFF);
    workspace->poison(0xFF);
  }

  // The six launchers on `stream`, in order; the first error. gather_x: no permute, the gate_up
  // GEMM reads the token rows of x through the plan (RowGather: token sorted_pairs[r] / K), as
  // the fused layer does; x_sorted is then left unwritten.
  cudaError_t launch(cudaStream_t stream, bool gather_x = false) const {
    const int64_t s = c.rows(), hid = c.hidden, inter = c.inter;
    cudaError_t err =
        kernels::launch_routing(ids.data(), s, c.experts, sorted_pairs.data(), pair_to_row.data(),
                                offsets.data(), workspace->data(), workspace_bytes, stream);
    if (err != cudaSuccess) return err;
    if (!gather_x) {
      err = kernels::launch_permute<T>(x.data(), sorted_pairs.data(), pair_to_row.data(), nullptr,
                                       x_sorted.data(), c.tokens, c.top_k, hid, stream);
      if (err != cudaSuccess) return err;
    }
    kernels::GroupedGemmArgs<T, T, T> up;  // h = x_sorted @ gate_up_e^T, gate_up [E, 2I, H]
    up.x = gather_x ? x.data() : x_sorted.data();
    if (gather_x) up.x_rows = {sorted_pairs.data(), c.top_k, c.tokens};
    up.ldx = hid;
    up.w = gate_up.data();
    up.w_stride_e = 2 * inter * hid;
    up.w_stride_k = 1;
    up.w_stride_n = hid;
    up.expert_offsets = offsets.data();
    up.y = h.data();
    up.ldy = 2 * inter;
    up.num_rows = s;
    up.k = hid;
    up.n = 2 * inter;
    up.num_experts = c.experts;
    up.engine = engine_of<T>();
    err = kernels::launch_grouped_gemm(up, stream);
    if (err != cudaSuccess) return err;
    err = kernels::launch_swiglu<T>(h.data(), a.data(), s, inter, kernels::GluVariant::kSilu, 1.0,
                                    0.0, stream);
    if (err != cudaSuccess) return err;
    kernels::GroupedGemmArgs<T, T, T> dn;  // y_sorted = a @ down_e^T, down [E, H, I]
    dn.x = a.data();
    dn.ldx = inter;
    dn.w = down.data();
    dn.w_stride_e = hid * inter;
    dn.w_stride_k = 1;
    dn.w_stride_n = inter;
    dn.expert_offsets = offsets.data();
    dn.y = y_sorted.data();
    dn.ldy = hid;
    dn.num_rows = s;
    dn.k = inter;
    dn.n = hid;
    dn.num_experts = c.experts;
    dn.engine = engine_of<T>();
    err = kernels::launch_grouped_gemm(dn, stream);
    if (err != cudaSuccess) return err;
    return kernels::launch_combine<T>(y_sorted.data(), pair_to_row.data(), weights.data(),
                                      out.data(), c.tokens, c.top_k, hid, stream);
  }

  const Case& c;
  DeviceBuffer<index_t> ids;
  DeviceBuffer<T> x, gate_up, down;
  DeviceBuffer<acc_type_t<T>> weights;
  DeviceBuffer<int32_t> sorted_pairs, pair_to_row, offsets;
  DeviceBuffer<T> x_sorted, h, a, y_sorted, out;
  size_t workspace_bytes = 0;
  std::unique_ptr<DeviceBuffer<unsigned char>> workspace;
};

// ---- checks ------------------------------------------------------------------------------------
template <typename T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> d(v.size());
  std::transform(v.begin(), v.end(), d.begin(), [](T e) { return as_double(e); });
  return d;
}

// Downloads every intermediate and the output of a finished run and checks them against the
// reference of `in`.
template <typename T, typename index_t>
void check_run(const Pipeline<T, index_t>& pl, const Inputs<T, index_t>& in) {
  const Case& c = pl.c;
  const int64_t s = c.rows(), hid = c.hidden, inter = c.inter, k = c.top_k;
  const double u_f = kFloatRoundoff;
  const Reference ref = reference(c, in);

  // The plan, exactly.
  EXPECT_EQ(pl.sorted_pairs.download(), ref.plan.sorted_pairs);
  EXPECT_EQ(pl.pair_to_row.download(), ref.plan.pair_to_row);
  ASSERT_EQ(pl.offsets.download(), ref.plan.offsets);

  const std::vector<double> x_sorted = to_double(pl.x_sorted.download());
  const std::vector<double> h = to_double(pl.h.download());
  const std::vector<double> a = to_double(pl.a.download());
  const std::vector<double> y = to_double(pl.y_sorted.download());
  const std::vector<T> out_t = pl.out.download();
  const std::vector<double> out = to_double(out_t);
  const std::vector<int64_t> expert = row_experts(ref.plan);

  // x_sorted: a copy of the token rows (bit for bit; zero rows for dropped pairs).
  std::vector<double> x_want(s * hid, 0.0);
  for (int64_t r = 0; r < s; ++r) {
    if (expert[r] == c.experts) continue;
    const int64_t t = ref.plan.sorted_pairs[r] / k;
    for (int64_t n = 0; n < hid; ++n) x_want[r * hid + n] = as_double(in.x[t * hid + n]);
  }
  expect_close(x_sorted, x_want, std::vector<double>(s * hid, 0.0), "x_sorted");

  // End to end: every stage against the float64 reference of the inputs (dropped rows: the
  // reference is 0 with bound 0, so they must be exact zeros, not poison).
  expect_close(h, ref.h, ref.h_err, "h vs reference");
  expect_close(a, ref.a, ref.a_err, "a vs reference");
  expect_close(y, ref.y, ref.y_err, "y_sorted vs reference");
  expect_close(out, ref.out, ref.out_err, "out vs reference");

  // Stage by stage, from the device's previous stage: swiglu and the down GEMM with the bound of
  // their own evaluation and rounding only, combine bit for bit.
  std::vector<double> a_loc(s * inter, 0.0), a_tol(s * inter, 0.0);
  std::vector<double> y_loc(s * hid, 0.0), y_tol(s * hid, 0.0);
  for (int64_t r = 0; r < s; ++r) {
    const int64_t e = expert[r];
    if (e == c.experts) continue;
    for (int64_t j = 0; j < inter; ++j) {
      const double v = kernels::silu_glu(h[r * 2 * inter + j], h[r * 2 * inter + inter + j]);
      a_loc[r * inter + j] = v;
      a_tol[r * inter + j] = rounded<T>(v, kSwigluRelErr * std::abs(v));
    }
    for (int64_t n = 0; n < hid; ++n) {
      const T* w = in.down.data() + (e * hid + n) * inter;
      double sum = 0, mag = 0;
      for (int64_t j = 0; j < inter; ++j) {
        const double prod = a[r * inter + j] * as_double(w[j]);
        sum += prod;
        mag += std::abs(prod);
      }
      y_loc[r * hid + n] = sum;
      y_tol[r * hid + n] = rounded<T>(sum, 2.0 * (inter + 3) * u_f * mag);
    }
  }
  expect_close(a, a_loc, a_tol, "a vs swiglu(device h)");
  expect_close(y, y_loc, y_tol, "y_sorted vs device a @ down^T");

  // combine in float, ascending k, w * y rounded then added (the kernel's explicitly rounded ops).
  const std::vector<T> y_t = pl.y_sorted.download();
  std::vector<double> out_loc(c.tokens * hid);
  for (int64_t t = 0; t < c.tokens; ++t) {
    for (int64_t n = 0; n < hid; ++n) {
      acc_type_t<T> acc = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const int64_t row = ref.plan.pair_to_row[t * k + kk];
        if (row < 0) continue;
        const acc_type_t<T> prod = in.weights[t * k + kk] * to_acc(y_t[row * hid + n]);
        acc = acc + prod;
      }
      out_loc[t * hid + n] = as_double(from_acc<T>(acc));
    }
  }
  expect_close(out, out_loc, std::vector<double>(c.tokens * hid, 0.0), "out vs combine(device y)");
}

// Runs `body` with index type int64 or int32 as the case asks.
template <typename Body>
void with_index_type(const Case& c, Body body) {
  if (c.ids64) {
    body(int64_t{});
  } else {
    body(int32_t{});
  }
}

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <typename T>
class MoePipelineTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using ElementTypes = ::testing::Types<float, __nv_bfloat16, __half>;
TYPED_TEST_SUITE(MoePipelineTest, ElementTypes);

TYPED_TEST(MoePipelineTest, EagerMatchesReference) {
  using T = TypeParam;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    with_index_type(c, [&](auto index) {
      using index_t = decltype(index);
      const Inputs<T, index_t> in = make_inputs<T, index_t>(c, c.sets[0]);
      Pipeline<T, index_t> pl(c);
      pl.upload(in);
      pl.poison();
      cudaStream_t stream = nullptr;
      MOEFORGE_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());  // uploads and memsets: legacy stream
      EXPECT_EQ(pl.launch(stream), cudaSuccess);
      EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      cudaStreamDestroy(stream);
      check_run(pl, in);
    });
  }
}

// The gather fused into the gate_up GEMM reads the same rows in the same order as permuting
// first: h and out are bitwise those of the permuting pipeline, eager and in a graph replayed on
// new inputs (the index is read from the device plan at run time).
TYPED_TEST(MoePipelineTest, GatherFusedIntoGateUpEqualsPermuteFirst) {
  using T = TypeParam;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    with_index_type(c, [&](auto index) {
      using index_t = decltype(index);
      Pipeline<T, index_t> pl(c);
      cudaStream_t stream = nullptr;
      MOEFORGE_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      MOEFORGE_ASSERT_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      EXPECT_EQ(pl.launch(stream, /*gather_x=*/true), cudaSuccess);
      MOEFORGE_ASSERT_CUDA(cudaStreamEndCapture(stream, &graph));
      MOEFORGE_ASSERT_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      for (int set = 0; set < 2; ++set) {
        SCOPED_TRACE("input set " + std::to_string(set));
        pl.upload(make_inputs<T, index_t>(c, c.sets[set]));
        pl.poison();
        MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_EQ(pl.launch(stream), cudaSuccess);
        MOEFORGE_ASSERT_CUDA(cudaStreamSynchronize(stream));
        const std::vector<T> h_want = pl.h.download(), out_want = pl.out.download();
        for (const bool graph_run : {false, true}) {
          SCOPED_TRACE(graph_run ? "graph replay" : "eager");
          pl.poison();
          MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
          if (graph_run) {
            MOEFORGE_ASSERT_CUDA(cudaGraphLaunch(exec, stream));
          } else {
            EXPECT_EQ(pl.launch(stream, /*gather_x=*/true), cudaSuccess);
          }
          MOEFORGE_ASSERT_CUDA(cudaStreamSynchronize(stream));
          EXPECT_TRUE(bitwise_equal(pl.h.download(), h_want)) << "h";
          EXPECT_TRUE(bitwise_equal(pl.out.download(), out_want)) << "out";
        }
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
      cudaStreamDestroy(stream);
    });
  }
}

TYPED_TEST(MoePipelineTest, CapturedInCudaGraphReplaysOnNewInputs) {
  using T = TypeParam;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    with_index_type(c, [&](auto index) {
      using index_t = decltype(index);
      const Inputs<T, index_t> captured = make_inputs<T, index_t>(c, c.sets[0]);
      const Plan first = reference_plan(captured.ids, c.experts);
      Pipeline<T, index_t> pl(c);
      pl.upload(captured);
      pl.poison();
      cudaStream_t stream = nullptr;
      MOEFORGE_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      MOEFORGE_ASSERT_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      EXPECT_EQ(pl.launch(stream), cudaSuccess);
      MOEFORGE_ASSERT_CUDA(cudaStreamEndCapture(stream, &graph));
      MOEFORGE_ASSERT_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      for (int set = 1; set < 3; ++set) {
        SCOPED_TRACE("input set " + std::to_string(set));
        const Inputs<T, index_t> in = make_inputs<T, index_t>(c, c.sets[set]);
        // The premise: other expert counts than the inputs present at capture.
        EXPECT_NE(reference_plan(in.ids, c.experts).offsets, first.offsets);
        pl.poison();
        pl.upload(in);
        MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());  // the memsets and copies: legacy stream
        MOEFORGE_ASSERT_CUDA(cudaGraphLaunch(exec, stream));
        MOEFORGE_ASSERT_CUDA(cudaStreamSynchronize(stream));
        check_run(pl, in);
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
      cudaStreamDestroy(stream);
    });
  }
}

}  // namespace
}  // namespace moeforge::testing
