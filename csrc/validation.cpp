#include "validation.h"

#include <ATen/MemoryOverlap.h>

#include <limits>

#include "checks.h"

namespace moeforge {
namespace {

void check_index_dtype(std::string_view op, std::string_view name, const at::Tensor& t) {
  MOEFORGE_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, name,
                      " must be int32 or int64 expert ids, got ", t.scalar_type());
}

void check_pair_weights(std::string_view op, const std::optional<at::Tensor>& weights,
                        const at::Tensor& pair_to_row, const at::Tensor& ref) {
  if (!weights.has_value()) return;
  const at::Tensor& w = *weights;
  check_dim(op, "weights", w, 2, "[num_tokens, top_k]");
  check_floating(op, "weights", w);
  MOEFORGE_CHECK_VALUE(w.sizes() == pair_to_row.sizes(), op,
                       "weights must have the shape of pair_to_row (", pair_to_row.sizes(),
                       "), got ", w.sizes());
  check_same_device(op, "weights", w, "the data tensor", ref);
}

void check_offsets(std::string_view op, const at::Tensor& offsets, int64_t num_experts,
                   std::string_view experts_from, const at::Tensor& ref) {
  check_dim(op, "expert_offsets", offsets, 1, "[num_experts + 1]");
  check_dtype(op, "expert_offsets", offsets, at::kInt);
  check_size(op, "expert_offsets", offsets, 0, num_experts + 1, experts_from);
  check_same_device(op, "expert_offsets", offsets, "x", ref);
}

// The gradient of a gated activation of h [rows, 2I]: [rows, I], h's dtype and device.
void check_activation_grad(std::string_view op, std::string_view name, const at::Tensor& grad,
                           const at::Tensor& h) {
  check_dim(op, name, grad, 2, "[num_rows, intermediate]");
  check_same_dtype(op, name, grad, "h", h);
  check_same_device(op, name, grad, "h", h);
  check_size(op, name, grad, 0, h.size(0), "num_rows of h");
  check_size(op, name, grad, 1, h.size(1) / 2, "h.size(1) / 2");
}

}  // namespace

void check_plan(std::string_view op, const at::Tensor& sorted_pairs, const at::Tensor& pair_to_row,
                int64_t num_tokens, std::string_view tokens_name, const at::Tensor& ref) {
  check_dim(op, "pair_to_row", pair_to_row, 2, "[num_tokens, top_k]");
  check_dtype(op, "pair_to_row", pair_to_row, at::kInt);
  check_size(op, "pair_to_row", pair_to_row, 0, num_tokens, tokens_name);
  check_same_device(op, "pair_to_row", pair_to_row, "the data tensor", ref);
  check_dim(op, "sorted_pairs", sorted_pairs, 1, "[num_tokens * top_k]");
  check_dtype(op, "sorted_pairs", sorted_pairs, at::kInt);
  check_size(op, "sorted_pairs", sorted_pairs, 0, pair_to_row.numel(),
             "num_tokens * top_k of pair_to_row");
  check_same_device(op, "sorted_pairs", sorted_pairs, "the data tensor", ref);
}

void check_routing_inputs(const at::Tensor& topk_ids, int64_t num_experts) {
  constexpr std::string_view op = "routing";
  check_dim(op, "topk_ids", topk_ids, 2, "[num_tokens, top_k]");
  check_index_dtype(op, "topk_ids", topk_ids);
  MOEFORGE_CHECK_VALUE(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts);
  MOEFORGE_CHECK_VALUE(num_experts < std::numeric_limits<int32_t>::max(), op,
                       "num_experts must fit in int32, got ", num_experts);
  MOEFORGE_CHECK_VALUE(topk_ids.numel() < std::numeric_limits<int32_t>::max(), op,
                       "num_tokens * top_k must be < 2^31, got ", topk_ids.numel());
}

void check_permute_inputs(const at::Tensor& x, const at::Tensor& sorted_pairs,
                          const at::Tensor& pair_to_row, const std::optional<at::Tensor>& weights) {
  constexpr std::string_view op = "permute";
  check_dim(op, "x", x, 2, "[num_tokens, hidden]");
  check_floating(op, "x", x);
  check_plan(op, sorted_pairs, pair_to_row, x.size(0), "num_tokens of x", x);
  check_pair_weights(op, weights, pair_to_row, x);
}

