// Stages S1-S4 of docs/hopper-gemm-plan.md (contract: moeforge/kernels/grouped_gemm_sm90.h): a
// dense grouped GEMM on wgmma, built for sm_90a only (CMakeLists.txt), not yet run on a GPU. The
// host kernel emulator (tests/emu) runs it with wgmma emulated from the documented layout (below),
// so its schedule, loads, pipeline and epilogue are tested on machines without a GPU.
//
// Design, the simplest that exercises the pieces the fused kernels will build on (with stage S2's
// row gather — A rows read through the routing plan, resolved once per tile — and SwiGLU
// epilogue — B tiles of 64 gate + 64 up rows, h and a = silu(h_gate) h_up written together):
// - Persistent CTAs of 256 threads (two warpgroups). Each builds the expert bounds m(0..E) and
//   the exclusive prefix of M tiles per expert in shared memory, then walks the tiles of the
//   schedule (sm90_layout.h tile_coord: 128-row M tiles over unpadded expert segments, N tiles of
//   128 columns fastest), blockIdx.x, + gridDim.x, ...
// - Operands through cp.async (every thread: 4 chunks of A, 4 of B per stage) into 1024-byte
//   aligned stage buffers laid out K-major with the 128-byte swizzle (sm90_layout.h
//   sw128_offset); rows past an expert's tail, columns past n and k past k are zero-filled
//   (src-size 0). Three stages; after its cp.async.wait_group each thread fences the async proxy
//   (wgmma reads shared memory through it) before the barrier.
// - Warpgroup g computes rows 64g..64g+63 of the tile: per 64-wide k block four
//   wgmma.m64n128k16 (f32 += bf16 x bf16, both operands K-major in shared memory, descriptors of
//   sm90_layout.h gmma_descriptor, start advanced 32 bytes per k16), committed and waited before
//   the stage is refilled.
// - Epilogue straight from the accumulators (sm90_layout.h accumulator_coord): pairs of adjacent
//   columns rounded to bf16 and stored 4 bytes at a time, rows past the expert's segment skipped.
// - LoRA's up-projection (stage S4, with lora_u): the rounded result packed into bf16 pairs, u M_e
//   multiplied into the freed accumulators from LoRA's own tiles (loaded with the first k block),
//   then round(fma(s, acc, base)) stored (or handed to the SwiGLU) as lora_expand_add_ would.
// Not tuned: no TMA, no overlap of epilogue and loads (the warp-specialised variant,
// grouped_gemm_sm90_ws.cu, overlaps them; the tile's loads and epilogue are shared:
// grouped_gemm_sm90_tile.cuh).
#include <atomic>
#include <cstdint>

#include "../launch.cuh"
#include "grouped_gemm_sm90_tile.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "wgmma.cuh"

