#include "row_source.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "checks.h"
#include "validation.h"

namespace moeforge {

at::Tensor RowSource::rows(const at::Tensor& x) const {
  if (!gathered()) return x;
  // Pair p = t * top_k + k belongs to token t; dropped pairs name a valid token too (their rows
  // are past expert_offsets[E] and ignored by the GEMMs).
  return x.index_select(0, at::floor_divide(sorted_pairs, top_k));
}

RowSource row_source(std::string_view op, const at::Tensor& x,
                     const std::optional<at::Tensor>& sorted_pairs,
                     const std::optional<at::Tensor>& pair_to_row, std::string_view name) {
  MOEFORGE_CHECK_VALUE(sorted_pairs.has_value() == pair_to_row.has_value(), op,
                       "sorted_pairs and pair_to_row (the routing plan) must be given together, "
                       "got only ",
                       sorted_pairs.has_value() ? "sorted_pairs" : "pair_to_row");
  if (!sorted_pairs.has_value()) return {};
  check_dim(op, name, x, 2, "[num_tokens, features]");
  const std::string tokens_of = "num_tokens of " + std::string(name);
  check_plan(op, *sorted_pairs, *pair_to_row, x.size(0), tokens_of, x);
  // top_k = 0 leaves no rows; 1 keeps the divisor valid.
  return {sorted_pairs->contiguous(), std::max<int64_t>(1, pair_to_row->size(1))};
}

LoraBackwardSources lora_backward_sources(std::string_view op, const at::Tensor& x,
                                          const at::Tensor& grad_delta,
                                          const std::optional<at::Tensor>& sorted_pairs,
                                          const std::optional<at::Tensor>& pair_to_row,
                                          bool x_through_plan, bool grad_delta_through_plan) {
  if (!sorted_pairs.has_value() && !pair_to_row.has_value()) return {{}, {}, x.size(0)};
  MOEFORGE_CHECK_VALUE(x_through_plan || grad_delta_through_plan, op,
                       "with the routing plan, x_through_plan or grad_delta_through_plan must be "
                       "True, got both False");
  LoraBackwardSources s;
  s.x = x_through_plan ? row_source(op, x, sorted_pairs, pair_to_row, "x") : RowSource{};
  s.grad_delta = grad_delta_through_plan
                     ? row_source(op, grad_delta, sorted_pairs, pair_to_row, "grad_delta")
                     : RowSource{};
  s.num_rows = sorted_pairs.has_value() ? sorted_pairs->size(0) : 0;
  if (!x_through_plan) check_size(op, "x", x, 0, s.num_rows, "num_rows of the routing plan");
  return s;
}

}  // namespace moeforge