void check_combine_inputs(const at::Tensor& y, const at::Tensor& sorted_pairs,
                          const at::Tensor& pair_to_row, const std::optional<at::Tensor>& weights) {
  constexpr std::string_view op = "combine";
  check_dim(op, "y", y, 2, "[num_tokens * top_k, hidden]");
  check_floating(op, "y", y);
  check_dim(op, "pair_to_row", pair_to_row, 2, "[num_tokens, top_k]");
  check_size(op, "y", y, 0, pair_to_row.numel(), "num_tokens * top_k of pair_to_row");
  check_plan(op, sorted_pairs, pair_to_row, pair_to_row.size(0), "num_tokens", y);
  check_pair_weights(op, weights, pair_to_row, y);
}

void check_routed_dot_inputs(const at::Tensor& rows, const at::Tensor& tokens,
                             const at::Tensor& pair_to_row) {
  constexpr std::string_view op = "routed_dot";
  check_dim(op, "rows", rows, 2, "[num_tokens * top_k, hidden]");
  check_dim(op, "tokens", tokens, 2, "[num_tokens, hidden]");
  check_floating(op, "rows", rows);
  check_same_dtype(op, "tokens", tokens, "rows", rows);
  check_same_device(op, "tokens", tokens, "rows", rows);
  check_size(op, "tokens", tokens, 1, rows.size(1), "hidden of rows");
  check_dim(op, "pair_to_row", pair_to_row, 2, "[num_tokens, top_k]");
  check_dtype(op, "pair_to_row", pair_to_row, at::kInt);
  check_same_device(op, "pair_to_row", pair_to_row, "rows", rows);
  check_size(op, "pair_to_row", pair_to_row, 0, tokens.size(0), "num_tokens of tokens");
  check_size(op, "rows", rows, 0, pair_to_row.numel(), "num_tokens * top_k of pair_to_row");
}

void check_grouped_mm_inputs(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& expert_offsets,
                             const std::optional<at::Tensor>& bias, bool weight_transposed,
                             std::string_view op) {
  check_dim(op, "x", x, 2, "[num_rows, in_features]");
  check_floating(op, "x", x);
  check_dim(op, "weight", weight, 3,
            weight_transposed ? "[num_experts, in_features, out_features]"
                              : "[num_experts, out_features, in_features]");
  check_same_dtype(op, "weight", weight, "x", x);
  check_same_device(op, "weight", weight, "x", x);
  check_size(op, "weight", weight, weight_transposed ? 1 : 2, x.size(1), "in_features of x");
  check_offsets(op, expert_offsets, weight.size(0), "num_experts of weight + 1", x);
  if (bias.has_value()) {
    const int64_t out_features = weight.size(weight_transposed ? 2 : 1);
    check_dim(op, "bias", *bias, 2, "[num_experts, out_features]");
    check_same_dtype(op, "bias", *bias, "x", x);
    check_same_device(op, "bias", *bias, "x", x);
    check_size(op, "bias", *bias, 0, weight.size(0), "num_experts of weight");
    check_size(op, "bias", *bias, 1, out_features, "out_features of weight");
  }
}

void check_grouped_mm_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& weight, const at::Tensor& expert_offsets,
                                      bool weight_transposed, int64_t num_rows) {
  constexpr std::string_view op = "grouped_mm_backward";
  check_grouped_mm_inputs(x, weight, expert_offsets, std::nullopt, weight_transposed, op);
  check_dim(op, "grad_out", grad_out, 2, "[num_rows, out_features]");
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  check_same_device(op, "grad_out", grad_out, "x", x);
  check_size(op, "grad_out", grad_out, 0, num_rows, "num_rows (of x, or of the routing plan)");
  check_size(op, "grad_out", grad_out, 1, weight.size(weight_transposed ? 2 : 1),
             "out_features of weight");
}

SwigluVariant parse_swiglu_variant(std::string_view op, std::string_view variant) {
  if (variant == "silu") return SwigluVariant::kSilu;
  if (variant == "gpt_oss") return SwigluVariant::kGptOss;
  MOEFORGE_CHECK_VALUE(false, op, "variant must be \"silu\" or \"gpt_oss\", got \"", variant, "\"");
  return SwigluVariant::kSilu;
}

