// Host kernel emulator: the launch side (see emu.h). Included by kernels/launch.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace moeforge::emu {

// Runs (or, while `stream` is being captured, records) one launch of `body` per CUDA thread of
// grid x block. Returns the configuration error or the first error a thread raised (a trap, a
// divergent barrier, a deadlock), which also becomes the value of the next cudaGetLastError().
// `kernel` identifies the kernel for its cudaFuncSetAttribute settings: more than 48 KB of dynamic
// shared memory needs cudaFuncAttributeMaxDynamicSharedMemorySize set at least that high.
cudaError_t launch_body(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                        cudaStream_t stream, std::function<void()> body);

// Runs `work` on the host in stream order: now, or at graph launch while `stream` is captured.
// For the stand-ins of library calls (CUB) that must be captured like kernels.
cudaError_t enqueue_host_work(cudaStream_t stream, std::function<cudaError_t()> work);

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, Args&&... args) {
  // Arguments are copied at launch, as CUDA copies them into the kernel's parameter space.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  return launch_body(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, stream,
                     [kernel, params]() { std::apply(kernel, params); });
}

}  // namespace moeforge::emu
