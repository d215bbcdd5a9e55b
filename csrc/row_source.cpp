#include "row_source.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <string>

#include "checks.h"
#include "validation.h"

namespace moeforge {

at::Tensor RowSource::rows(const at::Tensor& x) const {
  if (!gathered()) return x;
  // moeforge::permute: the same rows (dropped ones zero, which the GEMMs ignore), with its range
  // checks on a corrupt plan (named errors on CPU, zero rows instead of stray reads on CUDA).
  static const auto permute =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moeforge::permute", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&)>();
  return permute.call(x, sorted_pairs, pair_to_row, std::nullopt);
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
  if (sorted_pairs->is_cpu() && sorted_pairs->numel() > 0) {  // values: only where no sync
    const at::Tensor bad =
        at::logical_or(sorted_pairs->lt(0), sorted_pairs->ge(pair_to_row->numel()));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.to(at::kByte).argmax().item<int64_t>();
      MOEFORGE_CHECK_VALUE(false, op, "sorted_pairs[", i, "] must be in [0, ", pair_to_row->numel(),
                           "), got ", (*sorted_pairs)[i].item<int32_t>());
    }
  }
  // top_k = 0 leaves no rows; 1 keeps the divisor valid.
  return {sorted_pairs->contiguous(), *pair_to_row, std::max<int64_t>(1, pair_to_row->size(1))};
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
