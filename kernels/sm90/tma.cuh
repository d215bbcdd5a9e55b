// The Tensor Memory Accelerator (TMA) of sm_90a as the warp-specialised row-grouped GEMM uses it
// (grouped_gemm_sm90_ws.cu: the weight's tiles), and its model on the host kernel emulator.
//
// A tensor map (CUtensorMap, 128 opaque bytes, encoded on the host by the driver's
// cuTensorMapEncodeTiled) describes a bf16 tensor of up to 5 dimensions in global memory and the
// box one copy moves; cp.async.bulk.tensor copies the box at given coordinates into shared memory
// (coordinates past a dimension's end read zeros), under the 128-byte swizzle, and reports its
// bytes to an mbarrier (complete_tx), whose phase then completes only once the bytes announced to
// it (arrive.expect_tx) have all landed as well as its expected arrivals. One thread issues a copy
// of a whole 8 KB box where 128 threads issue 4 cp.async each: the producer's registers and issue
// slots go to the gathered A rows. PTX ISA 8.x: cp.async.bulk.tensor, mbarrier.expect_tx; CUDA
// driver API: cuTensorMapEncodeTiled.
//
// On the emulator (tests/emu) the map holds our own fields (emu::encode_tensor_map checks the
// driver's documented rules), and a copy lands, swizzled and zero-filled, when the barrier's phase
// completes: a consumer that reads a stage before waiting reads 0xFF.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only: the driver is reached at run time)
#include <cuda_runtime_api.h>

#include <cstdint>

#include "mbarrier.cuh"
#include "wgmma.cuh"

namespace moeforge::kernels::sm90 {

inline constexpr int kTmaRank = 4;

// One thread's arrival on `bar` that also announces `bytes` of copies the phase must see land
// (mbarrier.arrive.expect_tx; issued before the copies it announces).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::mbarrier_arrive_expect_tx(bar, bytes);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)),
      "r"(bytes)
      : "memory");
#elif defined(__CUDA_ARCH__)
  (void)bar, (void)bytes;
  __trap();
#endif
}

// Copies the map's box at coordinates c (innermost first) into shared memory at dst (1024-byte
// aligned: the swizzle's row bits are the address's), completing its bytes on `bar`.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar,
                                            int32_t c0, int32_t c1, int32_t c2, int32_t c3) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  const int32_t coords[kTmaRank] = {c0, c1, c2, c3};
  ::moeforge::emu::tma_load(dst, map, coords, kTmaRank, bar);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(shared_address(bar))
      : "memory");
#elif defined(__CUDA_ARCH__)
  (void)dst, (void)map, (void)bar, (void)c0, (void)c1, (void)c2, (void)c3;
  __trap();
#endif
}

// The shape of a 4-dimensional bf16 tensor for a tensor map: dims innermost first (dims[0]
// contiguous), the byte strides of dims 1..3, and the box one copy moves (box[0] * 2 bytes = 128:
// one swizzled 128-byte row per box row).
struct TmaTensor4d {
  const void* base = nullptr;
  uint64_t dims[kTmaRank] = {};
  uint64_t strides[kTmaRank - 1] = {};  // bytes
  uint32_t box[kTmaRank] = {};
};

// Whether a tiled map may describe `t`: the driver's documented rules (cuTensorMapEncodeTiled:
// base 16-byte aligned, dims in [1, 2^32], strides multiples of 16 below 2^40, box in [1, 256])
// and ours: each stride at least the previous dimension's extent (no broadcast or overlapping
// dimensions, as the documentation's stride example builds them; kept conservative since only a
// GPU can say what the driver accepts beyond it), dims below 2^31 (the copies' int32
// coordinates), a 128-byte box row. Checked before encoding, so that a layout TMA cannot
// describe falls back to the cp.async pipelines instead of failing.
inline bool tma_tensor_valid(const TmaTensor4d& t) {
  if (reinterpret_cast<uintptr_t>(t.base) % 16 != 0 || t.box[0] * 2 != 128) return false;
  uint64_t extent = 2 * t.dims[0];  // bytes spanned by the dimensions below the next one
  for (int i = 0; i < kTmaRank; ++i) {
    if (t.dims[i] < 1 || t.dims[i] >= (uint64_t{1} << 31) || t.box[i] < 1 || t.box[i] > 256) {
      return false;
    }
    if (i > 0) {
      const uint64_t s = t.strides[i - 1];
      if (s % 16 != 0 || s >= (uint64_t{1} << 40) || s < extent) return false;
      extent = s * t.dims[i];
    }
  }
  return true;
}

// Encodes `t` into *map (bf16, 128-byte swizzle, zeros out of bounds): cudaErrorInvalidValue if
// tma_tensor_valid fails or the driver rejects the layout, cudaErrorNotSupported if the driver
// lacks TMA, cudaErrorUnknown for any other driver error.
cudaError_t encode_tma_tensor(const TmaTensor4d& t, CUtensorMap* map);

}  // namespace moeforge::kernels::sm90
