// moeforge/kernels/grouped_gemm_sm90.h for builds without CUDA architecture 9.0 (CMakeLists.txt
// links this file instead of grouped_gemm_sm90.cu): the kernel is not in the build.
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "moeforge/kernels/sm90_pipeline_probe.h"

namespace moeforge::kernels {

cudaError_t grouped_gemm_sm90_supported(bool* supported) {
  *supported = false;
  return cudaSuccess;
}

cudaError_t launch_grouped_gemm_sm90(const GroupedGemmSm90Args& args, cudaStream_t) {
  return grouped_gemm_sm90_args_valid(args) ? cudaErrorNotSupported : cudaErrorInvalidValue;
}

bool grouped_gemm_sm90_weight_via_tma(const GroupedGemmSm90Args&) {
  return false;
}

cudaError_t launch_grouped_wgrad_sm90(const GroupedWgradSm90Args& args, cudaStream_t) {
  return grouped_wgrad_sm90_args_valid(args) ? cudaErrorNotSupported : cudaErrorInvalidValue;
}

cudaError_t launch_sm90_pipeline_probe(const uint32_t*, uint32_t*, int64_t, int, int,
                                       cudaStream_t) {
  return cudaErrorNotSupported;
}

cudaError_t launch_sm90_tma_probe(const __nv_bfloat16*, int64_t, int64_t, int64_t, int32_t, int32_t,
                                  unsigned char*, cudaStream_t) {
  return cudaErrorNotSupported;
}

}  // namespace moeforge::kernels
