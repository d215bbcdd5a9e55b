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
// - The k loop and its pipelines are those of grouped_gemm_sm90.cu (wgmma.cuh mma_k_loop).
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../async_copy.cuh"
#include "../expert_bounds.cuh"
#include "../launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "moeforge/kernels/sm90_layout.h"
#include "wgmma.cuh"

namespace moeforge::kernels {
namespace {

using namespace sm90;  // the shared tile constants and pipelines (wgmma.cuh)
constexpr int kAcc = sm90::kWgmmaAcc;
constexpr int kChunksPerKRow = kTileMn * 2 / 16;                   // 16 per operand row
constexpr int kChunksPerThread = kBK * kChunksPerKRow / kThreads;  // 4 of A, 4 of B

// The row of an operand that routed row r reads: r itself, or through the plan the token of
// pair sorted_pairs[r] (-1: a corrupt pair, read as a zero row).
__device__ __forceinline__ int64_t source_row(const GroupedWgradSm90Args& args, bool gathered,
                                              int64_t r) {
  if (!gathered) return r;
  const int32_t pair = args.sorted_pairs[r];  // < num_tokens * top_k <= INT32_MAX
  return pair >= 0 && pair < args.num_tokens * args.top_k
             ? static_cast<int64_t>(pair / static_cast<int32_t>(args.top_k))
             : -1;
}

// Loads one stage: k rows row0 + kr (kr < 64) of the expert (valid below row_end), columns
// p0.. of a into the A tile and q0.. of b into the B tile, both MN-major.
__device__ __forceinline__ void load_stage(const GroupedWgradSm90Args& args, unsigned char* stage,
                                           int64_t row0, int64_t row_end, int64_t p0, int64_t q0) {
  const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const int id = tid + i * kThreads;
    const int kr = id / kChunksPerKRow, chunk = id % kChunksPerKRow;
    const int64_t r = row0 + kr;
    const uint32_t offset = sm90::sw128_mn_offset(static_cast<uint32_t>(kr),
                                                  static_cast<uint32_t>(chunk), kMnBlockBytes);
    const int64_t ra = r < row_end ? source_row(args, args.gather_a, r) : -1;
    const int64_t rb = r < row_end ? source_row(args, args.gather_b, r) : -1;
    const int64_t pa = p0 + chunk * 8, qb = q0 + chunk * 8;
    const int a_bytes =
        ra >= 0 && pa < args.p ? static_cast<int>(std::min<int64_t>(8, args.p - pa)) * 2 : 0;
    const int b_bytes =
        rb >= 0 && qb < args.q ? static_cast<int>(std::min<int64_t>(8, args.q - qb)) * 2 : 0;
    cp_async_16_zfill(stage + offset, a_bytes > 0 ? args.a + ra * args.lda + pa : args.a, a_bytes);
    cp_async_16_zfill(stage + kTileBytes + offset,
                      b_bytes > 0 ? args.b + rb * args.ldb + qb : args.b, b_bytes);
  }
}

template <typename Pipeline>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_wgrad_sm90_kernel(const GroupedWgradSm90Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  int32_t* bound = reinterpret_cast<int32_t*>(smem);  // [E + 1]
  int32_t* warp_max = bound + 2 * (kGroupedGemmSm90MaxExperts + 1);
  const uint32_t smem_base = sm90::shared_address(smem);
  const uint32_t stages = (smem_base + static_cast<uint32_t>(kBoundsBytes) + 1023u) & ~1023u;
  unsigned char* const stage_ptr = smem + (stages - smem_base);
  const int64_t E = args.num_experts;
  build_expert_bounds(args.expert_offsets, E, args.num_rows, bound, warp_max);

  const int64_t p_tiles = (args.p + kTileMn - 1) / kTileMn,
                q_tiles = (args.q + kTileMn - 1) / kTileMn;
  const int64_t num_tiles = E * p_tiles * q_tiles;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int group = warp / 4;  // warpgroup: rows 64 group .. of the tile

  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t e = t / (p_tiles * q_tiles), pq = t % (p_tiles * q_tiles);
    const int64_t p0 = (pq / q_tiles) * kTileMn, q0 = (pq % q_tiles) * kTileMn;
    const int64_t row_begin = bound[e], row_end = bound[e + 1];
    const int64_t k_blocks = (row_end - row_begin + kBK - 1) / kBK;
    float d[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) d[i] = 0.0f;

    sm90::mma_k_loop<Pipeline, true, true>(
        k_blocks, stage_ptr, stages, static_cast<uint32_t>(group) * kMnBlockBytes, d,
        [&](unsigned char* stage, int64_t kb) {
          load_stage(args, stage, row_begin + kb * kBK, row_end, p0, q0);
        });

    __nv_bfloat16* g_e = args.g + e * args.g_stride_e;
#pragma unroll
    for (int i = 0; i < kAcc; i += 2) {  // value pairs (i, i + 1): columns (c, c + 1), one row
      const sm90::FragCoord c = sm90::accumulator_coord(warp % 4, lane, i);
      const int64_t row = p0 + 64 * group + c.row, col = q0 + c.col;
      if (row < args.p && col < args.q) {
        *reinterpret_cast<__nv_bfloat162*>(g_e + row * args.ldg + col) =
            __floats2bfloat162_rn(d[i], d[i + 1]);
      }
    }
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
        return raise_smem_limit<OverlappedPipeline>();
      },
      &sms));
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
