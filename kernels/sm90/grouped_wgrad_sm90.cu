// The K-grouped weight gradient on wgmma (contract: moeforge/kernels/grouped_gemm_sm90.h,
// GroupedWgradSm90Args; stage S5 of docs/hopper-gemm-plan.md), built for sm_90a only
// (CMakeLists.txt), not yet run on a GPU; the host kernel emulator runs it with wgmma emulated.
//
// G_e = A_e^T B_e reduces over the rows of expert e, so both operands are read along their rows:
// per k block, 64 consecutive routed rows of the expert, each a 128-value run of A's columns
// (p0..) and of B's (q0..), stored MN-major (sm90_layout.h sw128_mn_offset: two 64-value blocks of
// 128-byte k rows) and read by wgmma with both transpose immediates. Rows past the expert's end
// are zero-filled, so a partial last k block adds nothing.
// - Persistent CTAs of 256 threads walk the tiles (e, p tile, q tile), q fastest; the k loop of a
//   tile covers its expert's rows (none for an empty expert: its tile is stored as zeros).
// - Warpgroup g computes rows p0 + 64g .. + 63 of the tile (the A block g), 128 columns.
// - Gather: the operand read through the routing plan resolves each row's token per k block.
// - The k loop and its pipelines are those of grouped_gemm_sm90.cu (wgmma.cuh mma_k_loop); the
//   loads, schedule and store are shared with the warp-specialised variant
//   (grouped_wgrad_sm90_tile.cuh, grouped_wgrad_sm90_ws.cu).
#include <atomic>
#include <cstdint>

#include "../expert_bounds.cuh"
#include "../launch.cuh"
#include "grouped_wgrad_sm90_tile.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "wgmma.cuh"

namespace moeforge::kernels {
namespace {

using namespace sm90;  // the shared tile constants and pipelines (wgmma.cuh), loads and stores

template <typename Pipeline>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_wgrad_sm90_kernel(const GroupedWgradSm90Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  int32_t* bound = reinterpret_cast<int32_t*>(smem);  // [E + 1]
  int32_t* warp_max = bound + 2 * (kGroupedGemmSm90MaxExperts + 1);
  const uint32_t smem_base = shared_address(smem);
  const uint32_t stages = (smem_base + static_cast<uint32_t>(kBoundsBytes) + 1023u) & ~1023u;
  unsigned char* const stage_ptr = smem + (stages - smem_base);
  build_expert_bounds(args.expert_offsets, args.num_experts, args.num_rows, bound, warp_max);

  const WgradSchedule schedule = wgrad_schedule(args);
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int group = warp / 4;  // warpgroup: rows 64 group .. of the tile

  for (int64_t t = blockIdx.x; t < schedule.num_tiles; t += gridDim.x) {
    const WgradTile tile = wgrad_tile(schedule, bound, t);
    float d[kWgmmaAcc];
#pragma unroll
    for (int i = 0; i < kWgmmaAcc; ++i) d[i] = 0.0f;

    mma_k_loop<Pipeline, true, true>(
        tile.k_blocks, stage_ptr, stages, static_cast<uint32_t>(group) * kMnBlockBytes, d,
        [&](unsigned char* stage, int64_t kb) {
          load_wgrad_stage<kThreads>(args, stage, tile.row_begin + kb * kBK, tile.row_end, tile.p0,
                                     tile.q0, tid);
        });
    store_wgrad_tile(args, tile, d, group, warp % 4, lane);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a features: never launched (CMakeLists.txt builds 90a only)
#endif
}

DeviceSmCache g_launch_cache;

template <typename Pipeline>
cudaError_t raise_smem_limit() {
  return cudaFuncSetAttribute(grouped_wgrad_sm90_kernel<Pipeline>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(Pipeline::kSmemBytes));
}

}  // namespace

cudaError_t launch_grouped_wgrad_sm90(const GroupedWgradSm90Args& args, cudaStream_t stream) {
  if (!grouped_wgrad_sm90_args_valid(args)) return cudaErrorInvalidValue;
  if (args.p == 0 || args.q == 0) return cudaSuccess;
  if (args.g == nullptr || ((args.a == nullptr || args.b == nullptr) && args.num_rows > 0)) {
    return cudaErrorInvalidValue;
  }
  int sms = 0;
  MOEFORGE_CUDA_CHECK(prepare_launch(
      g_launch_cache,
      [] {
        MOEFORGE_CUDA_CHECK(raise_smem_limit<SerialPipeline>());
        MOEFORGE_CUDA_CHECK(raise_smem_limit<OverlappedPipeline>());
        return raise_smem_limit_wgrad_warp_specialized();
      },
      &sms));
  if (args.pipeline == Sm90Pipeline::kWarpSpecialized) {
    return launch_wgrad_warp_specialized(args, sms, stream);
  }
  const dim3 grid(static_cast<unsigned>(sms)), block(kThreads);
  if (args.pipeline == Sm90Pipeline::kOverlapped) {
    MOEFORGE_CUDA_CHECK(launch_kernel(grouped_wgrad_sm90_kernel<OverlappedPipeline>, grid, block,
                                      OverlappedPipeline::kSmemBytes, stream, args));
  } else {
    MOEFORGE_CUDA_CHECK(launch_kernel(grouped_wgrad_sm90_kernel<SerialPipeline>, grid, block,
                                      SerialPipeline::kSmemBytes, stream, args));
  }
  return cudaSuccess;
}

}  // namespace moeforge::kernels
