// Host side of tma.cuh: encoding a tensor map. On a GPU build through the driver's
// cuTensorMapEncodeTiled, looked up at run time through the runtime (so that nothing links
// libcuda, and a machine without a driver still loads the library); on the host kernel emulator
// through its own encoding (tests/emu).
#include "tma.cuh"

#if !defined(MOEFORGE_KERNEL_EMULATION)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#endif

namespace moeforge::kernels::sm90 {

#if !defined(MOEFORGE_KERNEL_EMULATION)
namespace {

PFN_cuTensorMapEncodeTiled_v12000 driver_encode_tiled() {
  // Looked up once per process (thread-safe static initialisation); nullptr if the driver has
  // no such entry point.
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                           cudaEnableDefault, &status);
#else  // the versioned lookup is CUDA 12.5's; a runtime before it has only this one
    const cudaError_t e =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status);
#endif
    if (e != cudaSuccess) (void)cudaGetLastError();  // not sticky; the caller falls back
    return e == cudaSuccess && status == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  return encode;
}

}  // namespace
#endif

cudaError_t encode_tma_tensor(const TmaTensor4d& t, CUtensorMap* map) {
  if (!tma_tensor_valid(t)) return cudaErrorInvalidValue;
#if defined(MOEFORGE_KERNEL_EMULATION)
  return ::moeforge::emu::encode_tensor_map(map, t.base, kTmaRank, t.dims, t.strides, t.box)
             ? cudaSuccess
             : cudaErrorInvalidValue;
#else
  const PFN_cuTensorMapEncodeTiled_v12000 encode = driver_encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  cuuint64_t dims[kTmaRank], strides[kTmaRank - 1];
  cuuint32_t box[kTmaRank], element_strides[kTmaRank];
  for (int i = 0; i < kTmaRank; ++i) {
    dims[i] = t.dims[i];
    box[i] = t.box[i];
    element_strides[i] = 1;
    if (i > 0) strides[i - 1] = t.strides[i - 1];
  }
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, kTmaRank,
                            const_cast<void*>(t.base), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  // The driver's verdict on the layout falls back; anything else (no context, a driver being
  // torn down) is an error of its own.
  if (r == CUDA_SUCCESS) return cudaSuccess;
  if (r == CUDA_ERROR_INVALID_VALUE) return cudaErrorInvalidValue;
  if (r == CUDA_ERROR_NOT_SUPPORTED) return cudaErrorNotSupported;
  return cudaErrorUnknown;
#endif
}

}  // namespace moeforge::kernels::sm90
