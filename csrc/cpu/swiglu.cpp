// CPU gated activation (forward and backward), threaded over rows; math in float (double for
// float64) from kernels/include/moeforge/kernels/swiglu_math.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "moeforge/kernels/swiglu_math.h"
#include "validation.h"

namespace moeforge {
namespace {

constexpr int64_t kRowGrain = 16;

// Column of the gate / up value of output column j, for a row of 2I values.
struct GateUpColumns {
  bool interleaved;
  int64_t intermediate;
  int64_t gate(int64_t j) const { return interleaved ? 2 * j : j; }
  int64_t up(int64_t j) const { return interleaved ? 2 * j + 1 : intermediate + j; }
};

at::Tensor swiglu_cpu(const at::Tensor& h_in, c10::string_view variant, double alpha,
                      double limit) {
  check_swiglu_inputs(h_in, variant, alpha, limit);
  const SwigluVariant v = parse_swiglu_variant("swiglu", variant);
  const at::Tensor h = h_in.contiguous();
  const int64_t rows = h.size(0), inter = h.size(1) / 2;
  const GateUpColumns cols{v == SwigluVariant::kGptOss, inter};
  at::Tensor out = at::empty({rows, inter}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "moeforge.swiglu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* in = h.const_data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        const acc_t a = static_cast<acc_t>(alpha), lim = static_cast<acc_t>(limit);
        at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* row = in + r * 2 * inter;
            for (int64_t j = 0; j < inter; ++j) {
              const acc_t g = row[cols.gate(j)], u = row[cols.up(j)];
              const acc_t y = v == SwigluVariant::kSilu ? kernels::silu_glu(g, u)
                                                        : kernels::gpt_oss_glu(g, u, a, lim);
              o[r * inter + j] = static_cast<scalar_t>(y);
            }
          }
        });
      });
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_a_in, const at::Tensor& h_in,
                               c10::string_view variant, double alpha, double limit) {
  check_swiglu_backward_inputs(grad_a_in, h_in, variant, alpha, limit);
  const SwigluVariant v = parse_swiglu_variant("swiglu_backward", variant);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor grad_a = grad_a_in.contiguous();
  const int64_t rows = h.size(0), inter = h.size(1) / 2;
  const GateUpColumns cols{v == SwigluVariant::kGptOss, inter};
  at::Tensor grad_h = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "moeforge.swiglu_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* in = h.data_ptr<scalar_t>();
        const scalar_t* ga = grad_a.data_ptr<scalar_t>();
        scalar_t* gh = grad_h.data_ptr<scalar_t>();
        const acc_t a = static_cast<acc_t>(alpha), lim = static_cast<acc_t>(limit);
        at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* row = in + r * 2 * inter;
            scalar_t* grow = gh + r * 2 * inter;
            for (int64_t j = 0; j < inter; ++j) {
              const acc_t g = row[cols.gate(j)], u = row[cols.up(j)], dy = ga[r * inter + j];
              acc_t dg, du;
              if (v == SwigluVariant::kSilu) {
                kernels::silu_glu_backward(dy, g, u, &dg, &du);
              } else {
                kernels::gpt_oss_glu_backward(dy, g, u, a, lim, &dg, &du);
              }
              grow[cols.gate(j)] = static_cast<scalar_t>(dg);
              grow[cols.up(j)] = static_cast<scalar_t>(du);
            }
          }
        });
      });
  return grad_h;
}

// See the schema in csrc/registration.cpp: grad_h, the recomputed weighted activation and the
// per-row dot products <grad_aw[r], a(h[r])>, summed in acc_t in column order.
// grad_h may be h itself: each element pair is read before it is overwritten, by the same
// iteration (weighted_swiglu_backward_).
std::tuple<at::Tensor, at::Tensor> weighted_swiglu_backward_into(
    const at::Tensor& grad_aw_in, const at::Tensor& h, const at::Tensor& row_weights_in,
    SwigluVariant v, double alpha, double limit, bool want_weighted_act, at::Tensor& grad_h) {
  const at::Tensor grad_aw = grad_aw_in.contiguous();
  const int64_t rows = h.size(0), inter = h.size(1) / 2;
  const GateUpColumns cols{v == SwigluVariant::kGptOss, inter};
  const at::ScalarType acc_dtype = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor row_weights = row_weights_in.to(acc_dtype).contiguous();
  at::Tensor weighted_act =
      want_weighted_act ? at::empty({rows, inter}, h.options()) : at::empty({0}, h.options());
  at::Tensor grad_row_weights = at::empty({rows}, h.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "moeforge.weighted_swiglu_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* in = h.data_ptr<scalar_t>();
        const scalar_t* ga = grad_aw.data_ptr<scalar_t>();
        const acc_t* w = row_weights.data_ptr<acc_t>();
        scalar_t* gh = grad_h.data_ptr<scalar_t>();
        scalar_t* aw = want_weighted_act ? weighted_act.data_ptr<scalar_t>() : nullptr;
        acc_t* gw = grad_row_weights.data_ptr<acc_t>();
        const acc_t a = static_cast<acc_t>(alpha), lim = static_cast<acc_t>(limit);
        at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* row = in + r * 2 * inter;
            scalar_t* grow = gh + r * 2 * inter;
            acc_t dot = 0;
            for (int64_t j = 0; j < inter; ++j) {
              const acc_t g = row[cols.gate(j)], u = row[cols.up(j)], dy = ga[r * inter + j];
              acc_t dg, du;
              const acc_t act = kernels::glu_with_backward(v == SwigluVariant::kGptOss, w[r] * dy,
                                                           g, u, a, lim, &dg, &du);
              dot += dy * act;
              grow[cols.gate(j)] = static_cast<scalar_t>(dg);
              grow[cols.up(j)] = static_cast<scalar_t>(du);
              if (aw != nullptr) aw[r * inter + j] = static_cast<scalar_t>(w[r] * act);
            }
            gw[r] = dot;
          }
        });
      });
  return {weighted_act, grad_row_weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_swiglu_backward_cpu(
    const at::Tensor& grad_aw, const at::Tensor& h_in, const at::Tensor& row_weights,
    c10::string_view variant, double alpha, double limit, bool want_weighted_act) {
  check_weighted_swiglu_backward_inputs(grad_aw, h_in, row_weights, variant, alpha, limit);
  const SwigluVariant v = parse_swiglu_variant("weighted_swiglu_backward", variant);
  const at::Tensor h = h_in.contiguous();
  at::Tensor grad_h = at::empty_like(h);
  auto [weighted_act, grad_row_weights] = weighted_swiglu_backward_into(
      grad_aw, h, row_weights, v, alpha, limit, want_weighted_act, grad_h);
  return {grad_h, weighted_act, grad_row_weights};
}

std::tuple<at::Tensor, at::Tensor> weighted_swiglu_backward_inplace_cpu(
    at::Tensor& h, const at::Tensor& grad_aw, const at::Tensor& row_weights,
    c10::string_view variant, double alpha, double limit, bool want_weighted_act) {
  check_weighted_swiglu_backward_inplace_inputs(h, grad_aw, row_weights, variant, alpha, limit);
  const SwigluVariant v = parse_swiglu_variant("weighted_swiglu_backward_", variant);
  return weighted_swiglu_backward_into(grad_aw, h, row_weights, v, alpha, limit, want_weighted_act,
                                       h);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("weighted_swiglu_backward", &weighted_swiglu_backward_cpu);
  m.impl("weighted_swiglu_backward_", &weighted_swiglu_backward_inplace_cpu);
}

}  // namespace moeforge
