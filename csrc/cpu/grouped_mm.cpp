// CPU grouped GEMM: one ATen GEMM per expert over its contiguous block of rows (ATen threads each
// GEMM). bfloat16/float16 are computed in float32 and rounded once at the end, matching the fp32
// accumulation of the CUDA kernels. Rows past expert_offsets[E] (dropped pairs) are zero.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "row_source.h"
#include "validation.h"

namespace moeforge {
namespace {

bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// The type GEMMs run in: float32 for half types, else the tensor's own.
at::Tensor as_compute(const at::Tensor& t) {
  return is_reduced_float(t) ? t.to(at::kFloat) : t;
}

// grouped_mm on rows already in expert order (x [S, in]).
at::Tensor grouped_mm_rows(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& bias,
                           bool weight_transposed) {
  check_offsets_values("grouped_mm", expert_offsets, x.size(0));
  const int64_t num_experts = weight.size(0);
  const int64_t out_features = weight.size(weight_transposed ? 2 : 1);
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  const at::Tensor offs = expert_offsets.contiguous();
  const int32_t* o = offs.data_ptr<int32_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t begin = o[e], rows = o[e + 1] - o[e];
    if (rows == 0) continue;
    const at::Tensor w = weight.select(0, e);
    const at::Tensor w_in_out = weight_transposed ? w : w.t();  // [in, out]
    at::Tensor result = as_compute(x.narrow(0, begin, rows)).mm(as_compute(w_in_out));
    if (bias.has_value()) result.add_(as_compute(bias->select(0, e)));
    out.narrow(0, begin, rows).copy_(result);
  }
  out.narrow(0, o[num_experts], x.size(0) - o[num_experts]).zero_();
  return out;
}

at::Tensor grouped_mm_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& expert_offsets, const std::optional<at::Tensor>& bias,
                          bool weight_transposed, const std::optional<at::Tensor>& sorted_pairs,
                          const std::optional<at::Tensor>& pair_to_row) {
  check_grouped_mm_inputs(x, weight, expert_offsets, bias, weight_transposed);
  const RowSource source = row_source("grouped_mm", x, sorted_pairs, pair_to_row);
  return grouped_mm_rows(source.rows(x), weight, expert_offsets, bias, weight_transposed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& expert_offsets, bool weight_transposed, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row) {
  check_grouped_mm_inputs(x_in, weight, expert_offsets, std::nullopt, weight_transposed,
                          "grouped_mm_backward");
  const RowSource source = row_source("grouped_mm_backward", x_in, sorted_pairs, pair_to_row);
  check_grouped_mm_backward_inputs(grad_out, x_in, weight, expert_offsets, weight_transposed,
                                   source.num_rows(x_in));
  check_offsets_values("grouped_mm_backward", expert_offsets, grad_out.size(0));
  // x in expert order, gathered only where the weight gradient reads it.
  const at::Tensor x = output_mask[1] ? source.rows(x_in) : at::Tensor();
  const int64_t num_experts = weight.size(0);
  const int64_t out_features = weight.size(weight_transposed ? 2 : 1);
  const auto empty = [&] { return at::empty({0}, x_in.options()); };

  // dx = dy W_e: the forward op with the other weight orientation (per routed row).
  at::Tensor grad_x = output_mask[0] ? grouped_mm_rows(grad_out, weight, expert_offsets,
                                                       std::nullopt, !weight_transposed)
                                     : empty();
  at::Tensor grad_w =
      output_mask[1] ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : empty();
  at::Tensor grad_b =
      output_mask[2] ? at::zeros({num_experts, out_features}, x_in.options()) : empty();
  if (output_mask[1] || output_mask[2]) {
    const at::Tensor offs = expert_offsets.contiguous();
    const int32_t* o = offs.data_ptr<int32_t>();
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t begin = o[e], rows = o[e + 1] - o[e];
      if (rows == 0) continue;
      const at::Tensor dy = as_compute(grad_out.narrow(0, begin, rows));
      if (output_mask[1]) {
        const at::Tensor xe = as_compute(x.narrow(0, begin, rows));
        grad_w.select(0, e).copy_(weight_transposed ? xe.t().mm(dy) : dy.t().mm(xe));
      }
      if (output_mask[2]) grad_b.select(0, e).copy_(dy.sum(0));
    }
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cpu);
}

}  // namespace moeforge
