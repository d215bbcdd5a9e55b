// CUDA grouped_mm_swiglu (csrc/grouped_mm_swiglu.h): one launch of the sm_90a kernel with the
// bias, LoRA and activation epilogue where MOEFORGE_GROUPED_GEMM=sm90 covers the call, else
// grouped_mm [then lora_expand_add_] then swiglu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda_utils.h"
#include "grouped_mm_swiglu.h"
#include "validation.h"

namespace moeforge {
namespace {

std::tuple<at::Tensor, at::Tensor> grouped_mm_swiglu_cuda(
    const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row,
    const std::optional<at::Tensor>& lora_u, const std::optional<at::Tensor>& lora_B,
    double lora_scaling, const std::optional<at::Tensor>& bias, bool weight_transposed,
    c10::string_view variant, double alpha, double limit) {
  const GroupedMmSwigluOptions options{lora_u,  lora_B, lora_scaling, bias, weight_transposed,
                                       variant, alpha,  limit};
  const RowSource source = check_grouped_mm_swiglu_inputs(x, gate_up_proj, expert_offsets,
                                                          sorted_pairs, pair_to_row, options);
  const c10::cuda::CUDAGuard guard(x.device());
  std::optional<Sm90LoraExpand> lora;
  if (lora_u.has_value()) lora.emplace(Sm90LoraExpand{*lora_u, *lora_B, true, lora_scaling});
  const bool gpt_oss = parse_swiglu_variant(kGroupedMmSwigluOp, variant) == SwigluVariant::kGptOss;
  const Sm90Glu glu{gpt_oss ? kernels::GluVariant::kGptOss : kernels::GluVariant::kSilu, alpha,
                    limit};
  // sm90's w_nk is W_e as [out, in] (either layout's strides).
  if (auto fused = sm90_grouped_gemm_swiglu(
          x, source, weight_transposed ? gate_up_proj.transpose(1, 2) : gate_up_proj,
          expert_offsets.contiguous(), glu, bias.value_or(at::Tensor()), lora ? &*lora : nullptr,
          kGroupedMmSwigluOp, at::cuda::getCurrentCUDAStream())) {
    return *fused;
  }
  return grouped_mm_swiglu_composed(x, gate_up_proj, expert_offsets, sorted_pairs, pair_to_row,
                                    options);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("grouped_mm_swiglu", &grouped_mm_swiglu_cuda);
}

}  // namespace moeforge
