// moeforge's own ops called through the dispatcher from the compositions of other ops
// (grouped_mm_lora, grouped_mm_swiglu): the call reaches the caller's backend - CPU or CUDA, and
// under the CUDA engine the kernel that engine picks - exactly as a Python call would.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace moeforge {

// moeforge::grouped_mm (ops.py / README).
at::Tensor grouped_mm_call(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& bias,
                           bool weight_transposed, const std::optional<at::Tensor>& sorted_pairs,
                           const std::optional<at::Tensor>& pair_to_row);

// moeforge::lora_expand_add_: out[r] += scaling * u[r] M_e, in place on out.
void lora_expand_add_call(const at::Tensor& out, const at::Tensor& u, const at::Tensor& lora_weight,
                          const at::Tensor& expert_offsets, double scaling, bool rank_major);

// moeforge::swiglu: the gated activation of h [S, 2I].
at::Tensor swiglu_call(const at::Tensor& h, c10::string_view variant, double alpha, double limit);

}  // namespace moeforge
