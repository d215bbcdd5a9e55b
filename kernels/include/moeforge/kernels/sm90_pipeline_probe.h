// A probe of the warp-specialised sm90 pipeline's primitives (kernels/sm90/mbarrier.cuh), apart
// from any GEMM: a copy through a ring of shared-memory stages handed between a producer
// warpgroup and two consumer warpgroups with mbarriers, exactly as grouped_gemm_sm90_ws.cu hands
// its operand stages (cp.async with cp.async.mbarrier.arrive.noinc on `full`, one arrival per
// consumer warp on `empty`, parity waits, setmaxnreg 88 / 208 as the weight gradient's). On a first
// GPU run it says whether those primitives behave as we read the PTX ISA before the GEMM's layouts
// come into it (tests/cpp/test_sm90_pipeline_probe.cpp); the host kernel emulator runs it too.
//
//   out[i] = in[i] + 1   for i < 1024 * rounds (uint32 words)
//
// Round r (1024 words, 4 KB: one stage) is copied by block r % blocks, whose producer issues it
// into stage (its local round) % stages; each consumer thread reads 4 words of the stage and
// writes them, plus one, to `out`. With many rounds per block the barriers' phases wrap many times.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moeforge::kernels {

inline constexpr int kSm90ProbeWordsPerRound = 1024;
inline constexpr int kSm90ProbeMaxStages = 8;

// cudaErrorInvalidValue unless rounds >= 0, 1 <= stages <= kSm90ProbeMaxStages, blocks >= 1 and
// in / out 16-byte aligned; cudaErrorNotSupported without the sm_90a build and device
// (grouped_gemm_sm90_supported); else the first CUDA error.
cudaError_t launch_sm90_pipeline_probe(const uint32_t* in, uint32_t* out, int64_t rounds,
                                       int stages, int blocks, cudaStream_t stream);

// The TMA probe (kernels/sm90/tma.cuh, as the warp-specialised GEMM copies its weight): one
// 64 x 64 box of a row-major bf16 matrix src [rows, cols] (row stride ld elements) at column
// col0 and row row0 copied by one thread's cp.async.bulk.tensor into 1024-byte aligned shared
// memory under the 128-byte swizzle, its 8 KB announced with mbarrier.arrive.expect_tx and
// waited for by the whole block, then written to out (kSm90TmaProbeBytes) as it lies in shared
// memory: box row r's 16-byte chunk c at byte 128 r + 16 (c ^ (r % 8)) (sm90_layout.h
// sw128_offset), zeros where the box leaves the matrix (coordinates may be negative). Tells a
// GPU session whether the driver's encoding, the swizzle, the zero fill and the byte count are
// what the GEMM assumes before its layouts come into it. cudaErrorInvalidValue for a layout the
// tensor map cannot describe (tma_tensor_valid) or unaligned pointers; cudaErrorNotSupported
// without the sm_90a build and device.
inline constexpr int kSm90TmaProbeBytes = 64 * 128;
cudaError_t launch_sm90_tma_probe(const __nv_bfloat16* src, int64_t rows, int64_t cols, int64_t ld,
                                  int32_t row0, int32_t col0, unsigned char* out,
                                  cudaStream_t stream);

}  // namespace moeforge::kernels
