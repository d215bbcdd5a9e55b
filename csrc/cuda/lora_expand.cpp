// CUDA lora_expand_add_: the glue around kernels/lora_expand.cu. Same semantics and validation as
// csrc/cpu/lora_expand.cpp, except that corrupt expert_offsets are clamped on the device (see
// moeforge/kernels/lora_expand.h) instead of reported: reading them would cost a sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string_view>

#include "checks.h"
#include "cuda_utils.h"
#include "moeforge/kernels/lora_expand.h"
#include "validation.h"

namespace moeforge {
namespace {

void lora_expand_add_cuda(at::Tensor out, const at::Tensor& u_in, const at::Tensor& lora_weight,
                          const at::Tensor& expert_offsets, double scaling, bool rank_major) {
  constexpr std::string_view op = "lora_expand_add_";
  const int64_t num_experts =
      check_lora_expand_add_inputs(out, u_in, lora_weight, expert_offsets, rank_major);
  MOEFORGE_CHECK_VALUE(num_experts <= kernels::kLoraExpandMaxExperts, op,
                       "the CUDA kernel supports num_experts <= ", kernels::kLoraExpandMaxExperts,
                       ", got ", num_experts);
  const int64_t rows = out.size(0), n = out.size(1), rank = u_in.size(1);
  if (rows == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor u = u_in.contiguous();
  const at::Tensor offsets = expert_offsets.contiguous();
  // M_e [r, n] with unit stride along n: lora_A's rows as they are; the rank-major lora_B through
  // an [E, r, n] copy (2 * n * r * E bytes).
  const at::Tensor m =
      rank_major ? lora_weight.reshape({n, rank, num_experts}).permute({2, 1, 0}).contiguous()
                 : (lora_weight.stride(1) == 1 ? lora_weight : lora_weight.contiguous());
  const int64_t m_stride_j = rank_major ? n : m.stride(0);
  const int64_t ld_out = rows == 1 ? n : out.stride(0);  // a single row's stride(0) is arbitrary
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "moeforge.lora_expand_add_", [&] {
        check_cuda(kernels::launch_lora_expand_add(
                       cuda_mutable_ptr<scalar_t>(out), ld_out, cuda_ptr<scalar_t>(u), rank,
                       cuda_ptr<scalar_t>(m), rank * m_stride_j, m_stride_j,
                       offsets.const_data_ptr<int32_t>(), num_experts, rows, n, rank, scaling,
                       at::cuda::getCurrentCUDAStream()),
                   op);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("lora_expand_add_", &lora_expand_add_cuda);
}

}  // namespace moeforge
