// Each op's typed handle is looked up once (the first call) and kept.
#include "op_calls.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace moeforge {

at::Tensor grouped_mm_call(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& bias,
                           bool weight_transposed, const std::optional<at::Tensor>& sorted_pairs,
                           const std::optional<at::Tensor>& pair_to_row) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moeforge::grouped_mm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, bool,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(x, weight, expert_offsets, bias, weight_transposed, sorted_pairs, pair_to_row);
}

void lora_expand_add_call(const at::Tensor& out, const at::Tensor& u, const at::Tensor& lora_weight,
                          const at::Tensor& expert_offsets, double scaling, bool rank_major) {
  // The schema's mutable first argument is a by-value Tensor in the typed signature.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moeforge::lora_expand_add_", "")
                             .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double, bool)>();
  op.call(out, u, lora_weight, expert_offsets, scaling, rank_major);
}

at::Tensor swiglu_call(const at::Tensor& h, c10::string_view variant, double alpha, double limit) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moeforge::swiglu", "")
          .typed<at::Tensor(const at::Tensor&, c10::string_view, double, double)>();
  return op.call(h, variant, alpha, limit);
}

}  // namespace moeforge
