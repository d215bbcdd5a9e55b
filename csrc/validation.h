// One check_<op>_inputs per op, called by every backend (CPU and CUDA) before any work, so that a
// user gets the same clear error whichever device their tensors are on.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace moeforge {

void check_routing_inputs(const at::Tensor& topk_ids, int64_t num_experts);

// The routing plan made by `routing`: sorted_pairs [num_tokens * top_k] and pair_to_row
// [num_tokens, top_k], int32, on ref's device; num_tokens named by `tokens_name`.
void check_plan(std::string_view op, const at::Tensor& sorted_pairs, const at::Tensor& pair_to_row,
                int64_t num_tokens, std::string_view tokens_name, const at::Tensor& ref);

// permute, combine and routed_dot share the routing plan made by `routing`.
void check_permute_inputs(const at::Tensor& x, const at::Tensor& sorted_pairs,
                          const at::Tensor& pair_to_row, const std::optional<at::Tensor>& weights);
void check_combine_inputs(const at::Tensor& y, const at::Tensor& sorted_pairs,
                          const at::Tensor& pair_to_row, const std::optional<at::Tensor>& weights);
void check_routed_dot_inputs(const at::Tensor& rows, const at::Tensor& tokens,
                             const at::Tensor& pair_to_row);

// op: the name in errors (grouped_mm_backward checks its x and weight with these rules too).
void check_grouped_mm_inputs(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& expert_offsets,
                             const std::optional<at::Tensor>& bias, bool weight_transposed,
                             std::string_view op = "grouped_mm");
// num_rows: the routed rows (x.size(0), or the plan's S when x is read through it; row_source.h).
void check_grouped_mm_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& weight, const at::Tensor& expert_offsets,
                                      bool weight_transposed, int64_t num_rows);

// The SwiGLU variants: "silu" = HF layout (gate columns first, then up), silu(gate) * up;
// "gpt_oss" = interleaved (gate even, up odd), clamped, (up + 1) * gate * sigmoid(alpha * gate).
enum class SwigluVariant { kSilu, kGptOss };
SwigluVariant parse_swiglu_variant(std::string_view op, std::string_view variant);
// op: the name in errors (the backward ops check h with these rules too).
void check_swiglu_inputs(const at::Tensor& h, std::string_view variant, double alpha, double limit,
                         std::string_view op = "swiglu");
void check_swiglu_backward_inputs(const at::Tensor& grad_a, const at::Tensor& h,
                                  std::string_view variant, double alpha, double limit);
// weighted_swiglu_backward: swiglu_backward's rules (grad_aw in grad_a's place) plus
// row_weights [num_rows], floating, on h's device.
void check_weighted_swiglu_backward_inputs(const at::Tensor& grad_aw, const at::Tensor& h,
                                           const at::Tensor& row_weights, std::string_view variant,
                                           double alpha, double limit,
                                           std::string_view op = "weighted_swiglu_backward");
// weighted_swiglu_backward_ (grad_h written over h): the rules above, and h contiguous, sharing
// no memory with grad_aw or row_weights.
void check_weighted_swiglu_backward_inplace_inputs(const at::Tensor& h, const at::Tensor& grad_aw,
                                                   const at::Tensor& row_weights,
                                                   std::string_view variant, double alpha,
                                                   double limit);

// Returns the LoRA rank r (lora_A is [num_experts * r, in]).
int64_t check_expert_lora_inputs(std::string_view op, const at::Tensor& x, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const at::Tensor& expert_offsets);

// expert_lora_backward: the forward's rules plus grad_delta [grad_delta_rows, out_features] and
// lora_u [num_rows, rank] (floating, on x's device), num_rows as for grouped_mm_backward
// (grad_delta_rows: num_rows, or num_tokens when grad_delta is read through the plan).
// Returns the rank.
int64_t check_expert_lora_backward_inputs(const at::Tensor& grad_delta, const at::Tensor& x,
                                          const at::Tensor& lora_u, const at::Tensor& lora_A,
                                          const at::Tensor& lora_B,
                                          const at::Tensor& expert_offsets, int64_t num_rows,
                                          int64_t grad_delta_rows);

// lora_expand_add_: out [num_rows, n] (floating, unit stride along its rows: written in place),
// u [num_rows, rank], lora_weight in PEFT's lora_B layout [n, rank * E] (rank_major) or lora_A
// layout [E * rank, n], all of out's dtype and device; expert_offsets [E + 1] int32, E >= 1.
// Returns E.
int64_t check_lora_expand_add_inputs(const at::Tensor& out, const at::Tensor& u,
                                     const at::Tensor& lora_weight,
                                     const at::Tensor& expert_offsets, bool rank_major);

// LoRA's up-projection operands of an output [num_rows, n] of `like`'s dtype and device (the ops
// that add it: lora_expand_add_, grouped_mm_lora, grouped_mm_swiglu): u [num_rows, rank >= 1] and
// lora_weight [n, rank * E] (rank_major, PEFT's lora_B) or [E * rank, n] (lora_A). `rows_what` /
// `n_what` say where num_rows / n come from in the messages. Returns the rank.
struct LoraExpandShape {
  int64_t num_rows;
  std::string_view rows_what;
  int64_t n;
  std::string_view n_what;
  int64_t num_experts;
};
int64_t check_lora_expand_operands(std::string_view op, std::string_view u_name,
                                   const at::Tensor& u, std::string_view weight_name,
                                   const at::Tensor& lora_weight, bool rank_major,
                                   const LoraExpandShape& shape, std::string_view like_name,
                                   const at::Tensor& like);

void check_router_loss_inputs(std::string_view op, at::TensorList logits,
                              const std::optional<at::Tensor>& row_mask, int64_t top_k);

// Host-side value checks of expert_offsets: only where reading them costs no device sync (CPU).
void check_offsets_values(std::string_view op, const at::Tensor& expert_offsets, int64_t num_rows);

}  // namespace moeforge
