// The warp-specialised row-grouped GEMM (Sm90Pipeline::kWarpSpecialized on 128 x 128 tiles and
// kWarpSpecializedWide on 128 x 256 ones; contract: moeforge/kernels/grouped_gemm_sm90.h), built
// for sm_90a only, not yet run on a GPU (the host kernel emulator runs it, with wgmma, cp.async,
// TMA and mbarriers emulated).
//
// The same tiles, loads, MMAs and epilogue as grouped_gemm_sm90.cu (grouped_gemm_sm90_tile.cuh),
// so its results are bitwise the other pipelines'; what differs is who does what, and when: the
// main loop of ws_pipeline.cuh (docs/hopper-gemm-plan.md 1.2, the CUTLASS / DeepGEMM cooperative
// split). Warpgroups 0 and 1 are consumers (rows 0-63 / 64-127 of each tile: MMAs and epilogue),
// warpgroup 2 the producer: all 128 threads issue the cp.async copies of A's gathered rows (and
// LoRA's tiles), and its first thread copies the weight's tiles with TMA (tma.cuh), two 8 KB
// boxes per B tile, announcing their bytes on the stage's full barrier. The producer runs ahead
// across tiles, so the next tile's loads overlap this tile's last MMAs and its epilogue, which
// the single-role pipelines serialise. A weight layout that a tensor map cannot describe (e.g.
// experts sharing one weight, w_stride_e = 0) runs the overlapped single-role pipeline instead
// (bitwise the same results).
// - Narrow tiles (WsShape<1>): five stages and LoRA's region with its own barrier pair (one
//   tile's LoRA operands at a time).
// - Wide tiles (WsShape<2>): two 128-row B tiles side by side in the stage, multiplied by one
//   wgmma.m64n256k16 per k16 step and finished by the shared epilogue once per B tile; four
//   stages, no LoRA region (the launcher sends GEMMs with LoRA, and those whose columns one
//   narrow tile covers, to the narrow tiles); 104 / 200.
#include <cstdint>

#include "../launch.cuh"
#include "grouped_gemm_sm90_tile.cuh"
#include "mbarrier.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "tma.cuh"
#include "wgmma.cuh"
#include "ws_pipeline.cuh"

