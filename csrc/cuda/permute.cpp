// CUDA permute / combine / routed_dot: the glue around kernels/permute.cu. Same semantics and
// validation as csrc/cpu/permute.cpp; float32/float64 results equal the CPU kernels bit for bit
// (routed_dot up to summation order). Routing weights are converted to the accumulation type
// (float32, float64 for float64 data) before the launch, as on CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "cuda_utils.h"
#include "moeforge/kernels/permute.h"
#include "validation.h"

namespace moeforge {
namespace {

// Routing weights [T, K] as a contiguous tensor of the accumulation type, or undefined.
at::Tensor weights_as(const std::optional<at::Tensor>& weights, at::ScalarType acc) {
  return weights.has_value() ? weights->to(acc).contiguous() : at::Tensor();
}

template <typename acc_t>
const acc_t* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& sorted_pairs_in,
                        const at::Tensor& pair_to_row_in,
                        const std::optional<at::Tensor>& weights) {
  check_permute_inputs(x_in, sorted_pairs_in, pair_to_row_in, weights);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor sorted_pairs = sorted_pairs_in.contiguous();
  const at::Tensor pair_to_row = pair_to_row_in.contiguous();
  const int64_t num_tokens = x.size(0), top_k = pair_to_row.size(1), hidden = x.size(1);
  at::Tensor out = at::empty({sorted_pairs.numel(), hidden}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "moeforge.permute", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor w = weights_as(weights, c10::CppTypeToScalarType<acc_t>::value);
        check_cuda(kernels::launch_permute(
                       cuda_ptr<scalar_t>(x), sorted_pairs.const_data_ptr<int32_t>(),
                       pair_to_row.const_data_ptr<int32_t>(), optional_ptr<acc_t>(w),
                       cuda_mutable_ptr<scalar_t>(out), num_tokens, top_k, hidden, stream),
                   "permute");
      });
  return out;
}

at::Tensor combine_cuda(const at::Tensor& y_in, const at::Tensor& sorted_pairs,
                        const at::Tensor& pair_to_row_in,
                        const std::optional<at::Tensor>& weights) {
  check_combine_inputs(y_in, sorted_pairs, pair_to_row_in, weights);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor pair_to_row = pair_to_row_in.contiguous();
  const int64_t num_tokens = pair_to_row.size(0), top_k = pair_to_row.size(1), hidden = y.size(1);
  at::Tensor out = at::empty({num_tokens, hidden}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "moeforge.combine", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor w = weights_as(weights, c10::CppTypeToScalarType<acc_t>::value);
        check_cuda(
            kernels::launch_combine(cuda_ptr<scalar_t>(y), pair_to_row.const_data_ptr<int32_t>(),
                                    optional_ptr<acc_t>(w), cuda_mutable_ptr<scalar_t>(out),
                                    num_tokens, top_k, hidden, stream),
            "combine");
      });
  return out;
}

at::Tensor routed_dot_cuda(const at::Tensor& rows_in, const at::Tensor& tokens_in,
                           const at::Tensor& pair_to_row_in) {
  check_routed_dot_inputs(rows_in, tokens_in, pair_to_row_in);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor pair_to_row = pair_to_row_in.contiguous();
  const int64_t num_tokens = tokens.size(0), top_k = pair_to_row.size(1), hidden = rows.size(1);
  at::Tensor out = at::empty({num_tokens, top_k}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows.scalar_type(), "moeforge.routed_dot", [&] {
        check_cuda(kernels::launch_routed_dot(cuda_ptr<scalar_t>(rows), cuda_ptr<scalar_t>(tokens),
                                              pair_to_row.const_data_ptr<int32_t>(),
                                              cuda_mutable_ptr<scalar_t>(out), num_tokens, top_k,
                                              hidden, stream),
                   "routed_dot");
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("routed_dot", &routed_dot_cuda);
}

}  // namespace moeforge
