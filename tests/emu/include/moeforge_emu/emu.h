// Host kernel emulator: force-included (-include) before every translation unit of the emulated
// build (tests/emu/CMakeLists.txt), ahead of any CUDA header.
//
// The kernels of kernels/ are compiled as plain C++ by the host compiler. Each CUDA thread of a
// block runs as a fiber on one OS thread; fibers switch only at barriers and warp collectives
// (__syncthreads, __syncwarp, __shfl_*_sync, __ballot_sync, wmma::*_sync), so a kernel that
// relies on implicit warp lock-step, a barrier not reached by the whole block, or a collective
// whose mask names a lane that does not take part, is reported as an error instead of passing by
// luck. Memory is host memory (cudaMalloc is malloc), so AddressSanitizer sees every
// out-of-bounds access of a kernel. What it does not model: timing, the memory model beyond
// barriers, PTX/SASS and compiler behaviour, tensor-core rounding (mma accumulates in fp32 in
// k order), and anything the hardware does concurrently between blocks (blocks run one after
// another, in grid order).
#pragma once

#define MOEFORGE_KERNEL_EMULATION 1

// Execution-space qualifiers: nothing on the host; __shared__ variables are function statics,
// which every fiber of a block sees (blocks run one at a time). host_defines.h keeps these.
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __grid_constant__

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

namespace moeforge::emu {

// What one fiber (CUDA thread) knows about itself and its launch.
struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int linear;  // thread index within the block, x fastest
};

const ThreadContext& current_thread();
void sync_block();                   // __syncthreads
void sync_warp(unsigned mask);       // __syncwarp and the barrier half of every warp collective
void* warp_exchange_slot(int lane);  // 16 bytes per lane of the current warp
int current_lane();
[[noreturn]] void trap(const char* what);  // fails the launch and abandons the block
void* dynamic_shared_memory();
void* warp_scratch();
// cp.async: the copy lands at the latest moment the hardware allows (the wait_group that retires
// its group); until then the destination holds 0xFF bytes, so reading it early shows.
void async_copy(void* smem_dst, const void* global_src, size_t bytes);
void async_commit();
void async_wait(
    int groups_left_in_flight);  // kWarpScratchBytes shared by the lanes of the current warp
constexpr size_t kWarpScratchBytes = 64 * 64 * sizeof(double);
// wgmma (the warpgroup MMA): an emulated MMA retires at the wait_group that retires its group,
// running `retire` (which adds its products into the accumulators) then, in issue order. The
// kernel side (kernels/sm90) also reads its operands at issue and checks at retirement that
// they did not change: shared memory overwritten under an in-flight MMA traps.
void async_mma(std::function<void()> retire);
void async_mma_commit();
void async_mma_wait(int groups_left_in_flight);
// mbarrier (shared-memory barrier objects of the sm90 warp-specialised pipeline): init with an
// expected arrival count; a phase completes when that many arrivals have come, then the count
// restarts. arrive_async_copies is cp.async.mbarrier.arrive.noinc: every cp.async the thread has
// issued so far (committed or not) lands when the phase it arrives on completes (until then the
// destination holds 0xFF), and the arrival counts toward the expected count. wait_parity blocks
// until the phase of that parity has completed (PTX try_wait.parity: the current phase's parity
// differs from it); a barrier used before init, or a misaligned one, traps.
void mbarrier_init(void* bar, int count);
void mbarrier_arrive(void* bar);
void mbarrier_arrive_async_copies(void* bar);
void mbarrier_wait_parity(void* bar, uint32_t parity);
// TMA (kernels/sm90/tma.cuh). arrive_expect_tx is mbarrier.arrive.expect_tx: the phase now also
// waits for `bytes` more of copies to complete. encode_tensor_map writes our own description of
// a tiled bf16 tensor (base, dims innermost first, byte strides of dims 1.., box; 128-byte
// swizzle) into the 128 opaque bytes of a CUtensorMap at `map`; false if it breaks the driver's
// documented rules. tma_load is cp.async.bulk.tensor: the box at `coords` (zeros outside the
// tensor), swizzled into shared memory at dst (1024-byte aligned), its bytes completed on `bar`
// at once but its data landing only when the barrier's phase completes (0xFF until then).
void mbarrier_arrive_expect_tx(void* bar, uint32_t bytes);
bool encode_tensor_map(void* map, const void* base, int rank, const uint64_t* dims,
                       const uint64_t* strides, const uint32_t* box);