namespace moeforge::kernels::sm90 {
namespace {

// The two tile shapes: kBTiles B tiles of 128 rows per stage beside A's 128 x 64 tile (1: 128 x
// 128 tiles, five stages and LoRA's region; 2: 128 x 256 tiles, four 48 KB stages, no LoRA), and
// the registers setmaxnreg gives each role: producer x 128 + consumer x 256 <= 384 x 168, the
// budget the launch bounds give at entry.
template <int kBTilesOfShape>
struct WsShape {
  static constexpr int kBTiles = kBTilesOfShape;
  static constexpr bool kLoraRegion = kBTiles == 1;
  static constexpr int kStages = kBTiles == 1 ? 5 : 4;
  static constexpr int kStageBytes = (1 + kBTiles) * kTileBytes;
  static constexpr int kAcc = kBTiles * kWgmmaAcc;  // fp32 accumulators per consumer thread
  // 40 / 232, CUTLASS's split for a TMA producer (ptxas -v: no spills in either shape). Before
  // the weight's tiles went to TMA the producer's cp.async of B needed 88 (narrow) / 104 (wide).
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
};
using NarrowShape = WsShape<1>;  // Sm90Pipeline::kWarpSpecialized
using WideShape = WsShape<2>;    // Sm90Pipeline::kWarpSpecializedWide
constexpr int kMaxStages = 5;
static_assert(NarrowShape::kStages <= kMaxStages && WideShape::kStages <= kMaxStages,
              "a barrier pair per stage");

struct Barriers {
  StageBarriers<kMaxStages> ring;  // the stages' full / empty pairs (ws_pipeline.cuh)
  uint64_t lora_full, lora_empty;  // LoRA's region
};

// Dynamic shared memory: bounds and tile prefix, the barriers, then 1024-byte aligned stages
// (+ slack) and LoRA's tiles (a narrow stage's size).
constexpr size_t kBarrierOffset = kBoundsBytes;
static_assert(kBarrierOffset % 8 == 0, "mbarriers are 8-byte objects");
template <typename Shape>
constexpr size_t smem_bytes() {
  return kBarrierOffset + sizeof(Barriers) + 1024 + size_t{Shape::kStages} * Shape::kStageBytes +
         (Shape::kLoraRegion ? size_t{kStageBytes} : 0);
}
static_assert(smem_bytes<NarrowShape>() <= 232448 && smem_bytes<WideShape>() <= 232448,
              "within the opt-in shared memory of a block on sm_90");

// Where the kernel's pieces live in its dynamic shared memory (recomputed by each role after it
// has set its register budget, so that nothing is held across the setmaxnreg).
struct SharedLayout {
  int32_t* bound;       // [E + 1] the experts' row bounds
  int32_t* tile_start;  // [E + 1] the prefix of their M tiles
  int32_t* warp_max;    // build_expert_bounds's scratch
  Barriers* bars;
  uint32_t stages;           // shared-window address of stage 0 (1024-byte aligned)
  unsigned char* stage_ptr;  // the same bytes, as a pointer
  uint32_t lora_tiles;       // LoRA's tiles, after the stages (narrow shape only)
  unsigned char* lora_ptr;
};

template <typename Shape>
__device__ __forceinline__ SharedLayout shared_layout() {
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  SharedLayout l;
  l.bound = reinterpret_cast<int32_t*>(smem);
  l.tile_start = l.bound + kGroupedGemmSm90MaxExperts + 1;
  l.warp_max = l.tile_start + kGroupedGemmSm90MaxExperts + 1;
  l.bars = reinterpret_cast<Barriers*>(smem + kBarrierOffset);
  const uint32_t smem_base = shared_address(smem);
  l.stages =
      (smem_base + static_cast<uint32_t>(kBarrierOffset + sizeof(Barriers)) + 1023u) & ~1023u;
  l.stage_ptr = smem + (l.stages - smem_base);
  l.lora_tiles = l.stages + Shape::kStages * Shape::kStageBytes;
  l.lora_ptr = l.stage_ptr + Shape::kStages * Shape::kStageBytes;
  return l;
}

// LoRA's region for finish_tile: full once the producer's copies of the tile's LoRA operands have
// landed; handed back once this warp's LoRA MMAs have retired.
struct BarrierLoraSync {
  Barriers* bars;
  uint32_t* phase;
  int lane;
  __device__ __forceinline__ void acquire() const {
    mbarrier_wait(&bars->lora_full, *phase);
    fence_proxy_async_shared();
  }
  __device__ __forceinline__ void release() const {
    warp_arrive(&bars->lora_empty, lane);
    *phase ^= 1u;
  }
};

// The first producer thread's copies of the weight's tiles of one stage (k block k0 of the tile
// whose first output column is n0): an arrival announcing their bytes on the stage's full
// barrier, then two 64 x 64 boxes per B tile (K-major: rows 0-63 and 64-127; MN-major: the two
// 64-column blocks kMnBlockBytes apart), which TMA writes in the layout the cp.async loaders
// write (sm90_layout.h's SW128 offsets are the 128-byte swizzle).
template <typename Shape, bool BMnMajor>
__device__ __forceinline__ void load_weight_tiles(const GroupedGemmSm90Args& args,
                                                  const CUtensorMap* w_map, uint64_t* full,
                                                  unsigned char* stage, const TileCoord& tile,
                                                  int64_t n0, int64_t k0) {
  constexpr int kHalfBytes = kTileBytes / 2;
  static_assert(kHalfBytes == static_cast<int>(kMnBlockBytes), "a box is one 64-column block");
  const bool halves = glu_halves(args);
  mbarrier_arrive_expect_tx(full, Shape::kBTiles * kTileBytes);
  const int32_t e = static_cast<int32_t>(tile.expert), k = static_cast<int32_t>(k0);
#pragma unroll
  for (int s = 0; s < Shape::kBTiles; ++s) {
    const int64_t n0_s = n0 + s * b_tile_columns(args);  // B tile s's first column
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int32_t first = static_cast<int32_t>(halves ? n0_s : n0_s + 64 * h);
      const int32_t part = halves ? h : 0;
      unsigned char* const dst = stage + (1 + s) * kTileBytes + h * kHalfBytes;
      if constexpr (BMnMajor) {
        tma_load_4d(dst, w_map, full, first, part, k, e);
      } else {
        tma_load_4d(dst, w_map, full, k, first, part, e);
      }
    }
  }
}

template <typename Shape, bool BMnMajor>
__device__ __forceinline__ void produce(const GroupedGemmSm90Args& args, const CUtensorMap* w_map,
                                        int loader) {
  constexpr int kBTiles = Shape::kBTiles;
  const SharedLayout l = shared_layout<Shape>();
  const RowSchedule schedule = row_schedule<kBTiles>(args, l.tile_start);
  Barriers* const bars = l.bars;
  Ring<Shape::kStages> ring;
  [[maybe_unused]] uint32_t lora_phase = 0;  // narrow shape only
  for_each_tile(args, schedule, l.bound, l.tile_start, [&](const TileCoord& tile, int64_t n0) {
    const TileLoads<kProducerThreads, kBTiles> loads =  // this thread's copies, once per tile
        plan_tile_loads<BMnMajor, kProducerThreads, kBTiles>(args, tile, n0, loader);
    produce_k_blocks(&bars->ring, ring, schedule.k_blocks, [&](uint32_t stage, int64_t kb) {
      unsigned char* const stage_ptr = l.stage_ptr + stage * Shape::kStageBytes;
      if (loader == 0) {
        load_weight_tiles<Shape, BMnMajor>(args, w_map, &bars->ring.full[stage], stage_ptr, tile,
                                           n0, kb * kBK);
      }
      load_a_tile(args, loads, stage_ptr, kb * kBK, loader);
    });
    // After the tile's k blocks: the consumers need LoRA's operands only after them, and by now
    // the previous tile's LoRA MMAs have long retired.
    if constexpr (Shape::kLoraRegion) {
      if (args.lora_u != nullptr) {
        mbarrier_wait(&bars->lora_empty, lora_phase ^ 1u);
        load_lora<kProducerThreads>(args, l.lora_ptr, tile, n0, loader);
        cp_async_mbarrier_arrive(&bars->lora_full);
        lora_phase ^= 1u;
      }
    }
  });
  cp_async_commit();  // no copy of this thread is in flight when it exits
  cp_async_wait<0>();
}

// The k16 step j of k block `stage`: this warpgroup's 64 rows of A (a_offset bytes into the A
// tile) times the stage's B tiles (one m64n128k16, or one m64n256k16 over both of a wide tile).
template <typename Shape, bool BMnMajor>
__device__ __forceinline__ void mma_step(float (&d)[Shape::kAcc], uint32_t stage, uint32_t a_offset,
                                         int j) {
  const uint64_t desc_a = operand_descriptor<false>(stage + a_offset, j);
  const uint64_t desc_b = operand_descriptor<BMnMajor>(stage + kTileBytes, j);
  if constexpr (Shape::kBTiles == 1) {
    wgmma_m64n128k16<false, BMnMajor>(d, desc_a, desc_b);
  } else {
    wgmma_m64n256k16<false, BMnMajor>(d, desc_a, desc_b);
  }
}

template <typename Shape, bool BMnMajor>
__device__ __forceinline__ void consume(const GroupedGemmSm90Args& args, int tid) {
  constexpr int kAcc = Shape::kAcc;
  const SharedLayout l = shared_layout<Shape>();
  const RowSchedule schedule = row_schedule<Shape::kBTiles>(args, l.tile_start);
  Barriers* const bars = l.bars;
  const int warp = tid / 32, lane = tid % 32;
  const int group = warp / 4;  // rows 64 group .. of the tile
  const uint32_t a_offset = static_cast<uint32_t>(group) * (64 * 128);
  Ring<Shape::kStages> ring;
  uint32_t lora_phase = 0;
  for_each_tile(args, schedule, l.bound, l.tile_start, [&](const TileCoord& tile, int64_t n0) {
    float d[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) d[i] = 0.0f;
    consume_k_blocks(&bars->ring, ring, schedule.k_blocks, lane, d, [&](uint32_t stage_index) {
      const uint32_t stage = l.stages + stage_index * Shape::kStageBytes;
#pragma unroll
      for (int j = 0; j < kBK / 16; ++j) mma_step<Shape, BMnMajor>(d, stage, a_offset, j);
    });
#pragma unroll
    for (int s = 0; s < Shape::kBTiles; ++s) {
      // B tile s's columns are accumulators 64 s .. 64 s + 63 (the m64n256 map's second half is
      // the m64n128 map 128 columns on).
      finish_tile<Shape::kLoraRegion>(args, tile, n0 + s * b_tile_columns(args),
                                      *reinterpret_cast<float(*)[kWgmmaAcc]>(d + s * kWgmmaAcc),
                                      l.lora_tiles, group, warp % 4, lane,
                                      BarrierLoraSync{bars, &lora_phase, lane});
    }
  });
}

// w_map: the weight as weight_tma_tensor describes it (a kernel parameter, as TMA requires).
template <typename Shape, bool BMnMajor>
__global__ void __launch_bounds__(kWsThreads, 1)
    grouped_gemm_sm90_ws_kernel(const GroupedGemmSm90Args args,
                                const __grid_constant__ CUtensorMap w_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  {
    const SharedLayout l = shared_layout<Shape>();
    build_tile_prefix(args, l.bound, l.tile_start, l.warp_max);
    if (threadIdx.x == 0) {
      // A full phase: each producer thread's cp.async arrival and the TMA bytes' announcement.
      l.bars->ring.init(Shape::kStages, kProducerThreads + 1);
      mbarrier_init(&l.bars->lora_full, kProducerThreads);
      mbarrier_init(&l.bars->lora_empty, kConsumerThreads / 32);
      fence_mbarrier_init();
      fence_proxy_async_shared();  // TMA's complete_tx reaches the barriers through the async proxy
    }
  }
  __syncthreads();  // the tile prefix and the barriers; no block-wide barrier after this
  run_roles<Shape::kProducerRegisters, Shape::kConsumerRegisters>(
      [&](int loader) { produce<Shape, BMnMajor>(args, &w_map, loader); },
      [&](int tid) { consume<Shape, BMnMajor>(args, tid); });
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a features: never launched (CMakeLists.txt builds 90a only)
#endif
}

template <typename Shape>
cudaError_t raise_smem_limit() {
  for (auto* kernel :
       {grouped_gemm_sm90_ws_kernel<Shape, false>, grouped_gemm_sm90_ws_kernel<Shape, true>}) {
    MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem_bytes<Shape>())));
  }
  return cudaSuccess;
}