void check_swiglu_inputs(const at::Tensor& h, std::string_view variant, double alpha, double limit,
                         std::string_view op) {
  parse_swiglu_variant(op, variant);
  check_dim(op, "h", h, 2, "[num_rows, 2 * intermediate]");
  check_floating(op, "h", h);
  MOEFORGE_CHECK_VALUE(h.size(1) % 2 == 0, op, "h.size(1) must be even (gate and up halves), got ",
                       h.size(1));
  MOEFORGE_CHECK_VALUE(limit > 0, op, "limit must be > 0, got ", limit);
}

void check_swiglu_backward_inputs(const at::Tensor& grad_a, const at::Tensor& h,
                                  std::string_view variant, double alpha, double limit) {
  constexpr std::string_view op = "swiglu_backward";
  check_swiglu_inputs(h, variant, alpha, limit, op);
  check_activation_grad(op, "grad_a", grad_a, h);
}

void check_weighted_swiglu_backward_inputs(const at::Tensor& grad_aw, const at::Tensor& h,
                                           const at::Tensor& row_weights, std::string_view variant,
                                           double alpha, double limit, std::string_view op) {
  check_swiglu_inputs(h, variant, alpha, limit, op);
  check_activation_grad(op, "grad_aw", grad_aw, h);
  check_dim(op, "row_weights", row_weights, 1, "[num_rows]");
  check_floating(op, "row_weights", row_weights);
  check_same_device(op, "row_weights", row_weights, "h", h);
  check_size(op, "row_weights", row_weights, 0, h.size(0), "num_rows of h");
}

void check_weighted_swiglu_backward_inplace_inputs(const at::Tensor& h, const at::Tensor& grad_aw,
                                                   const at::Tensor& row_weights,
                                                   std::string_view variant, double alpha,
                                                   double limit) {
  constexpr std::string_view op = "weighted_swiglu_backward_";
  check_weighted_swiglu_backward_inputs(grad_aw, h, row_weights, variant, alpha, limit, op);
  MOEFORGE_CHECK_VALUE(h.is_contiguous(), op,
                       "h is overwritten with grad_h and must be contiguous, got shape ", h.sizes(),
                       " and strides ", h.strides());
  for (const auto& [name, t] : {std::pair<std::string_view, const at::Tensor&>{"grad_aw", grad_aw},
                                {"row_weights", row_weights}}) {
    // get_overlap_status answers TooHard for any strided tensor, shared storage or not.
    const bool shares_storage = t.defined() && h.storage().is_alias_of(t.storage());
    MOEFORGE_CHECK_VALUE(
        !shares_storage || at::get_overlap_status(h, t) == at::MemOverlapStatus::No, op,
        "h is overwritten with grad_h and must not share memory with ", name);
  }
}

int64_t check_expert_lora_inputs(std::string_view op, const at::Tensor& x, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const at::Tensor& expert_offsets) {
  check_dim(op, "x", x, 2, "[num_rows, in_features]");
  check_floating(op, "x", x);
  check_dim(op, "expert_offsets", expert_offsets, 1, "[num_experts + 1]");
  const int64_t num_experts = expert_offsets.size(0) - 1;
  MOEFORGE_CHECK_VALUE(num_experts >= 1, op, "expert_offsets must have num_experts + 1 >= 2 ",
                       "entries, got shape ", expert_offsets.sizes());
  check_offsets(op, expert_offsets, num_experts, "num_experts + 1", x);
  check_dim(op, "lora_A", lora_A, 2, "[num_experts * rank, in_features] (PEFT layout)");
  check_dim(op, "lora_B", lora_B, 2, "[out_features, rank * num_experts] (PEFT layout)");
  check_same_dtype(op, "lora_A", lora_A, "x", x);
  check_same_dtype(op, "lora_B", lora_B, "x", x);
  check_same_device(op, "lora_A", lora_A, "x", x);
  check_same_device(op, "lora_B", lora_B, "x", x);
  check_size(op, "lora_A", lora_A, 1, x.size(1), "in_features of x");
  MOEFORGE_CHECK_VALUE(lora_A.size(0) % num_experts == 0 && lora_A.size(0) > 0, op,
                       "LoRA rank mismatch: lora_A.size(0) must be num_experts * rank = ",
                       num_experts, " * r, got ", lora_A.size(0));
  MOEFORGE_CHECK_VALUE(lora_B.size(1) == lora_A.size(0), op,
                       "LoRA rank mismatch: lora_B.size(1) must equal lora_A.size(0) (rank * "
                       "num_experts = ",
                       lora_A.size(0), "), got ", lora_B.size(1));
  return lora_A.size(0) / num_experts;
}