namespace moeforge::kernels {
namespace {

using namespace sm90;            // the shared tile constants, loads, epilogue and pipelines
constexpr int kAcc = kWgmmaAcc;  // fp32 accumulators per thread of an m64n128 result

// Dynamic shared memory of the row-grouped kernel: the pipeline's, then LoRA's tiles.
template <typename Pipeline>
constexpr size_t smem_bytes() {
  return Pipeline::kSmemBytes + kStageBytes;
}

// LoRA's tiles ride in the first k block's copy group, which every thread waited for and fenced
// before a barrier; the barrier after the MMAs lets the next tile's first copies refill them.
struct BlockLoraSync {
  int64_t k_blocks;
  __device__ __forceinline__ void acquire() const {
    if (k_blocks == 0) {  // no k block waited for and fenced the copies of LoRA's tiles
      fence_proxy_async_shared();
      __syncthreads();
    }
  }
  __device__ __forceinline__ void release() const { __syncthreads(); }
};

template <typename Pipeline, bool BMnMajor>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_sm90_kernel(const GroupedGemmSm90Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  int32_t* bound = reinterpret_cast<int32_t*>(smem);             // [E + 1]
  int32_t* tile_start = bound + kGroupedGemmSm90MaxExperts + 1;  // [E + 1]
  int32_t* warp_max = tile_start + kGroupedGemmSm90MaxExperts + 1;
  const uint32_t smem_base = shared_address(smem);
  const uint32_t stages = (smem_base + static_cast<uint32_t>(kBoundsBytes) + 1023u) & ~1023u;
  unsigned char* const stage_ptr = smem + (stages - smem_base);  // the same bytes, as a pointer
  const uint32_t lora_tiles = stages + Pipeline::kStages * kStageBytes;  // after the stages
  unsigned char* const lora_ptr = stage_ptr + Pipeline::kStages * kStageBytes;

  build_tile_prefix(args, bound, tile_start, warp_max);
  __syncthreads();
  const RowSchedule schedule = row_schedule(args, tile_start);
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int group = warp / 4;  // warpgroup: rows 64 group .. of the tile

  for_each_tile(args, schedule, bound, tile_start, [&](const TileCoord& tile, int64_t n0) {
    const __nv_bfloat16* w_e = args.w + tile.expert * args.w_stride_e;
    // This thread's copies, resolved once per tile and used by every k block.
    const TileLoads<kThreads> loads = plan_tile_loads<BMnMajor, kThreads>(args, tile, n0, tid);
    float d[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) d[i] = 0.0f;

    // LoRA's tiles ride in the first k block's copy group: landed long before the epilogue.
    if (args.lora_u != nullptr) load_lora<kThreads>(args, lora_ptr, tile, n0, tid);
    mma_k_loop<Pipeline, false, BMnMajor>(
        schedule.k_blocks, stage_ptr, stages, static_cast<uint32_t>(group) * (64 * 128), d,
        [&](unsigned char* stage, int64_t kb) {
          load_stage<BMnMajor, kThreads>(args, loads, stage, w_e, kb * kBK, tid);
        });
    finish_tile(args, tile, n0, d, lora_tiles, group, warp % 4, lane,
                BlockLoraSync{schedule.k_blocks});
  });
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a features: never launched (CMakeLists.txt builds 90a only)
#endif
}

// Per device, looked up once (an op calls the launchers 2-6 times per layer step): whether it is
// compute capability 9.0 (0 unknown, -1 no, 1 yes), and the launch setup (wgmma.cuh).
std::atomic<int> g_device_state[kMaxCachedDevices];
DeviceSmCache g_launch_cache;

template <typename Pipeline>
cudaError_t raise_smem_limit() {
  for (auto* kernel :
       {grouped_gemm_sm90_kernel<Pipeline, false>, grouped_gemm_sm90_kernel<Pipeline, true>}) {
    MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem_bytes<Pipeline>())));
  }
  return cudaSuccess;
}

template <typename Pipeline>
cudaError_t launch_pipeline(const GroupedGemmSm90Args& args, int sms, cudaStream_t stream) {
  auto* kernel = args.w_mn_major ? grouped_gemm_sm90_kernel<Pipeline, true>
                                 : grouped_gemm_sm90_kernel<Pipeline, false>;
  MOEFORGE_CUDA_CHECK(launch_kernel(kernel, dim3(static_cast<unsigned>(sms)), dim3(kThreads),
                                    smem_bytes<Pipeline>(), stream, args));
  return cudaSuccess;
}

}  // namespace

cudaError_t grouped_gemm_sm90_supported(bool* supported) {
  *supported = false;
  int device = 0;
  MOEFORGE_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  const int state = cached ? g_device_state[device].load(std::memory_order_acquire) : 0;
  if (state != 0) {
    *supported = state > 0;
    return cudaSuccess;
  }
  int major = 0, minor = 0;
  MOEFORGE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MOEFORGE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  *supported = major == 9 && minor == 0;
  if (cached) g_device_state[device].store(*supported ? 1 : -1, std::memory_order_release);
  return cudaSuccess;
}

cudaError_t launch_grouped_gemm_sm90(const GroupedGemmSm90Args& args, cudaStream_t stream) {
  if (!grouped_gemm_sm90_args_valid(args)) return cudaErrorInvalidValue;
  if (args.num_rows == 0 || args.n == 0) return cudaSuccess;
  if (args.x == nullptr || args.y == nullptr || args.w == nullptr) return cudaErrorInvalidValue;
  int sms = 0;
  MOEFORGE_CUDA_CHECK(prepare_launch(
      g_launch_cache,
      [] {
        MOEFORGE_CUDA_CHECK(raise_smem_limit<SerialPipeline>());
        MOEFORGE_CUDA_CHECK(raise_smem_limit<OverlappedPipeline>());
        return raise_smem_limit_warp_specialized();
      },
      &sms));
  switch (args.pipeline) {
    case Sm90Pipeline::kOverlapped:
      return launch_pipeline<OverlappedPipeline>(args, sms, stream);
    case Sm90Pipeline::kWarpSpecialized:
    case Sm90Pipeline::kWarpSpecializedWide: {
      bool launched = false;
      MOEFORGE_CUDA_CHECK(launch_warp_specialized(args, sms, stream, &launched));
      // A weight layout TMA cannot describe: the overlapped pipeline's cp.async loads take it.
      return launched ? cudaSuccess : launch_pipeline<OverlappedPipeline>(args, sms, stream);
    }
    default:
      return launch_pipeline<SerialPipeline>(args, sms, stream);
  }
}

}  // namespace moeforge::kernels
