// CUDA grouped_mm_swiglu (csrc/grouped_mm_swiglu.h): one launch of the sm_90a kernel with the
// SwiGLU (and LoRA) epilogue where MOEFORGE_GROUPED_GEMM=sm90 covers the call, else grouped_mm
// [then lora_expand_add_] then swiglu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda_utils.h"
#include "grouped_mm_swiglu.h"

namespace moeforge {
namespace {

std::tuple<at::Tensor, at::Tensor> grouped_mm_swiglu_cuda(
    const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row,
    const std::optional<at::Tensor>& lora_u, const std::optional<at::Tensor>& lora_B,
    double lora_scaling) {
  const RowSource source = check_grouped_mm_swiglu_inputs(
      x, gate_up_proj, expert_offsets, sorted_pairs, pair_to_row, lora_u, lora_B);
  const c10::cuda::CUDAGuard guard(x.device());
  std::optional<Sm90LoraExpand> lora;
  if (lora_u.has_value()) lora.emplace(Sm90LoraExpand{*lora_u, *lora_B, true, lora_scaling});
  if (auto fused = sm90_grouped_gemm_swiglu(x, source, gate_up_proj, expert_offsets.contiguous(),
                                            kGroupedMmSwigluOp, at::cuda::getCurrentCUDAStream(),
                                            lora ? &*lora : nullptr)) {
    return *fused;
  }
  return grouped_mm_swiglu_composed(x, gate_up_proj, expert_offsets, sorted_pairs, pair_to_row,
                                    lora_u, lora_B, lora_scaling);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("grouped_mm_swiglu", &grouped_mm_swiglu_cuda);
}

}  // namespace moeforge
