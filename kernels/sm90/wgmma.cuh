// The warpgroup-MMA (wgmma) primitives of the sm_90a kernels in kernels/sm90, and their model on
// the host kernel emulator (tests/emu): shared-window addresses, the async-proxy fence, wgmma's
// fence / commit / wait, and one m64n128k16 bf16 MMA with fp32 accumulators whose operands come
// from shared memory through descriptors (sm90_layout.h), each K-major or MN-major.
//
// On the emulator the MMA is asynchronous like the hardware's: its products are added when a
// wgmma_wait retires its group, and its operands, read at issue and again then, must not have
// changed in between (a stage refilled under an in-flight MMA traps). The operand layouts are
// our reading of the PTX ISA and public code (docs/hopper-gemm-plan.md); only a GPU confirms it.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "../async_copy.cuh"
#include "../expert_bounds.cuh"
#include "../launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "moeforge/kernels/sm90_layout.h"

namespace moeforge::kernels::sm90 {

inline constexpr int kWgmmaAcc = 64;       // fp32 accumulators per thread of an m64n128 result
inline constexpr int kWideWgmmaAcc = 128;  // of an m64n256 result

// The tiles of the kernels: 256 threads (two warpgroups, 64 rows of the 128-row tile each), 128 x
// 64 bf16 operand tiles (a K-major row or an MN-major 64-value block row is 128 bytes) for A and
// B alike, and the experts' row bounds and tile prefix in front of the stages.
inline constexpr int kThreads = 256;
inline constexpr int kTileMn = 128, kBK = 64;
inline constexpr int kTileBytes = kTileMn * kBK * 2;  // 16 KB
inline constexpr int kStageBytes = 2 * kTileBytes;
// An MN-major tile: two blocks of 64 values (128-byte k rows), each kBK rows deep.
inline constexpr uint32_t kMnBlockBytes = kBK * 128;
inline constexpr size_t kBoundsBytes = 4 * (2 * (kGroupedGemmSm90MaxExperts + 1) + kBoundsMaxWarps);

// The main loop's pipeline (Sm90Pipeline): stages of shared memory, and the k blocks whose MMAs
// may still be in flight when the next k block's loads are issued. The loads run kAhead k blocks
// ahead of the MMAs; a stage is refilled only once the MMAs that read it have retired, since
// kAhead + kMmaInFlight = kStages - 1.
template <int Stages, int MmaInFlight>
struct PipelineShape {
  static constexpr int kStages = Stages, kMmaInFlight = MmaInFlight;
  static constexpr int kAhead = kStages - 1 - kMmaInFlight;
  static_assert(kAhead >= 1, "at least one k block loaded ahead");
  // Dynamic shared memory: bounds and tile prefix, then 1024-byte aligned stages (+ slack).
  static constexpr size_t kSmemBytes = kBoundsBytes + 1024 + size_t{kStages} * kStageBytes;
};
using SerialPipeline = PipelineShape<3, 0>;      // Sm90Pipeline::kSerial
using OverlappedPipeline = PipelineShape<4, 1>;  // Sm90Pipeline::kOverlapped

// Shared-window address of a pointer into shared memory (what the wgmma descriptors
// take). On the host kernel emulator: the offset into the block's dynamic shared memory, which the
// emulated wgmma below resolves back.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) -
                               dynamic_shared_memory<unsigned char>());
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Shared memory written through the generic proxy (cp.async) becomes visible to wgmma, which
// reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit_group() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::async_mma_commit();
#endif
}

// Waits until at most `InFlight` committed groups of this warpgroup's MMAs are pending.
template <int InFlight>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(InFlight) : "memory");
#elif defined(MOEFORGE_KERNEL_EMULATION)
  ::moeforge::emu::async_mma_wait(InFlight);
#endif
}

