// grouped_mm_swiglu's composition (grouped_mm_swiglu.h) and its CPU registration.
#include "grouped_mm_swiglu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "op_calls.h"
#include "validation.h"

namespace moeforge {

RowSource check_grouped_mm_swiglu_inputs(const at::Tensor& x, const at::Tensor& gate_up_proj,
                                         const at::Tensor& expert_offsets,
                                         const std::optional<at::Tensor>& sorted_pairs,
                                         const std::optional<at::Tensor>& pair_to_row,
                                         const GroupedMmSwigluOptions& options) {
  constexpr std::string_view op = kGroupedMmSwigluOp;
  check_grouped_mm_inputs(x, gate_up_proj, expert_offsets, options.bias, options.weight_transposed,
                          op);
  parse_swiglu_variant(op, options.variant);
  MOEFORGE_CHECK_VALUE(options.limit > 0, op, "limit must be > 0, got ", options.limit);
  const int64_t two_inter = gate_up_proj.size(options.weight_transposed ? 2 : 1);
  MOEFORGE_CHECK_VALUE(two_inter % 2 == 0, op,
                       "gate_up_proj must have an even number of output "
                       "columns (gate and up halves, or interleaved pairs), got shape ",
                       gate_up_proj.sizes(),
                       options.weight_transposed ? " (weight_transposed)" : "");
  RowSource source = row_source(op, x, sorted_pairs, pair_to_row);
  const std::optional<at::Tensor>& lora_u = options.lora_u;
  MOEFORGE_CHECK_VALUE(lora_u.has_value() == options.lora_B.has_value(), op,
                       "lora_u and lora_B must be given together (the gate_up adapter's rank-r "
                       "intermediate and its lora_B), got lora_u ",
                       lora_u.has_value() ? "given" : "None", " and lora_B ",
                       options.lora_B.has_value() ? "given" : "None");
  if (lora_u.has_value()) {
    check_lora_expand_operands(
        op, "lora_u", *lora_u, "lora_B", *options.lora_B,
        /*rank_major=*/true,
        {source.num_rows(x), "num_rows (of x, or of the routing plan)", two_inter,
         "2 * intermediate of gate_up_proj", gate_up_proj.size(0)},
        "x", x);
  }
  return source;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_swiglu_composed(
    const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row,
    const GroupedMmSwigluOptions& options) {
  at::Tensor h = grouped_mm_call(x, gate_up_proj, expert_offsets, options.bias,
                                 options.weight_transposed, sorted_pairs, pair_to_row);
  if (options.lora_u.has_value()) {
    lora_expand_add_call(h, *options.lora_u, *options.lora_B, expert_offsets, options.lora_scaling,
                         /*rank_major=*/true);
  }
  at::Tensor a = swiglu_call(h, options.variant, options.alpha, options.limit);
  return {h, a};
}

namespace {

std::tuple<at::Tensor, at::Tensor> grouped_mm_swiglu_cpu(
    const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row,
    const std::optional<at::Tensor>& lora_u, const std::optional<at::Tensor>& lora_B,
    double lora_scaling, const std::optional<at::Tensor>& bias, bool weight_transposed,
    c10::string_view variant, double alpha, double limit) {
  const GroupedMmSwigluOptions options{lora_u,  lora_B, lora_scaling, bias, weight_transposed,
                                       variant, alpha,  limit};
  check_grouped_mm_swiglu_inputs(x, gate_up_proj, expert_offsets, sorted_pairs, pair_to_row,
                                 options);
  return grouped_mm_swiglu_composed(x, gate_up_proj, expert_offsets, sorted_pairs, pair_to_row,
                                    options);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("grouped_mm_swiglu", &grouped_mm_swiglu_cpu);
}

}  // namespace moeforge