int64_t check_expert_lora_backward_inputs(const at::Tensor& grad_delta, const at::Tensor& x,
                                          const at::Tensor& lora_u, const at::Tensor& lora_A,
                                          const at::Tensor& lora_B,
                                          const at::Tensor& expert_offsets, int64_t num_rows,
                                          int64_t grad_delta_rows) {
  constexpr std::string_view op = "expert_lora_backward";
  const int64_t rank = check_expert_lora_inputs(op, x, lora_A, lora_B, expert_offsets);
  const int64_t out_features = lora_B.size(0);
  MOEFORGE_CHECK_VALUE(
      grad_delta.dim() == 2 && grad_delta.size(0) == grad_delta_rows &&
          grad_delta.size(1) == out_features,
      op, "grad_delta must be [", grad_delta_rows == num_rows ? "num_rows" : "num_tokens",
      ", out_features] = [", grad_delta_rows, ", ", out_features, "], got ", grad_delta.sizes());
  MOEFORGE_CHECK_VALUE(lora_u.dim() == 2 && lora_u.size(0) == num_rows && lora_u.size(1) == rank,
                       op, "lora_u must be [num_rows, rank] = [", num_rows, ", ", rank, "], got ",
                       lora_u.sizes());
  check_floating(op, "grad_delta", grad_delta);
  check_floating(op, "lora_u", lora_u);
  check_same_device(op, "grad_delta", grad_delta, "x", x);
  check_same_device(op, "lora_u", lora_u, "x", x);
  return rank;
}

void check_router_loss_inputs(std::string_view op, at::TensorList logits,
                              const std::optional<at::Tensor>& row_mask, int64_t top_k) {
  MOEFORGE_CHECK_VALUE(!logits.empty(), op, "logits must hold at least one layer's router logits");
  const at::Tensor& first = logits[0];
  check_dim(op, "logits[0]", first, 2, "[num_tokens, num_experts]");
  check_floating(op, "logits[0]", first);
  const int64_t num_experts = first.size(1);
  MOEFORGE_CHECK_VALUE(num_experts >= 1, op, "logits must have >= 1 expert, got shape ",
                       first.sizes());
  MOEFORGE_CHECK_VALUE(top_k >= 1 && top_k <= num_experts, op,
                       "top_k must be in [1, num_experts=", num_experts, "], got ", top_k);
  for (size_t l = 1; l < logits.size(); ++l) {
    const std::string name = "logits[" + std::to_string(l) + "]";
    check_dim(op, name, logits[l], 2, "[num_tokens, num_experts]");
    check_same_dtype(op, name, logits[l], "logits[0]", first);
    check_same_device(op, name, logits[l], "logits[0]", first);
    check_size(op, name, logits[l], 1, num_experts, "num_experts of logits[0]");
  }
  if (row_mask.has_value()) {
    const at::Tensor& m = *row_mask;
    check_dim(op, "row_mask", m, 1, "[num_tokens] (the flattened attention mask)");
    MOEFORGE_CHECK_TYPE(!m.is_complex(), op, "row_mask must be bool or real, got ",
                        m.scalar_type());
    check_same_device(op, "row_mask", m, "logits[0]", first);
    for (size_t l = 0; l < logits.size(); ++l) {
      check_size(op, "logits[" + std::to_string(l) + "]", logits[l], 0, m.size(0),
                 "num_tokens of row_mask");
    }
  }
}

