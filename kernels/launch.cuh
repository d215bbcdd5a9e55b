// Kernel launches and dynamic shared memory for kernels/, in one place.
//
// Every launch in kernels/ goes through launch_kernel() instead of a bare <<<...>>>: with nvcc it
// is exactly that launch followed by cudaGetLastError(); built by the host kernel emulator
// (tests/emu, MOEFORGE_KERNEL_EMULATION) the same kernel bodies run on the CPU, one fiber per CUDA
// thread, so the kernels' indexing, barriers and warp collectives are tested on machines without
// a GPU. Nothing else in kernels/ knows about the emulator.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#ifdef MOEFORGE_KERNEL_EMULATION
#include "moeforge_emu/launch.h"
#endif

namespace moeforge::kernels {

// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...) and returns the launch error
// (invalid configuration, no kernel image for this device, ...), cudaSuccess otherwise.
template <typename... Params, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block,
                                 size_t smem_bytes, cudaStream_t stream, Args&&... args) {
#ifdef MOEFORGE_KERNEL_EMULATION
  return ::moeforge::emu::launch(kernel, grid, block, smem_bytes, stream,
                                 std::forward<Args>(args)...);
#else
  // clang-format off
  (*kernel)<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  return cudaGetLastError();
#endif
}

// The block's dynamic shared memory (the smem_bytes of the launch), 128-byte aligned (wmma needs
// 32-byte aligned fragment pointers).
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#ifdef MOEFORGE_KERNEL_EMULATION
  return static_cast<T*>(::moeforge::emu::dynamic_shared_memory());
#else
  extern __shared__ __align__(128) unsigned char moeforge_dynamic_smem[];
  return reinterpret_cast<T*>(moeforge_dynamic_smem);
#endif
}

}  // namespace moeforge::kernels
