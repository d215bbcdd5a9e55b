#include "row_source.h"

#include <ATen/ATen.h>

#include <algorithm>

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
                     const std::optional<at::Tensor>& pair_to_row) {
  MOEFORGE_CHECK_VALUE(sorted_pairs.has_value() == pair_to_row.has_value(), op,
                       "sorted_pairs and pair_to_row (the routing plan) must be given together, "
                       "got only ",
                       sorted_pairs.has_value() ? "sorted_pairs" : "pair_to_row");
  if (!sorted_pairs.has_value()) return {};
  check_dim(op, "x", x, 2, "[num_tokens, in_features]");
  check_plan(op, *sorted_pairs, *pair_to_row, x.size(0), "num_tokens of x", x);
  // top_k = 0 leaves no rows; 1 keeps the divisor valid.
  return {sorted_pairs->contiguous(), std::max<int64_t>(1, pair_to_row->size(1))};
}

}  // namespace moeforge
