// The tensor-core (WMMA) paths of launch_grouped_gemm and launch_grouped_gemm_wgrad (contract:
// moeforge/kernels/grouped_gemm.h), defined and instantiated in kernels/grouped_gemm_wmma.cu.
// Internal to kernels/: the public entry points stay launch_grouped_gemm(_wgrad) with args.engine =
// GroupedGemmEngine::kWmma, which call these after their own argument checks when kWmmaTypes /
// kWmmaWgradTypes holds and wmma_supported says yes.
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

// The element types of the WMMA weight-gradient path: one half type throughout.
template <typename TA, typename TB, typename TG>
inline constexpr bool kWmmaWgradTypes =
    (std::is_same_v<TA, __half> ||
     std::is_same_v<TA, __nv_bfloat16>)&&std::is_same_v<TA, TB>&& std::is_same_v<TA, TG>;

// Whether the WMMA kernels can run on the current device: compute capability 8.0 or newer AND the
// code the driver loads for it was compiled for sm80+ (a build whose only image for this device is
// older PTX, e.g. TORCH_CUDA_ARCH_LIST="7.5+PTX", holds the trapping stub instead). No stream
// work, so it is safe inside CUDA-graph capture. Defined in grouped_gemm_wmma.cu.
cudaError_t wmma_supported(bool* supported);

// Precondition: args passed launch_grouped_gemm's checks (sizes >= 0, num_rows > 0, n > 0,
// pointers present where data is read). Returns cudaErrorInvalidValue beyond its grid limits.
template <typename T, typename TY>
cudaError_t launch_grouped_gemm_wmma(const GroupedGemmArgs<T, T, TY>& args, cudaStream_t stream);

// Precondition: args passed launch_grouped_gemm_wgrad's checks (sizes >= 0, E, p, q > 0, grid
// limits, pointers present where data is read).
template <typename T>
cudaError_t launch_grouped_gemm_wgrad_wmma(const GroupedGemmWgradArgs<T, T, T>& args,
                                           cudaStream_t stream);

}  // namespace moeforge::kernels::grouped_gemm_detail