#if defined(MOEFORGE_KERNEL_EMULATION)
// The emulator's wgmma.m64nNk16 (f32 += bf16 x bf16; kAcc = N / 2 accumulators per thread).
template <int kN, bool TransA, bool TransB>
void emulated_wgmma(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
  constexpr int kAcc = kN / 2;
  // Each thread adds its own accumulators' products (accumulator_coord), reading both operands
  // through their descriptors as the hardware is documented to: K-major rows of 128 bytes in
  // 8-row atoms SBO bytes apart, the 128-byte swizzle applied to the address (sm90_layout.h).
  // This checks that the kernel's writers, descriptors and epilogue agree with one reading of
  // the layout; only a GPU confirms the reading. Like the hardware's, the MMA is asynchronous:
  // the products are added when a wgmma_wait retires its group, and its operands, read at issue
  // and again then, must not have changed in between (a stage refilled under an in-flight MMA).
  // MN-major (TransA / TransB): 128-byte rows of 64 MN values, one per k, 8 k rows per atom and
  // SBO bytes between atoms along k, 64-value blocks of MN LBO bytes apart (the canonical
  // ((8,8,m),(8,k)) : ((1,8,LBO),(64,SBO)) element layout, swizzled).
  const unsigned char* smem = dynamic_shared_memory<unsigned char>();
  const auto element = [smem](uint64_t desc, int row, int kk, bool mn_major) {
    if ((desc >> 62) != static_cast<uint64_t>(sm90::GmmaLayout::kSwizzle128B)) {
      ::moeforge::emu::trap("emulated wgmma: only the 128-byte swizzle is modelled");
    }
    const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
    const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFFu) << 4;
    const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
    const uint32_t address =
        mn_major ? start + (row / 64) * lbo + (kk / 8) * sbo + (kk % 8) * 128u + (row % 64) * 2u
                 : start + (row / 8) * sbo + (row % 8) * 128u + kk * 2u;
    const uint32_t swizzled = address ^ (((address >> 7) & 7u) << 4);
    __nv_bfloat16 v;
    std::memcpy(&v, smem + swizzled, sizeof(v));
    return __bfloat162float(v);
  };
  // This thread's operands: its two rows of A (lane / 4 and + 8 within its warp's 16) and the
  // columns of B its accumulators take (col = 8 (i / 4) + 2 (lane % 4) + i % 2: 32 of them).
  struct Operands {
    float a[2][16];
    float b[kAcc / 2][16];
  };
  const int lane = static_cast<int>(threadIdx.x) % 32,
            warp = (static_cast<int>(threadIdx.x) / 32) % 4;
  const auto b_slot = [](int i) { return (i / 4) * 2 + i % 2; };
  const auto read = [=]() {
    Operands o;
    for (int h = 0; h < 2; ++h) {
      for (int kk = 0; kk < 16; ++kk)
        o.a[h][kk] = element(desc_a, 16 * warp + lane / 4 + 8 * h, kk, TransA);
    }
    for (int i = 0; i < kAcc; ++i) {
      const sm90::FragCoord c = sm90::accumulator_coord(warp, lane, i);
      for (int kk = 0; kk < 16; ++kk) o.b[b_slot(i)][kk] = element(desc_b, c.col, kk, TransB);
    }
    return o;
  };
  const Operands at_issue = read();
  ::moeforge::emu::async_mma([=, &d]() {
    const Operands o = read();
    if (std::memcmp(&o, &at_issue, sizeof(o)) != 0) {
      ::moeforge::emu::trap(
          "emulated wgmma: shared memory read by an MMA changed before wait_group retired it");
    }
    for (int i = 0; i < kAcc; ++i) {
      const sm90::FragCoord c = sm90::accumulator_coord(warp, lane, i);
      const float* row = o.a[(c.row % 16) / 8];
      float acc = d[i];
      for (int kk = 0; kk < 16; ++kk) acc += row[kk] * o.b[b_slot(i)][kk];
      d[i] = acc;
    }
  });
}
#endif

// d[64 x N] += A[64 x 16] B, both bf16 in shared memory through their descriptors, each
// K-major (A: 64 m rows of 16 k values; B: N n rows of 16 k values) or MN-major (16 k rows of
// 64 m / N n values; TransA / TransB: the instruction's transpose immediates); fp32
// accumulators (scale-d = 1: added to d). N = 128 (kWgmmaAcc accumulators per thread) or 256
// (kWideWgmmaAcc: two 128-column halves, values i < 64 the first, 64 + i the second's value i).
template <bool TransA, bool TransB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[kWgmmaAcc], uint64_t desc_a,
                                                 uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const int scale_d = 1;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TransA ? 1 : 0), "n"(TransB ? 1 : 0));
#elif defined(MOEFORGE_KERNEL_EMULATION)
  emulated_wgmma<128, TransA, TransB>(d, desc_a, desc_b);
#else
  (void)d, (void)desc_a, (void)desc_b;
#endif
}

template <bool TransA, bool TransB>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[kWideWgmmaAcc], uint64_t desc_a,
                                                 uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const int scale_d = 1;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "
      "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "
      "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, "
      "%103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, "
      "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, "
      "%131, %132;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TransA ? 1 : 0), "n"(TransB ? 1 : 0));
#elif defined(MOEFORGE_KERNEL_EMULATION)
  emulated_wgmma<256, TransA, TransB>(d, desc_a, desc_b);
#else
  (void)d, (void)desc_a, (void)desc_b;
#endif
}