void tma_load(void* dst, const void* map, const int32_t* coords, int rank, void* bar);

// Exchange v among the lanes in mask; returns src_lane's value (own value when src_lane < 0).
template <typename T>
T warp_shuffle(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a small value");
  std::memcpy(warp_exchange_slot(current_lane()), &v, sizeof(T));
  sync_warp(mask);
  T r = v;
  if (src_lane >= 0) {
    if (((mask >> src_lane) & 1u) == 0) trap("__shfl_*_sync reads a lane that is not in mask");
    std::memcpy(&r, warp_exchange_slot(src_lane), sizeof(T));
  }
  sync_warp(mask);
  return r;
}

}  // namespace moeforge::emu

// Built-in variables.
#define threadIdx (::moeforge::emu::current_thread().thread_idx)
#define blockIdx (::moeforge::emu::current_thread().block_idx)
#define blockDim (::moeforge::emu::current_thread().block_dim)
#define gridDim (::moeforge::emu::current_thread().grid_dim)
#ifndef warpSize
#define warpSize 32
#endif

// Synchronisation and warp intrinsics.
inline void __syncthreads() {
  ::moeforge::emu::sync_block();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::moeforge::emu::sync_warp(mask);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = ::moeforge::emu::current_lane();
  return ::moeforge::emu::warp_shuffle(mask, v, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::moeforge::emu::current_lane();
  const int src = lane ^ lane_mask;
  // A lane may read from its own or an earlier group of `width` lanes, not from a later one.
  const bool later_group = (src & ~(width - 1)) > (lane & ~(width - 1));
  return ::moeforge::emu::warp_shuffle(mask, v, later_group || src > 31 ? -1 : src);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::moeforge::emu::current_lane();
  const int src = lane - static_cast<int>(delta);
  return ::moeforge::emu::warp_shuffle(mask, v, src < (lane & ~(width - 1)) ? -1 : src);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::moeforge::emu::current_lane();
  const int src = lane + static_cast<int>(delta);
  return ::moeforge::emu::warp_shuffle(mask, v, src >= (lane & ~(width - 1)) + width ? -1 : src);
}
unsigned __ballot_sync(unsigned mask, int predicate);
inline int __any_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return (__ballot_sync(mask, predicate) & mask) == mask;
}

[[noreturn]] inline void __trap() {
  ::moeforge::emu::trap("__trap() called by a kernel");
}

// Arithmetic intrinsics: the host rounds every operation to nearest (the build uses
// -ffp-contract=off, so no FMA is formed behind the kernel's back).
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __ffs(int x) {
  return __builtin_ffs(x);
}
inline int __popc(unsigned x) {
  return __builtin_popcount(x);
}
inline int __clz(int x) {
  return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x));
}
inline float __fadd_rn(float a, float b) {
  return a + b;
}
inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline float __fmaf_rn(float a, float b, float c) {
  return std::fma(a, b, c);
}
inline double __dadd_rn(double a, double b) {
  return a + b;
}
inline double __dmul_rn(double a, double b) {
  return a * b;
}
inline double __fma_rn(double a, double b, double c) {
  return std::fma(a, b, c);
}
inline float __expf(float x) {
  return std::exp(x);
}
inline float __logf(float x) {
  return std::log(x);
}
inline float __fdividef(float a, float b) {
  return a / b;
}
inline float rsqrtf(float x) {
  return 1.0f / std::sqrt(x);
}

// Device code calls these unqualified.
using std::isfinite;
using std::isinf;
using std::isnan;

// CUDA's min/max: fminf/fmaxf semantics for floating point (a NaN operand loses), the usual
// comparison for integers (mixed types in their common type).
inline float max(float a, float b) {
  return std::fmax(a, b);
}
inline float min(float a, float b) {
  return std::fmin(a, b);
}
inline double max(double a, double b) {
  return std::fmax(a, b);
}
inline double min(double a, double b) {
  return std::fmin(a, b);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}

// cuda_runtime.h's typed overloads exist only under nvcc.
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, T* entry) {
  return ::cudaFuncGetAttributes(attributes, reinterpret_cast<const void*>(entry));
}
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
