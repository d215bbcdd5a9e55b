// Asynchronous global -> shared copies (cp.async, sm80+) for the multi-stage GEMM pipelines.
// Below sm80 the copy is an ordinary 16-byte load and store (complete at once, which satisfies the
// same contract). The host kernel emulator (tests/emu) delays every copy to the wait that
// retires it and poisons the destination until then, so a pipeline that reads a stage too early
// fails its tests there.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#ifdef MOEFORGE_KERNEL_EMULATION
#include "moeforge_emu/emu.h"
#endif

namespace moeforge::kernels {

// Copies 16 bytes; both addresses 16-byte aligned. Completes by the cp_async_wait<N>() that
// retires the group it was committed in.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* global_src) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::async_copy(smem_dst, global_src, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const auto src = __cvta_generic_to_global(global_src);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#elif defined(__CUDA_ARCH__)
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(global_src);
#endif
}

// Copies src_bytes (0 or 16) bytes and zero-fills the rest of the 16 (cp.async's src-size): the
// rows or columns past an operand's edge, without a branch around the copy. global_src must be a
// valid address even when src_bytes is 0. Completes like cp_async_16.
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* global_src,
                                                  int src_bytes) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  alignas(16) static const unsigned char kZeros[16] = {};
  if (src_bytes != 0 && src_bytes != 16) ::moeforge::emu::trap("cp_async_16_zfill: 0 or 16 bytes");
  ::moeforge::emu::async_copy(smem_dst, src_bytes == 16 ? global_src : kZeros, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const auto src = __cvta_generic_to_global(global_src);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  *static_cast<uint4*>(smem_dst) =
      src_bytes == 16 ? *static_cast<const uint4*>(global_src) : uint4{0, 0, 0, 0};
#endif
}

// Closes the current group of copies (possibly empty).
__device__ __forceinline__ void cp_async_commit() {
#if defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kInFlight committed groups of this thread are still in flight. Other
// threads' copies become visible only after a barrier that follows their wait.
template <int kInFlight>
__device__ __forceinline__ void cp_async_wait() {
#if defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::async_wait(kInFlight);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kInFlight) : "memory");
#endif
}

}  // namespace moeforge::kernels
