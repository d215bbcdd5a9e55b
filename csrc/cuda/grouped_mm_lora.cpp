// CUDA grouped_mm_lora (csrc/grouped_mm_lora.h): one launch of the sm_90a kernel with LoRA's
// up-projection in its epilogue where MOEFORGE_GROUPED_GEMM=sm90 covers the call, else grouped_mm
// then lora_expand_add_.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "cuda_utils.h"
#include "grouped_mm_lora.h"

namespace moeforge {
namespace {

at::Tensor grouped_mm_lora_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& expert_offsets, bool weight_transposed,
                                const at::Tensor& lora_u, const at::Tensor& lora_weight,
                                double lora_scaling, bool lora_rank_major,
                                const std::optional<at::Tensor>& sorted_pairs,
                                const std::optional<at::Tensor>& pair_to_row,
                                const std::optional<at::Tensor>& bias) {
  const RowSource source =
      check_grouped_mm_lora_inputs(x, weight, expert_offsets, weight_transposed, lora_u,
                                   lora_weight, lora_rank_major, sorted_pairs, pair_to_row, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const Sm90LoraExpand lora{lora_u, lora_weight, lora_rank_major, lora_scaling};
  // sm90's w_nk is W_e as [out, in] (either layout's strides).
  if (auto fused = sm90_grouped_gemm(x, source, weight_transposed ? weight.transpose(1, 2) : weight,
                                     expert_offsets.contiguous(), bias.value_or(at::Tensor()),
                                     kGroupedMmLoraOp, at::cuda::getCurrentCUDAStream(), &lora)) {
    return *fused;
  }
  return grouped_mm_lora_composed(x, weight, expert_offsets, weight_transposed, lora_u, lora_weight,
                                  lora_scaling, lora_rank_major, sorted_pairs, pair_to_row, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("grouped_mm_lora", &grouped_mm_lora_cuda);
}

}  // namespace moeforge
