// The tensor-core path of launch_lora_expand_add (contract: moeforge/kernels/lora_expand.h),
// defined and instantiated in kernels/lora_expand_wmma.cu. Internal to kernels/: callers use
// launch_lora_expand_add, which takes this path when lora_expand_add_uses_tensor_cores says so.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moeforge::kernels::lora_expand_detail {

// launch_lora_expand_add's arguments (sizes and strides in elements).
template <typename T>
struct LoraExpandArgs {
  T* out;
  int64_t ld_out;
  const T* u;
  int64_t ld_u;
  const T* m;
  int64_t m_stride_e, m_stride_j;
  const int32_t* offsets;
  int64_t num_experts, rows, n, rank;
  float scaling;
};

// Whether the tensor-core kernel can take these sizes and this out (n, ld_out multiples of 8,
// out 16-byte aligned: its updates of out are 16-byte vectors) on the current device (compute
// capability 8.0+ and an sm80+ image of the kernel loaded). No stream work.
template <typename T>
cudaError_t lora_expand_wmma_applies(const T* out, int64_t ld_out, int64_t n, bool* applies);

// Precondition: launch_lora_expand_add's argument checks passed, rows, n, rank > 0, and
// lora_expand_wmma_applies said yes.
template <typename T>
cudaError_t launch_lora_expand_add_wmma(const LoraExpandArgs<T>& args, cudaStream_t stream);

}  // namespace moeforge::kernels::lora_expand_detail
