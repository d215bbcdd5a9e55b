// grouped_mm_swiglu (schema: csrc/registration.cpp): the forward's gate_up GEMM and its SwiGLU in
// one op. Every backend computes exactly grouped_mm followed by swiglu; where the sm90 engine
// applies, the CUDA op does both in one kernel (the activation in the GEMM's epilogue, from the
// rounded h, so the values are the same).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "row_source.h"

namespace moeforge {

inline constexpr std::string_view kGroupedMmSwigluOp = "grouped_mm_swiglu";

// The op's rules: grouped_mm's for x, gate_up_proj (HF layout [E, 2I, in], no bias) and the
// optional plan, and an even number of gate_up rows. Returns where x's rows are read from.
RowSource check_grouped_mm_swiglu_inputs(const at::Tensor& x, const at::Tensor& gate_up_proj,
                                         const at::Tensor& expert_offsets,
                                         const std::optional<at::Tensor>& sorted_pairs,
                                         const std::optional<at::Tensor>& pair_to_row);

// (h, a) = (grouped_mm(x, gate_up_proj, ...), swiglu(h, "silu")) through the dispatcher: the
// CPU op, and the CUDA op wherever its one-kernel form does not apply.
std::tuple<at::Tensor, at::Tensor> grouped_mm_swiglu_composed(
    const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row);

}  // namespace moeforge
