// The shared-memory barrier objects (mbarrier) and the register reallocation (setmaxnreg) of the
// warp-specialised sm_90a pipeline (grouped_gemm_sm90_ws.cu), and their model on the host kernel
// emulator (tests/emu: a phase completes after its expected arrivals and announced TMA bytes;
// cp.async and TMA copies tied to a barrier land only then).
//
// PTX ISA 8.x, sections mbarrier / cp.async.mbarrier.arrive / setmaxnreg. A barrier's phase
// completes when its expected number of arrivals has come (and, where TMA copies announce their
// bytes with expect_tx, tma.cuh, once those bytes have landed); try_wait.parity(P) succeeds once
// the phase of parity P has completed (the current phase's parity is then !P), so a waiter tracks
// one phase bit per barrier, flipping it each time it passes.
#pragma once

#include <cstdint>

#include "../async_copy.cuh"
#include "wgmma.cuh"

namespace moeforge::kernels::sm90 {

// One thread initialises each barrier; then fence_mbarrier_init and a __syncthreads before use.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::mbarrier_init(bar, static_cast<int>(count));
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count)
               : "memory");
#elif defined(__CUDA_ARCH__)
  (void)bar, (void)count;
  __trap();  // no mbarriers below sm_90a: a kernel that needs them must not run
#endif
}

// Makes the initialisations visible to the async proxy (cp.async's arrivals) as well.
__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival (release semantics: this thread's earlier memory operations, e.g. the MMAs it
// waited for, are ordered before the phase completes).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::mbarrier_arrive(bar);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
#elif defined(__CUDA_ARCH__)
  (void)bar;
  __trap();
#endif
}

// One arrival once every cp.async this thread has issued so far has landed (.noinc: it counts
// toward the expected arrivals, so the barrier's count includes each copying thread once).
__device__ __forceinline__ void cp_async_mbarrier_arrive(uint64_t* bar) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::mbarrier_arrive_async_copies(bar);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(shared_address(bar))
               : "memory");
#elif defined(__CUDA_ARCH__)
  (void)bar;
  __trap();
#endif
}

// A wait this long (~8 s at the H100's clock) is a pipeline bug, not a slow GPU: the kernel
// traps (the launch fails with an error) instead of hanging the process and the GPU session.
inline constexpr long long kMbarrierWatchdogCycles = 1ll << 34;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ uint32_t mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(shared_address(bar)), "r"(parity)
      : "memory");
  return done;
}
#endif

// Blocks until the phase of parity `parity` (0 / 1) has completed (acquire semantics: what the
// arrivals released, and the copies tied to them, are visible after it).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::mbarrier_wait_parity(bar, parity);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if (mbarrier_try_wait(bar, parity)) return;  // the common case: no clock read
  const long long start = clock64();
  while (!mbarrier_try_wait(bar, parity)) {
    if (clock64() - start > kMbarrierWatchdogCycles) __trap();
  }
#elif defined(__CUDA_ARCH__)
  (void)bar, (void)parity;
  __trap();
#endif
}

// The warpgroup's per-thread register budget from here on (setmaxnreg; every thread of the
// warpgroup executes it). The kernel's launch bounds fix the budget at entry (65536 / threads);
// a producer warpgroup gives registers back so that the consumers may take them.
template <int kRegisters>
__device__ __forceinline__ void warpgroup_release_registers() {
  static_assert(kRegisters % 8 == 0 && kRegisters >= 24 && kRegisters <= 256, "setmaxnreg range");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

template <int kRegisters>
__device__ __forceinline__ void warpgroup_claim_registers() {
  static_assert(kRegisters % 8 == 0 && kRegisters >= 24 && kRegisters <= 256, "setmaxnreg range");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

}  // namespace moeforge::kernels::sm90
