// The tensor-core (WMMA) path of launch_grouped_gemm (contract: moeforge/kernels/grouped_gemm.h),
// defined and instantiated in kernels/grouped_gemm_wmma.cu. Internal to kernels/: the public entry
// point stays launch_grouped_gemm with args.engine = GroupedGemmEngine::kWmma, which calls
// launch_grouped_gemm_wmma after its own argument checks when kWmmaTypes holds and
// wmma_supported says yes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm.h"

namespace moeforge::kernels::grouped_gemm_detail {

// The element types the WMMA path covers: x and W of one half type T, y of type T or float.
template <typename TX, typename TW, typename TY>
inline constexpr bool kWmmaTypes = (std::is_same_v<TX, __half> ||
                                    std::is_same_v<TX, __nv_bfloat16>)&&std::is_same_v<TX, TW> &&
                                   (std::is_same_v<TY, TX> || std::is_same_v<TY, float>);

// Whether the current device runs the WMMA kernel (compute capability 8.0 or newer). No stream
// work, so it is safe inside CUDA-graph capture.
inline cudaError_t wmma_supported(bool* supported) {
  int device = 0, major = 0;
  MOEFORGE_CUDA_CHECK(cudaGetDevice(&device));
  MOEFORGE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  *supported = major >= 8;
  return cudaSuccess;
}

// Precondition: args passed launch_grouped_gemm's checks (sizes >= 0, num_rows > 0, n > 0,
// pointers present where data is read). Returns cudaErrorInvalidValue beyond its grid limits.
template <typename T, typename TY>
cudaError_t launch_grouped_gemm_wmma(const GroupedGemmArgs<T, T, TY>& args, cudaStream_t stream);

}  // namespace moeforge::kernels::grouped_gemm_detail