int64_t check_lora_expand_add_inputs(const at::Tensor& out, const at::Tensor& u,
                                     const at::Tensor& lora_weight,
                                     const at::Tensor& expert_offsets, bool rank_major) {
  constexpr std::string_view op = "lora_expand_add_";
  check_dim(op, "out", out, 2, "[num_rows, out_features]");
  check_floating(op, "out", out);
  MOEFORGE_CHECK_VALUE(out.size(1) <= 1 || out.stride(1) == 1, op,
                       "out must have unit stride along its rows (it is updated in place), got "
                       "strides ",
                       out.strides());
  MOEFORGE_CHECK_VALUE(out.size(0) <= 1 || out.stride(0) >= out.size(1), op,
                       "out's rows must not overlap (stride(0) >= out_features), got shape ",
                       out.sizes(), " and strides ", out.strides());
  check_dim(op, "expert_offsets", expert_offsets, 1, "[num_experts + 1]");
  check_dtype(op, "expert_offsets", expert_offsets, at::kInt);
  check_same_device(op, "expert_offsets", expert_offsets, "out", out);
  const int64_t num_experts = expert_offsets.size(0) - 1;
  MOEFORGE_CHECK_VALUE(num_experts >= 1, op, "expert_offsets must have num_experts + 1 >= 2 ",
                       "entries, got shape ", expert_offsets.sizes());
  check_lora_expand_operands(
      op, "u", u, "lora_weight", lora_weight, rank_major,
      {out.size(0), "num_rows of out", out.size(1), "out_features of out", num_experts}, "out",
      out);
  return num_experts;
}

int64_t check_lora_expand_operands(std::string_view op, std::string_view u_name,
                                   const at::Tensor& u, std::string_view weight_name,
                                   const at::Tensor& lora_weight, bool rank_major,
                                   const LoraExpandShape& shape, std::string_view like_name,
                                   const at::Tensor& like) {
  check_dim(op, u_name, u, 2, "[num_rows, rank]");
  check_same_dtype(op, u_name, u, like_name, like);
  check_same_device(op, u_name, u, like_name, like);
  check_size(op, u_name, u, 0, shape.num_rows, shape.rows_what);
  MOEFORGE_CHECK_VALUE(u.size(1) >= 1, op, u_name, " must have rank >= 1 columns, got shape ",
                       u.sizes());
  const int64_t rank = u.size(1);
  check_same_dtype(op, weight_name, lora_weight, like_name, like);
  check_same_device(op, weight_name, lora_weight, like_name, like);
  const std::string rank_what = "rank of " + std::string(u_name);
  if (rank_major) {
    check_dim(op, weight_name, lora_weight, 2, "[out_features, rank * num_experts] (lora_B)");
    check_size(op, weight_name, lora_weight, 0, shape.n, shape.n_what);
    check_size(op, weight_name, lora_weight, 1, rank * shape.num_experts,
               rank_what + " * num_experts of expert_offsets");
  } else {
    check_dim(op, weight_name, lora_weight, 2, "[num_experts * rank, out_features] (lora_A)");
    check_size(op, weight_name, lora_weight, 0, rank * shape.num_experts,
               "num_experts of expert_offsets * " + rank_what);
    check_size(op, weight_name, lora_weight, 1, shape.n, shape.n_what);
  }
  return rank;
}

void check_offsets_values(std::string_view op, const at::Tensor& expert_offsets, int64_t num_rows) {
  TORCH_INTERNAL_ASSERT(expert_offsets.device().is_cpu());
  const at::Tensor offs = expert_offsets.contiguous();
  const int32_t* o = offs.data_ptr<int32_t>();
  const int64_t n = offs.numel();
  MOEFORGE_CHECK_VALUE(o[0] == 0, op, "expert_offsets[0] must be 0, got ", o[0]);
  for (int64_t e = 1; e < n; ++e) {
    MOEFORGE_CHECK_VALUE(o[e] >= o[e - 1], op, "expert_offsets must be non-decreasing, got ",
                         "expert_offsets[", e - 1, "]=", o[e - 1], " > expert_offsets[", e,
                         "]=", o[e]);
  }
  MOEFORGE_CHECK_VALUE(o[n - 1] <= num_rows, op, "expert_offsets[-1] must be <= num_rows (",
                       num_rows, "), got ", o[n - 1]);
}

}  // namespace moeforge
