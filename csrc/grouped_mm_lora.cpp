// grouped_mm_lora's composition (grouped_mm_lora.h) and its CPU registration.
#include "grouped_mm_lora.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_calls.h"
#include "validation.h"

namespace moeforge {

RowSource check_grouped_mm_lora_inputs(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& expert_offsets, bool weight_transposed,
                                       const at::Tensor& lora_u, const at::Tensor& lora_weight,
                                       bool lora_rank_major,
                                       const std::optional<at::Tensor>& sorted_pairs,
                                       const std::optional<at::Tensor>& pair_to_row,
                                       const std::optional<at::Tensor>& bias) {
  constexpr std::string_view op = kGroupedMmLoraOp;
  check_grouped_mm_inputs(x, weight, expert_offsets, bias, weight_transposed, op);
  RowSource source = row_source(op, x, sorted_pairs, pair_to_row);
  check_lora_expand_operands(
      op, "lora_u", lora_u, "lora_weight", lora_weight, lora_rank_major,
      {source.num_rows(x), "num_rows (of x, or of the routing plan)",
       weight.size(weight_transposed ? 2 : 1), "out_features of weight", weight.size(0)},
      "x", x);
  return source;
}

at::Tensor grouped_mm_lora_composed(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& expert_offsets, bool weight_transposed,
                                    const at::Tensor& lora_u, const at::Tensor& lora_weight,
                                    double lora_scaling, bool lora_rank_major,
                                    const std::optional<at::Tensor>& sorted_pairs,
                                    const std::optional<at::Tensor>& pair_to_row,
                                    const std::optional<at::Tensor>& bias) {
  at::Tensor y = grouped_mm_call(x, weight, expert_offsets, bias, weight_transposed, sorted_pairs,
                                 pair_to_row);
  lora_expand_add_call(y, lora_u, lora_weight, expert_offsets, lora_scaling, lora_rank_major);
  return y;
}

namespace {

at::Tensor grouped_mm_lora_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& expert_offsets, bool weight_transposed,
                               const at::Tensor& lora_u, const at::Tensor& lora_weight,
                               double lora_scaling, bool lora_rank_major,
                               const std::optional<at::Tensor>& sorted_pairs,
                               const std::optional<at::Tensor>& pair_to_row,
                               const std::optional<at::Tensor>& bias) {
  check_grouped_mm_lora_inputs(x, weight, expert_offsets, weight_transposed, lora_u, lora_weight,
                               lora_rank_major, sorted_pairs, pair_to_row, bias);
  return grouped_mm_lora_composed(x, weight, expert_offsets, weight_transposed, lora_u, lora_weight,
                                  lora_scaling, lora_rank_major, sorted_pairs, pair_to_row, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("grouped_mm_lora", &grouped_mm_lora_cpu);
}

}  // namespace moeforge
