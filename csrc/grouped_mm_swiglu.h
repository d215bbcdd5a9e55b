// grouped_mm_swiglu (schema: csrc/registration.cpp): an expert FFN's gate_up GEMM and its gated
// activation in one op, for both layouts (HF's [E, 2I, in] with SiLU halves; gpt-oss's
// [E, in, 2I] with interleaved clamped pairs), with the optional bias and gate_up adapter's LoRA
// up-projection added into h between them. Every backend computes exactly grouped_mm (with the
// bias), then (with lora_u) lora_expand_add_, then swiglu; where the sm90 engine applies, the
// CUDA op does it all in one kernel (the bias, the LoRA add and the activation in the GEMM's
// epilogue, from the rounded h: the same rounding rules).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "row_source.h"

namespace moeforge {

inline constexpr std::string_view kGroupedMmSwigluOp = "grouped_mm_swiglu";

// The op's arguments after the routing plan, in the schema's order.
struct GroupedMmSwigluOptions {
  const std::optional<at::Tensor>& lora_u;
  const std::optional<at::Tensor>& lora_B;
  double lora_scaling;
  const std::optional<at::Tensor>& bias;
  bool weight_transposed;
  std::string_view variant;
  double alpha, limit;
};

// The op's rules: grouped_mm's for x, gate_up_proj (in either layout), the optional bias and
// plan, an even number of output columns, a known variant, and lora_u / lora_B both given or
// neither (lora_expand_add_'s rules against h, lora_B in PEFT's rank-major layout [2I, r * E]).
// Returns where x's rows are read from.
RowSource check_grouped_mm_swiglu_inputs(const at::Tensor& x, const at::Tensor& gate_up_proj,
                                         const at::Tensor& expert_offsets,
                                         const std::optional<at::Tensor>& sorted_pairs,
                                         const std::optional<at::Tensor>& pair_to_row,
                                         const GroupedMmSwigluOptions& options);

// (h, a) = (grouped_mm(x, gate_up_proj, ...) [+ lora_expand_add_], swiglu(h, variant, ...))
// through the dispatcher: the CPU op, and the CUDA op wherever its one-kernel form does not apply.
std::tuple<at::Tensor, at::Tensor> grouped_mm_swiglu_composed(
    const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row,
    const GroupedMmSwigluOptions& options);

}  // namespace moeforge
