// CUDA grouped_mm / grouped_mm_backward: the glue around the grouped GEMM engine
// (kernels/grouped_gemm*.cu, moeforge/kernels/grouped_gemm.h). Same semantics and validation as
// csrc/cpu/grouped_mm.cpp: fp32 accumulation for the half types (fp64 for float64), rows past
// expert_offsets[E] are zero, experts without rows get zero weight / bias gradients, and an
// output_mask entry that is False costs no work and returns an empty tensor.
//
// No host synchronisation: expert_offsets stays on the device and only the kernels read it, so
// these ops can be captured in a CUDA graph. Its values therefore cannot be validated here (the
// CPU kernels do validate them); instead the kernels read the offsets defensively, clamped into
// [0, num_rows] and made non-decreasing, so that bad offsets give wrong rows but never an
// out-of-bounds read or write (see grouped_gemm.h). The weight is read in place with its own
// strides (any layout, no copy); x and grad_out only need unit stride along features.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "cuda_utils.h"
#include "moeforge/kernels/grouped_gemm.h"
#include "validation.h"

namespace moeforge {
namespace {

int64_t row_stride(const at::Tensor& t) {
  return t.stride(0);
}

// Strides (e, k, n) of expert e's weight as the [k, n] operand of a row-grouped GEMM, read in
// place from weight [E, out, in] or, transposed, [E, in, out]. forward: [in, out], so that
// y = x @ operand; else [out, in], so that grad_x = grad_out @ operand.
std::array<int64_t, 3> weight_operand(const at::Tensor& weight, bool weight_transposed,
                                      bool forward) {
  const int64_t in = weight.stride(weight_transposed ? 1 : 2);
  const int64_t out = weight.stride(weight_transposed ? 2 : 1);
  return {weight.stride(0), forward ? in : out, forward ? out : in};
}

template <typename scalar_t>
void launch_rows(const at::Tensor& x, const at::Tensor& weight, std::array<int64_t, 3> ws,
                 const at::Tensor& bias, const at::Tensor& offsets, at::Tensor& out,
                 std::string_view op, cudaStream_t stream) {
  using T = cuda_type_t<scalar_t>;
  kernels::GroupedGemmArgs<T, T, T> args;
  args.x = cuda_ptr<scalar_t>(x);
  args.ldx = row_stride(x);
  args.w = cuda_ptr<scalar_t>(weight);
  args.w_stride_e = ws[0];
  args.w_stride_k = ws[1];
  args.w_stride_n = ws[2];
  if (bias.defined()) {
    args.bias = cuda_ptr<scalar_t>(bias);
    args.bias_stride_e = bias.stride(0);
  }
  args.expert_offsets = offsets.const_data_ptr<int32_t>();
  args.y = cuda_mutable_ptr<scalar_t>(out);
  args.ldy = out.size(1);
  args.num_rows = x.size(0);
  args.k = x.size(1);
  args.n = out.size(1);
  args.num_experts = weight.size(0);
  check_cuda(kernels::launch_grouped_gemm(args, stream), op);
}

// out [S, n] = x @ W_e per expert (+ bias[e]); rows past offsets[E] zero. See weight_operand.
at::Tensor grouped_gemm(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& offsets,
                        const std::optional<at::Tensor>& bias_in, bool weight_transposed,
                        bool forward, std::string_view op, cudaStream_t stream) {
  const at::Tensor x = as_rows(x_in);
  const int64_t n = weight.size(forward == weight_transposed ? 2 : 1);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const std::array<int64_t, 3> ws = weight_operand(weight, weight_transposed, forward);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "moeforge.grouped_mm",
      [&] { launch_rows<scalar_t>(x, weight, ws, bias, offsets, out, op, stream); });
  return out;
}

at::Tensor grouped_mm_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& bias,
                           bool weight_transposed) {
  check_grouped_mm_inputs(x, weight, expert_offsets, bias, weight_transposed);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  return grouped_gemm(x, weight, expert_offsets.contiguous(), bias, weight_transposed,
                      /*forward=*/true, "grouped_mm", stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& expert_offsets, bool weight_transposed, std::array<bool, 3> output_mask) {
  constexpr std::string_view op = "grouped_mm_backward";
  check_grouped_mm_backward_inputs(grad_out_in, x_in, weight, expert_offsets, weight_transposed);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor offsets = expert_offsets.contiguous();
  const at::Tensor grad_out = as_rows(grad_out_in);
  const int64_t num_rows = x_in.size(0), num_experts = weight.size(0);
  const int64_t out_features = grad_out.size(1);
  const auto empty = [&] { return at::empty({0}, x_in.options()); };

  // grad_x = grad_out @ W_e read as [out, in]: the row-grouped GEMM again, dropped rows zero.
  at::Tensor grad_x = output_mask[0]
                          ? grouped_gemm(grad_out, weight, offsets, std::nullopt, weight_transposed,
                                         /*forward=*/false, op, stream)
                          : empty();
  // grad_weight in the weight's own layout (contiguous): [E, out, in] = grad_out_e^T x_e, or
  // transposed [E, in, out] = x_e^T grad_out_e. The operand whose features index the weight's
  // last dimension goes second, so that the stores run along contiguous memory.
  at::Tensor grad_w = output_mask[1] ? at::empty(weight.sizes(), weight.options()) : empty();
  if (output_mask[1]) {
    const at::Tensor x = as_rows(x_in);
    const at::Tensor& first = weight_transposed ? x : grad_out;
    const at::Tensor& second = weight_transposed ? grad_out : x;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "moeforge.grouped_mm_backward", [&] {
          using T = cuda_type_t<scalar_t>;
          kernels::GroupedGemmWgradArgs<T, T, T> args;
          args.a = cuda_ptr<scalar_t>(first);
          args.lda = row_stride(first);
          args.b = cuda_ptr<scalar_t>(second);
          args.ldb = row_stride(second);
          args.expert_offsets = offsets.const_data_ptr<int32_t>();
          args.g = cuda_mutable_ptr<scalar_t>(grad_w);
          args.g_stride_e = grad_w.stride(0);
          args.g_stride_p = grad_w.stride(1);
          args.g_stride_q = grad_w.stride(2);
          args.num_rows = num_rows;
          args.p = first.size(1);
          args.q = second.size(1);
          args.num_experts = num_experts;
          check_cuda(kernels::launch_grouped_gemm_wgrad(args, stream), op);
        });
  }
  at::Tensor grad_b =
      output_mask[2] ? at::empty({num_experts, out_features}, x_in.options()) : empty();
  if (output_mask[2]) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad_out.scalar_type(), "moeforge.grouped_mm_backward", [&] {
          check_cuda(kernels::launch_grouped_row_sum(
                         cuda_ptr<scalar_t>(grad_out), row_stride(grad_out),
                         offsets.const_data_ptr<int32_t>(), cuda_mutable_ptr<scalar_t>(grad_b),
                         out_features, num_rows, out_features, num_experts, stream),
                     op);
        });
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cuda);
}

}  // namespace moeforge