template <typename Shape>
cudaError_t launch_shape(const GroupedGemmSm90Args& args, const CUtensorMap& w_map, int sms,
                         cudaStream_t stream) {
  auto* kernel = args.w_mn_major ? grouped_gemm_sm90_ws_kernel<Shape, true>
                                 : grouped_gemm_sm90_ws_kernel<Shape, false>;
  MOEFORGE_CUDA_CHECK(launch_kernel(kernel, dim3(static_cast<unsigned>(sms)), dim3(kWsThreads),
                                    smem_bytes<Shape>(), stream, args, w_map));
  return cudaSuccess;
}

}  // namespace

// The weight W [E, n, k] (K-major) or W^T [E, k, n] (MN-major) as a 4-dimensional tensor for
// TMA, whose 64 x 64 boxes are the halves of a B tile: dims (k, rows, part, E) or (columns, part,
// k, E), where `part` splits SwiGLU's gate and up halves (rows / columns I each) and is 1
// otherwise. Out-of-range rows, columns and k read zeros, as the cp.async loaders zero-fill them.
TmaTensor4d weight_tma_tensor(const GroupedGemmSm90Args& args) {
  const bool halves = glu_halves(args);
  const uint64_t n = static_cast<uint64_t>(halves ? args.n / 2 : args.n);
  const uint64_t parts = halves ? 2 : 1, k = static_cast<uint64_t>(args.k);
  const uint64_t ldw = static_cast<uint64_t>(args.ldw) * 2;  // bytes
  const uint64_t e_stride = static_cast<uint64_t>(args.w_stride_e) * 2;
  const uint64_t experts = static_cast<uint64_t>(args.num_experts);
  TmaTensor4d t;
  t.base = args.w;
  if (!args.w_mn_major) {
    t.dims[0] = k, t.dims[1] = n, t.dims[2] = parts, t.dims[3] = experts;
    t.strides[0] = ldw, t.strides[1] = ldw * n, t.strides[2] = e_stride;
    t.box[0] = 64, t.box[1] = 64, t.box[2] = 1, t.box[3] = 1;
  } else {
    t.dims[0] = n, t.dims[1] = parts, t.dims[2] = k, t.dims[3] = experts;
    t.strides[0] = 2 * n, t.strides[1] = ldw, t.strides[2] = e_stride;
    t.box[0] = 64, t.box[1] = 1, t.box[2] = 64, t.box[3] = 1;
  }
  // One expert's stride is never stepped: any value the rules accept.
  if (experts == 1) t.strides[2] = t.strides[1] * t.dims[2];
  return t;
}

