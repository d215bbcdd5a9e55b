// The warp-specialised K-grouped weight gradient (Sm90Pipeline::kWarpSpecialized for
// GroupedWgradSm90Args; contract: moeforge/kernels/grouped_gemm_sm90.h), built for sm_90a only,
// not yet run on a GPU (the host kernel emulator runs it, with wgmma, cp.async and mbarriers
// emulated).
//
// The same tiles, loads, MMAs and stores as grouped_wgrad_sm90.cu (grouped_wgrad_sm90_tile.cuh),
// so its results are bitwise the other pipelines'; the main loop is ws_pipeline.cuh's: warpgroup
// 2 loads six stages (each thread 8 chunks of A and 8 of B per k block, the gathered operand's
// token resolved per row), warpgroups 0-1 multiply (both operands MN-major) and store. A weight
// gradient's tiles reduce over one expert's rows, ~16 k blocks at Qwen3's T = 16384: the
// single-role pipelines refill their stages at every tile's start, here the producer is already
// loading the next tile while the consumers finish this one.
#include <cstdint>

#include "../expert_bounds.cuh"
#include "../launch.cuh"
#include "grouped_wgrad_sm90_tile.cuh"
#include "mbarrier.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "wgmma.cuh"
#include "ws_pipeline.cuh"

namespace moeforge::kernels::sm90 {
namespace {

constexpr int kStages = 6;
// ptxas -v: no spills either side.
constexpr int kProducerRegisters = 88, kConsumerRegisters = 208;

// Dynamic shared memory: bounds, the barriers, then 1024-byte aligned stages (+ slack).
constexpr size_t kBarrierOffset = kBoundsBytes;
static_assert(kBarrierOffset % 8 == 0, "mbarriers are 8-byte objects");
constexpr size_t kSmemBytes =
    kBarrierOffset + sizeof(StageBarriers<kStages>) + 1024 + size_t{kStages} * kStageBytes;
static_assert(kSmemBytes <= 232448, "within the opt-in shared memory of a block on sm_90");

// Where the kernel's pieces live in its dynamic shared memory (recomputed by each role after it
// has set its register budget, so that nothing is held across the setmaxnreg).
struct SharedLayout {
  int32_t* bound;     // [E + 1] the experts' row bounds
  int32_t* warp_max;  // build_expert_bounds's scratch
  StageBarriers<kStages>* bars;
  uint32_t stages;           // shared-window address of stage 0 (1024-byte aligned)
  unsigned char* stage_ptr;  // the same bytes, as a pointer
};

__device__ __forceinline__ SharedLayout shared_layout() {
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  SharedLayout l;
  l.bound = reinterpret_cast<int32_t*>(smem);
  l.warp_max = l.bound + 2 * (kGroupedGemmSm90MaxExperts + 1);
  l.bars = reinterpret_cast<StageBarriers<kStages>*>(smem + kBarrierOffset);
  const uint32_t smem_base = shared_address(smem);
  l.stages =
      (smem_base + static_cast<uint32_t>(kBarrierOffset + sizeof(StageBarriers<kStages>)) + 1023u) &
      ~1023u;
  l.stage_ptr = smem + (l.stages - smem_base);
  return l;
}

__device__ __forceinline__ void produce(const GroupedWgradSm90Args& args, int loader) {
  const SharedLayout l = shared_layout();
  const WgradSchedule schedule = wgrad_schedule(args);
  Ring<kStages> ring;
  for (int64_t t = blockIdx.x; t < schedule.num_tiles; t += gridDim.x) {
    const WgradTile tile = wgrad_tile(schedule, l.bound, t);
    produce_k_blocks(l.bars, ring, tile.k_blocks, [&](uint32_t stage, int64_t kb) {
      load_wgrad_stage<kProducerThreads>(args, l.stage_ptr + stage * kStageBytes,
                                         tile.row_begin + kb * kBK, tile.row_end, tile.p0, tile.q0,
                                         loader);
    });
  }
  cp_async_commit();  // no copy of this thread is in flight when it exits
  cp_async_wait<0>();
}

__device__ __forceinline__ void consume(const GroupedWgradSm90Args& args, int tid) {
  const SharedLayout l = shared_layout();
  const WgradSchedule schedule = wgrad_schedule(args);
  const int warp = tid / 32, lane = tid % 32;
  const int group = warp / 4;  // rows p0 + 64 group .. of the tile: A's MN-major block `group`
  const uint32_t a_offset = static_cast<uint32_t>(group) * kMnBlockBytes;
  Ring<kStages> ring;
  for (int64_t t = blockIdx.x; t < schedule.num_tiles; t += gridDim.x) {
    const WgradTile tile = wgrad_tile(schedule, l.bound, t);
    float d[kWgmmaAcc];
#pragma unroll
    for (int i = 0; i < kWgmmaAcc; ++i) d[i] = 0.0f;
    consume_k_blocks(l.bars, ring, tile.k_blocks, lane, d, [&](uint32_t stage_index) {
      const uint32_t stage = l.stages + stage_index * kStageBytes;
#pragma unroll
      for (int j = 0; j < kBK / 16; ++j) {
        wgmma_m64n128k16<true, true>(d, operand_descriptor<true>(stage + a_offset, j),
                                     operand_descriptor<true>(stage + kTileBytes, j));
      }
    });
    store_wgrad_tile(args, tile, d, group, warp % 4, lane);
  }
}

__global__ void __launch_bounds__(kWsThreads, 1)
    grouped_wgrad_sm90_ws_kernel(const GroupedWgradSm90Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  {
    const SharedLayout l = shared_layout();
    build_expert_bounds(args.expert_offsets, args.num_experts, args.num_rows, l.bound, l.warp_max);
    if (threadIdx.x == 0) {
      l.bars->init(kStages);
      fence_mbarrier_init();
    }
  }
  __syncthreads();  // the bounds and the barriers; no block-wide barrier after this
  run_roles<kProducerRegisters, kConsumerRegisters>([&](int loader) { produce(args, loader); },
                                                    [&](int tid) { consume(args, tid); });
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a features: never launched (CMakeLists.txt builds 90a only)
#endif
}

}  // namespace

cudaError_t raise_smem_limit_wgrad_warp_specialized() {
  MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(grouped_wgrad_sm90_ws_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kSmemBytes)));
  return cudaSuccess;
}

cudaError_t launch_wgrad_warp_specialized(const GroupedWgradSm90Args& args, int sms,
                                          cudaStream_t stream) {
  MOEFORGE_CUDA_CHECK(launch_kernel(grouped_wgrad_sm90_ws_kernel, dim3(static_cast<unsigned>(sms)),
                                    dim3(kWsThreads), kSmemBytes, stream, args));
  return cudaSuccess;
}

}  // namespace moeforge::kernels::sm90
