// grouped_mm_lora (schema: csrc/registration.cpp): a grouped GEMM with LoRA's up-projection added
// into its output. Every backend computes exactly grouped_mm (with the optional bias) followed by
// lora_expand_add_; where the sm90 engine applies, the CUDA op does both in one kernel (the bias
// and the add in the GEMM's epilogue on the rounded output: the same rounding rules, the rank sum
// in the tensor cores' order), so the [rows, out] output is written once instead of written, read
// and written again (twice with a bias).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "row_source.h"

namespace moeforge {

inline constexpr std::string_view kGroupedMmLoraOp = "grouped_mm_lora";

// The op's rules: grouped_mm's for x, weight, the optional bias and plan, and
// lora_expand_add_'s for lora_u [num_rows, r] and lora_weight against the output [num_rows,
// out_features]. Returns where x's rows are read from.
RowSource check_grouped_mm_lora_inputs(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& expert_offsets, bool weight_transposed,
                                       const at::Tensor& lora_u, const at::Tensor& lora_weight,
                                       bool lora_rank_major,
                                       const std::optional<at::Tensor>& sorted_pairs,
                                       const std::optional<at::Tensor>& pair_to_row,
                                       const std::optional<at::Tensor>& bias);

// grouped_mm(x, weight, ...) then lora_expand_add_ on it, through the dispatcher: the CPU op, and
// the CUDA op wherever its one-kernel form does not apply.
at::Tensor grouped_mm_lora_composed(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& expert_offsets, bool weight_transposed,
                                    const at::Tensor& lora_u, const at::Tensor& lora_weight,
                                    double lora_scaling, bool lora_rank_major,
                                    const std::optional<at::Tensor>& sorted_pairs,
                                    const std::optional<at::Tensor>& pair_to_row,
                                    const std::optional<at::Tensor>& bias);

}  // namespace moeforge
