// CUDA gated activation: the glue around kernels/swiglu.cu. Same semantics and validation as
// csrc/cpu/swiglu.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "cuda_utils.h"
#include "moeforge/kernels/swiglu.h"
#include "validation.h"

namespace moeforge {
namespace {

kernels::GluVariant to_kernel(SwigluVariant v) {
  return v == SwigluVariant::kGptOss ? kernels::GluVariant::kGptOss : kernels::GluVariant::kSilu;
}

at::Tensor swiglu_cuda(const at::Tensor& h_in, c10::string_view variant, double alpha,
                       double limit) {
  check_swiglu_inputs(h_in, variant, alpha, limit);
  const auto v = to_kernel(parse_swiglu_variant("swiglu", variant));
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const int64_t rows = h.size(0), inter = h.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "moeforge.swiglu", [&] {
        check_cuda(
            kernels::launch_swiglu(cuda_ptr<scalar_t>(h), cuda_mutable_ptr<scalar_t>(out), rows,
                                   inter, v, alpha, limit, at::cuda::getCurrentCUDAStream()),
            "swiglu");
      });
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_a_in, const at::Tensor& h_in,
                                c10::string_view variant, double alpha, double limit) {
  check_swiglu_backward_inputs(grad_a_in, h_in, variant, alpha, limit);
  const auto v = to_kernel(parse_swiglu_variant("swiglu_backward", variant));
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const at::Tensor grad_a = grad_a_in.contiguous();
  const int64_t rows = h.size(0), inter = h.size(1) / 2;
  at::Tensor grad_h = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "moeforge.swiglu_backward", [&] {
        check_cuda(
            kernels::launch_swiglu_backward(cuda_ptr<scalar_t>(grad_a), cuda_ptr<scalar_t>(h),
                                            cuda_mutable_ptr<scalar_t>(grad_h), rows, inter, v,
                                            alpha, limit, at::cuda::getCurrentCUDAStream()),
            "swiglu_backward");
      });
  return grad_h;
}

// grad_h may be h itself (the kernels read each element before they overwrite it, in the same
// thread: kernels/include/moeforge/kernels/swiglu.h).
std::tuple<at::Tensor, at::Tensor> weighted_swiglu_backward_into(
    const at::Tensor& grad_aw_in, const at::Tensor& h, const at::Tensor& row_weights_in,
    kernels::GluVariant v, double alpha, double limit, bool want_weighted_act, at::Tensor& grad_h,
    std::string_view op) {
  const at::Tensor grad_aw = grad_aw_in.contiguous();
  const int64_t rows = h.size(0), inter = h.size(1) / 2;
  const at::ScalarType acc_dtype = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor row_weights = row_weights_in.to(acc_dtype).contiguous();
  at::Tensor weighted_act =
      want_weighted_act ? at::empty({rows, inter}, h.options()) : at::empty({0}, h.options());
  at::Tensor grad_row_weights = at::empty({rows}, h.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "moeforge.weighted_swiglu_backward", [&] {
        using T = cuda_type_t<scalar_t>;
        using acc_t = kernels::acc_type_t<T>;
        check_cuda(kernels::launch_weighted_swiglu_backward(
                       cuda_ptr<scalar_t>(grad_aw), cuda_ptr<scalar_t>(h),
                       static_cast<const acc_t*>(row_weights.const_data_ptr()),
                       cuda_mutable_ptr<scalar_t>(grad_h),
                       want_weighted_act ? cuda_mutable_ptr<scalar_t>(weighted_act) : nullptr,
                       static_cast<acc_t*>(grad_row_weights.mutable_data_ptr()), rows, inter, v,
                       alpha, limit, at::cuda::getCurrentCUDAStream()),
                   op);
      });
  return {weighted_act, grad_row_weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_swiglu_backward_cuda(
    const at::Tensor& grad_aw, const at::Tensor& h_in, const at::Tensor& row_weights,
    c10::string_view variant, double alpha, double limit, bool want_weighted_act) {
  constexpr std::string_view op = "weighted_swiglu_backward";
  check_weighted_swiglu_backward_inputs(grad_aw, h_in, row_weights, variant, alpha, limit);
  const auto v = to_kernel(parse_swiglu_variant(op, variant));
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  at::Tensor grad_h = at::empty_like(h);
  auto [weighted_act, grad_row_weights] = weighted_swiglu_backward_into(
      grad_aw, h, row_weights, v, alpha, limit, want_weighted_act, grad_h, op);
  return {grad_h, weighted_act, grad_row_weights};
}

std::tuple<at::Tensor, at::Tensor> weighted_swiglu_backward_inplace_cuda(
    at::Tensor& h, const at::Tensor& grad_aw, const at::Tensor& row_weights,
    c10::string_view variant, double alpha, double limit, bool want_weighted_act) {
  constexpr std::string_view op = "weighted_swiglu_backward_";
  check_weighted_swiglu_backward_inplace_inputs(h, grad_aw, row_weights, variant, alpha, limit);
  const auto v = to_kernel(parse_swiglu_variant(op, variant));
  const c10::cuda::CUDAGuard guard(h.device());
  return weighted_swiglu_backward_into(grad_aw, h, row_weights, v, alpha, limit, want_weighted_act,
                                       h, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
  m.impl("weighted_swiglu_backward", &weighted_swiglu_backward_cuda);
  m.impl("weighted_swiglu_backward_", &weighted_swiglu_backward_inplace_cuda);
}

}  // namespace moeforge
