// CPU split LoRA on routed rows, PEFT's expert LoRA layout:
//   lora_A [E*r, in]  expert-major: A_e = lora_A[e*r : (e+1)*r]                 [r, in]
//   lora_B [out, r*E] rank-major:   B_e = lora_B.view(out, r, E)[:, :, e]       [out, r]
// Per expert, u = x_e A_e^T then delta = scaling * u B_e^T: two thin GEMMs, never B_e A_e.
// Half types compute in float32. Rows past expert_offsets[E] (dropped) are zero.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "checks.h"
#include "row_source.h"
#include "validation.h"

namespace moeforge {
namespace {

at::Tensor as_compute(const at::Tensor& t) {
  const bool reduced = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
  return reduced ? t.to(at::kFloat) : t;
}

std::tuple<at::Tensor, at::Tensor> expert_lora_cpu(const at::Tensor& x_in, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B,
                                                   const at::Tensor& expert_offsets, double scaling,
                                                   const std::optional<at::Tensor>& sorted_pairs,
                                                   const std::optional<at::Tensor>& pair_to_row) {
  const int64_t rank =
      check_expert_lora_inputs("expert_lora", x_in, lora_A, lora_B, expert_offsets);
  const at::Tensor x = row_source("expert_lora", x_in, sorted_pairs, pair_to_row).rows(x_in);
  check_offsets_values("expert_lora", expert_offsets, x.size(0));
  const int64_t num_experts = expert_offsets.size(0) - 1, out_features = lora_B.size(0);
  at::Tensor delta = at::zeros({x.size(0), out_features}, x.options());
  at::Tensor lora_u = at::zeros({x.size(0), rank}, x.options());
  const at::Tensor B = lora_B.reshape({out_features, rank, num_experts});
  const at::Tensor offs = expert_offsets.contiguous();
  const int32_t* o = offs.data_ptr<int32_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t begin = o[e], rows = o[e + 1] - o[e];
    if (rows == 0) continue;
    const at::Tensor u = as_compute(x.narrow(0, begin, rows))
                             .mm(as_compute(lora_A.narrow(0, e * rank, rank)).t());  // [n, r]
    lora_u.narrow(0, begin, rows).copy_(u);
    delta.narrow(0, begin, rows).copy_(u.mm(as_compute(B.select(2, e)).t()).mul_(scaling));
  }
  return {delta, lora_u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_lora_backward_cpu(
    const at::Tensor& grad_delta_in, const at::Tensor& x_in, const at::Tensor& lora_u,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& expert_offsets,
    double scaling, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& sorted_pairs,
    const std::optional<at::Tensor>& pair_to_row, bool x_through_plan,
    bool grad_delta_through_plan) {
  constexpr std::string_view op = "expert_lora_backward";
  check_expert_lora_inputs(op, x_in, lora_A, lora_B, expert_offsets);
  const LoraBackwardSources sources = lora_backward_sources(
      op, x_in, grad_delta_in, sorted_pairs, pair_to_row, x_through_plan, grad_delta_through_plan);
  const int64_t num_rows = sources.num_rows;
  const int64_t rank = check_expert_lora_backward_inputs(
      grad_delta_in, x_in, lora_u, lora_A, lora_B, expert_offsets, num_rows,
      sources.grad_delta.gathered() ? grad_delta_in.size(0) : num_rows);
  check_offsets_values(op, expert_offsets, num_rows);
  // x and grad_delta in expert order (x gathered only where grad_A reads it).
  const at::Tensor x = output_mask[1] ? sources.x.rows(x_in) : at::Tensor();
  const at::Tensor grad_delta = sources.grad_delta.rows(grad_delta_in);
  const int64_t num_experts = expert_offsets.size(0) - 1, out_features = lora_B.size(0);
  const auto empty = [&] { return at::empty({0}, x_in.options()); };
  at::Tensor grad_x =
      output_mask[0] ? at::zeros({num_rows, x_in.size(1)}, x_in.options()) : empty();
  at::Tensor grad_A =
      output_mask[1] ? at::zeros_like(lora_A, at::MemoryFormat::Contiguous) : empty();
  at::Tensor grad_B =
      output_mask[2] ? at::zeros_like(lora_B, at::MemoryFormat::Contiguous) : empty();
  const at::Tensor B = lora_B.reshape({out_features, rank, num_experts});
  const at::Tensor grad_B3 =
      output_mask[2] ? grad_B.view({out_features, rank, num_experts}) : at::Tensor();
  const at::Tensor offs = expert_offsets.contiguous();
  const int32_t* o = offs.data_ptr<int32_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t begin = o[e], rows = o[e + 1] - o[e];
    if (rows == 0) continue;
    const at::Tensor dd = as_compute(grad_delta.narrow(0, begin, rows));  // [n, out]
    const at::Tensor A_e = as_compute(lora_A.narrow(0, e * rank, rank));  // [r, in]
    if (output_mask[0] || output_mask[1]) {
      const at::Tensor du = dd.mm(as_compute(B.select(2, e))).mul_(scaling);  // [n, r]
      if (output_mask[0]) grad_x.narrow(0, begin, rows).copy_(du.mm(A_e));
      if (output_mask[1]) {
        grad_A.narrow(0, e * rank, rank).copy_(du.t().mm(as_compute(x.narrow(0, begin, rows))));
      }
    }
    if (output_mask[2]) {
      const at::Tensor u = as_compute(lora_u.narrow(0, begin, rows));  // [n, r]
      grad_B3.select(2, e).copy_(dd.t().mm(u).mul_(scaling));
    }
  }
  return {grad_x, grad_A, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("expert_lora", &expert_lora_cpu);
  m.impl("expert_lora_backward", &expert_lora_backward_cpu);
}

}  // namespace moeforge
