// grouped_mm_swiglu's composition (grouped_mm_swiglu.h) and its CPU registration.
#include "grouped_mm_swiglu.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "validation.h"

namespace moeforge {

RowSource check_grouped_mm_swiglu_inputs(const at::Tensor& x, const at::Tensor& gate_up_proj,
                                         const at::Tensor& expert_offsets,
                                         const std::optional<at::Tensor>& sorted_pairs,
                                         const std::optional<at::Tensor>& pair_to_row) {
  constexpr std::string_view op = kGroupedMmSwigluOp;
  check_grouped_mm_inputs(x, gate_up_proj, expert_offsets, std::nullopt,
                          /*weight_transposed=*/false, op);
  MOEFORGE_CHECK_VALUE(gate_up_proj.size(1) % 2 == 0, op,
                       "gate_up_proj must be [num_experts, 2 * intermediate, in_features] (gate "
                       "rows, then up rows), got an odd size(1): shape ",
                       gate_up_proj.sizes());
  return row_source(op, x, sorted_pairs, pair_to_row);
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_swiglu_composed(
    const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row) {
  static const auto grouped_mm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moeforge::grouped_mm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, bool,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  static const auto swiglu =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moeforge::swiglu", "")
          .typed<at::Tensor(const at::Tensor&, c10::string_view, double, double)>();
  at::Tensor h = grouped_mm.call(x, gate_up_proj, expert_offsets, std::nullopt, false, sorted_pairs,
                                 pair_to_row);
  // alpha and limit are gpt-oss's; the SiLU variant does not read them.
  at::Tensor a = swiglu.call(h, "silu", 1.702, 7.0);
  return {h, a};
}

namespace {

std::tuple<at::Tensor, at::Tensor> grouped_mm_swiglu_cpu(
    const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row) {
  check_grouped_mm_swiglu_inputs(x, gate_up_proj, expert_offsets, sorted_pairs, pair_to_row);
  return grouped_mm_swiglu_composed(x, gate_up_proj, expert_offsets, sorted_pairs, pair_to_row);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("grouped_mm_swiglu", &grouped_mm_swiglu_cpu);
}

}  // namespace moeforge