cudaError_t raise_smem_limit_warp_specialized() {
  MOEFORGE_CUDA_CHECK(raise_smem_limit<NarrowShape>());
  return raise_smem_limit<WideShape>();
}

cudaError_t launch_warp_specialized(const GroupedGemmSm90Args& args, int sms, cudaStream_t stream,
                                    bool* launched) {
  *launched = false;
  CUtensorMap w_map;
  const cudaError_t encoded = encode_tma_tensor(weight_tma_tensor(args), &w_map);
  // A layout TMA cannot describe, or no TMA in the driver: the caller runs another pipeline.
  // Any other error (e.g. no context) is reported.
  if (encoded == cudaErrorInvalidValue || encoded == cudaErrorNotSupported) return cudaSuccess;
  MOEFORGE_CUDA_CHECK(encoded);
  *launched = true;
  // LoRA's operands have no region beside the wide stages: the narrow tiles take such GEMMs, and
  // those whose columns one narrow tile covers (half of each wide tile would be zero columns).
  const int64_t columns = glu_halves(args) ? args.n / 2 : args.n;
  const bool wide = args.pipeline == Sm90Pipeline::kWarpSpecializedWide && args.lora_u == nullptr &&
                    columns > b_tile_columns(args);
  return wide ? launch_shape<WideShape>(args, w_map, sms, stream)
              : launch_shape<NarrowShape>(args, w_map, sms, stream);
}

}  // namespace moeforge::kernels::sm90

namespace moeforge::kernels {

bool grouped_gemm_sm90_weight_via_tma(const GroupedGemmSm90Args& args) {
  CUtensorMap w_map;
  return grouped_gemm_sm90_args_valid(args) && args.w != nullptr &&
         sm90::encode_tma_tensor(sm90::weight_tma_tensor(args), &w_map) == cudaSuccess;
}

}  // namespace moeforge::kernels
