// Where grouped_mm / expert_lora (and their backward ops) read the rows of x: in expert order
// (x is [S, in], the output of permute), or - given the routing plan (sorted_pairs, pair_to_row) -
// straight from the token-major activations (x is [T, in]; routed row r is token
// sorted_pairs[r] / top_k): the permute fused into the GEMM's operand load, so the [S, in] copy is
// never written. The CUDA kernels gather in their loads (kernels::RowGather); the CPU kernels
// (and the CUDA ops where torch's grouped GEMM runs: the default engine "auto", whose GEMM has no
// gather) permute first.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace moeforge {

struct RowSource {
  at::Tensor sorted_pairs;  // [S] int32, contiguous; undefined: x is already in expert order
  at::Tensor pair_to_row;   // [T, K] int32
  int64_t top_k = 1;

  bool gathered() const { return sorted_pairs.defined(); }
  // S: the number of routed rows the op computes.
  int64_t num_rows(const at::Tensor& x) const {
    return gathered() ? sorted_pairs.size(0) : x.size(0);
  }
  // x in expert order, [S, in]: x itself, or its gathered copy.
  at::Tensor rows(const at::Tensor& x) const;
};

// Validates the optional plan against x (both or neither given; the plan's rules as for permute,
// with num_tokens = x.size(0)) and returns the row source. name: x's argument name in errors.
RowSource row_source(std::string_view op, const at::Tensor& x,
                     const std::optional<at::Tensor>& sorted_pairs,
                     const std::optional<at::Tensor>& pair_to_row, std::string_view name = "x");

// expert_lora_backward reads two row operands, x and grad_delta; given the plan, either or both
// may be token-major (x_through_plan, grad_delta_through_plan; at least one). num_rows: S.
struct LoraBackwardSources {
  RowSource x, grad_delta;
  int64_t num_rows = 0;
};
LoraBackwardSources lora_backward_sources(std::string_view op, const at::Tensor& x,
                                          const at::Tensor& grad_delta,
                                          const std::optional<at::Tensor>& sorted_pairs,
                                          const std::optional<at::Tensor>& pair_to_row,
                                          bool x_through_plan, bool grad_delta_through_plan);

}  // namespace moeforge