// Makes every later use of d depend on the asm statements before it: the compiler may not move
// the epilogue's reads of the accumulators above the wgmma wait, which names no registers.
template <int kAcc>
__device__ __forceinline__ void fence_accumulators(float (&d)[kAcc]) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  (void)d;  // the emulated wgmma is an ordinary call
#else
#pragma unroll
  for (int i = 0; i < kAcc; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// Operand descriptors of k16 step j (0..3) of a 64-deep k block whose 128-row tile starts at
// `tile` (shared-window address): K-major (128-byte rows, 32 bytes per k16 step) or MN-major (two
// 64-value blocks kMnBlockBytes apart, two 8-row k atoms per k16 step).
template <bool MnMajor>
__device__ __forceinline__ uint64_t operand_descriptor(uint32_t tile, int j) {
  return MnMajor ? gmma_descriptor(tile + 2048u * static_cast<uint32_t>(j), kMnBlockBytes, 1024,
                                   GmmaLayout::kSwizzle128B)
                 : gmma_descriptor(tile + 32u * static_cast<uint32_t>(j), 16, 1024,
                                   GmmaLayout::kSwizzle128B);
}

// The k loop of one output tile, shared by the kernels: d (zeroed by the caller) += the products
// of k_blocks k blocks. load(stage, kb) issues this thread's cp.async copies of k block kb into
// the stage at `stage` (a pointer); the stages live at `stages` (a shared-window address; the
// same bytes as stage_ptr), kStageBytes each, A's 128 x 64 tile first, then B's. Warpgroup
// `group` multiplies its 64 rows of A (a_group_offset bytes into the A tile) with all of B.
// Every thread of the block calls it (barriers inside). On return every MMA has retired and every
// copy has landed and been read, so the caller may start the next tile's loads.
template <typename Pipeline, bool AMnMajor, bool BMnMajor, typename Load>
__device__ __forceinline__ void mma_k_loop(int64_t k_blocks, unsigned char* stage_ptr,
                                           uint32_t stages, uint32_t a_group_offset,
                                           float (&d)[kWgmmaAcc], Load&& load) {
  constexpr int kStages = Pipeline::kStages, kAhead = Pipeline::kAhead;
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < k_blocks) load(stage_ptr + s * kStageBytes, int64_t{s});
    cp_async_commit();
  }
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    cp_async_wait<kAhead - 1>();  // this thread's copies of stage kb have landed
    fence_proxy_async_shared();
    // Everyone's copies of stage kb are in, and every warpgroup's MMAs of k block
    // kb - 1 - kMmaInFlight have retired: the stage the loads below refill is free.
    __syncthreads();
    // The MMAs of k block kb first, so that the loads below (index reads, address arithmetic,
    // cp.async issue) overlap them: the stage those loads refill is neither kb's nor, with one
    // MMA group in flight, kb - 1's.
    const uint32_t stage = stages + static_cast<uint32_t>(kb % kStages) * kStageBytes;
    fence_accumulators(d);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kBK / 16; ++j) {
      wgmma_m64n128k16<AMnMajor, BMnMajor>(d,
                                           operand_descriptor<AMnMajor>(stage + a_group_offset, j),
                                           operand_descriptor<BMnMajor>(stage + kTileBytes, j));
    }
    wgmma_commit_group();
    const int64_t next = kb + kAhead;
    if (next < k_blocks) load(stage_ptr + (next % kStages) * kStageBytes, next);
    cp_async_commit();
    wgmma_wait<Pipeline::kMmaInFlight>();
    fence_accumulators(d);
  }
  wgmma_wait<0>();
  fence_accumulators(d);
  cp_async_wait<0>();
  __syncthreads();  // the next tile's loads refill stages this tile's last steps read
}

// ---- launch setup (host) -------------------------------------------------------------------

inline constexpr int kMaxCachedDevices = 64;

// Per device, the SM count once a kernel family's launch setup has run there (0 before).
struct DeviceSmCache {
  std::atomic<int> sms[kMaxCachedDevices] = {};
};

// What a launcher of a family needs before its launch: cudaErrorNotSupported unless
// grouped_gemm_sm90_supported; else the current device's SM count in *sms (the persistent grid),
// after raise_limits() - raising the family's dynamic shared-memory limits, a per-device setting
// - ran once on that device.
template <typename RaiseLimits>
cudaError_t prepare_launch(DeviceSmCache& cache, RaiseLimits&& raise_limits, int* sms) {
  bool supported = false;
  MOEFORGE_CUDA_CHECK(grouped_gemm_sm90_supported(&supported));
  if (!supported) return cudaErrorNotSupported;
  int device = 0;
  MOEFORGE_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached && (*sms = cache.sms[device].load(std::memory_order_acquire)) > 0) {
    return cudaSuccess;
  }
  MOEFORGE_CUDA_CHECK(raise_limits());
  MOEFORGE_CUDA_CHECK(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache.sms[device].store(*sms, std::memory_order_release);
  return cudaSuccess;
}

}  // namespace moeforge::kernels::sm90
