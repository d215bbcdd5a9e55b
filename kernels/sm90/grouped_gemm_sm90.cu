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
// Not tuned: no TMA, no warp specialisation, no overlap of epilogue and loads.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../async_copy.cuh"
#include "../expert_bounds.cuh"
#include "../launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "moeforge/kernels/sm90_layout.h"
#include "moeforge/kernels/swiglu_math.h"
#include "wgmma.cuh"

namespace moeforge::kernels {
namespace {

using namespace sm90;  // the shared tile constants and pipelines (wgmma.cuh)
constexpr int kBM = sm90::kTileMn, kBN = sm90::kTileMn;
constexpr int kChunksPerRow = kBK * 2 / 16;                       // 8
constexpr int kChunksPerThread = kBM * kChunksPerRow / kThreads;  // 4 of A, 4 of B
constexpr int kAcc = sm90::kWgmmaAcc;  // fp32 accumulators per thread of an m64n128 result
constexpr int kGluHalf = kBN / 2;      // with SwiGLU: gate columns, then as many up columns
static_assert(kBM == kBN, "one chunk mapping serves A and B");

// The row of x that row r of a tile (rows [row0, row0 + rows) of the routed order) reads, or -1
// for a zero row: r past the segment's tail, or (gathering) a pair outside [0, T * top_k).
__device__ __forceinline__ int64_t a_source_row(const GroupedGemmSm90Args& args, int64_t row0,
                                                int64_t rows, int r) {
  if (r >= rows) return -1;
  const int64_t routed = row0 + r;
  if (args.sorted_pairs == nullptr) return routed;
  const int32_t pair = args.sorted_pairs[routed];  // < num_tokens * top_k <= INT32_MAX
  return pair >= 0 && pair < args.num_tokens * args.top_k
             ? static_cast<int64_t>(pair / static_cast<int32_t>(args.top_k))
             : -1;
}

// Whether the B tile pairs HF's SwiGLU halves: 64 gate columns n0.. then the 64 up columns
// I + n0.. (gpt-oss's interleaved pairs are adjacent columns of an ordinary tile).
__device__ __forceinline__ bool glu_halves(const GroupedGemmSm90Args& args) {
  return args.a != nullptr && args.glu == GluVariant::kSilu;
}

// The output column that tile column c (of a tile whose first column is n0, an intermediate
// column with SwiGLU halves) stands for, or -1 past the output: n0 + c, or with SwiGLU halves
// the gate column n0 + c (c < 64) or the up column I + n0 + c - 64.
__device__ __forceinline__ int64_t output_column(const GroupedGemmSm90Args& args, int64_t n0,
                                                 int c) {
  if (!glu_halves(args)) return n0 + c < args.n ? n0 + c : -1;
  const int64_t inter = args.n / 2, j = n0 + c % kGluHalf;
  return j < inter ? (c < kGluHalf ? 0 : inter) + j : -1;
}

// One 16-byte chunk of an MN-major B tile at `tile`: chunk `id` % 16 of k row `id` / 16, i.e.
// row k0 + id / 16 of a row-major [k_limit, n] matrix at src_e (row stride ld: W_e^T, or LoRA's
// M_e). Chunks 0-7 (columns n0..) fill the first 64-column block, chunks 8-15 the second (with
// SwiGLU: the up columns I + n0.. instead of n0 + 64..); zero past n and past k_limit.
__device__ __forceinline__ void load_b_mn_major_chunk(const GroupedGemmSm90Args& args,
                                                      unsigned char* tile,
                                                      const __nv_bfloat16* src_e, int64_t ld,
                                                      int64_t k_limit, int64_t n0, int64_t k0,
                                                      int id) {
  const int kr = id / (2 * kChunksPerRow), chunk = id % (2 * kChunksPerRow);
  const int64_t kb = k0 + kr, half = chunk / kChunksPerRow;
  const bool halves = glu_halves(args);
  const int64_t j = (halves ? n0 : n0 + half * 64) + (chunk % kChunksPerRow) * 8;
  const int64_t limit = halves ? args.n / 2 : args.n;
  const int64_t col = (halves && half == 1 ? args.n / 2 : 0) + j;
  const bool ok = kb < k_limit && j < limit;
  const int n_bytes = ok ? static_cast<int>(std::min<int64_t>(8, limit - j)) * 2 : 0;
  cp_async_16_zfill(tile + sm90::sw128_mn_offset(static_cast<uint32_t>(kr),
                                                 static_cast<uint32_t>(chunk), kMnBlockBytes),
                    ok ? src_e + kb * ld + col : src_e, n_bytes);
}

// Loads one stage: the A tile (this thread's rows a_rows[i] of x, resolved once per tile) and the
// B tile (columns n0.. of the output from W_e, K-major or MN-major: BMnMajor = args.w_mn_major),
// k block k0.
template <bool BMnMajor>
__device__ __forceinline__ void load_stage(const GroupedGemmSm90Args& args, unsigned char* stage,
                                           const int64_t (&a_rows)[kChunksPerThread], int64_t n0,
                                           const __nv_bfloat16* w_e, int64_t k0) {
  const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const int id = tid + i * kThreads;
    const int r = id / kChunksPerRow, c = id % kChunksPerRow;
    const int64_t k = k0 + c * 8;
    const int k_bytes = k < args.k ? static_cast<int>(std::min<int64_t>(8, args.k - k)) * 2 : 0;
    const uint32_t offset = sm90::sw128_offset(static_cast<uint32_t>(r), static_cast<uint32_t>(c));
    const bool a_ok = a_rows[i] >= 0 && k_bytes > 0;
    const __nv_bfloat16* a_src = a_ok ? args.x + a_rows[i] * args.ldx + k : args.x;
    cp_async_16_zfill(stage + offset, a_src, a_ok ? k_bytes : 0);
    if constexpr (!BMnMajor) {
      // B: row n0 + r of W_e (zero past n); with SwiGLU (n0 then counts intermediate columns) the
      // tile's first 64 rows are gate rows n0.., the next 64 the matching up rows I + n0...
      int64_t b_row = n0 + r;
      bool b_ok = b_row < args.n;
      if (glu_halves(args)) {
        const int64_t inter = args.n / 2, j = n0 + (r % kGluHalf);
        b_row = (r < kGluHalf ? 0 : inter) + j;
        b_ok = j < inter;
      }
      b_ok = b_ok && k_bytes > 0;
      const __nv_bfloat16* b_src = b_ok ? w_e + b_row * args.ldw + k : args.w;
      cp_async_16_zfill(stage + kTileBytes + offset, b_src, b_ok ? k_bytes : 0);
    } else {
      load_b_mn_major_chunk(args, stage + kTileBytes, w_e, args.ldw, args.k, n0, k0, id);
    }
  }
}

// The k16 steps of LoRA's rank-r product (r <= kSm90MaxLoraRank = one k block).
__device__ __forceinline__ int lora_k_steps(const GroupedGemmSm90Args& args) {
  return static_cast<int>((args.lora_rank + 15) / 16);
}

// Loads LoRA's operands of a tile into `tiles` (a stage-sized region of its own): the tile's rows
// of u (in expert order, zero past the segment's tail) as a K-major A tile with k = the rank
// (zero from the rank to the last k16 step's end), and M_e's rows as an MN-major B tile, columns
// as the weight's (n0.., or gate and up columns with SwiGLU), zero past the rank.
__device__ __forceinline__ void load_lora(const GroupedGemmSm90Args& args, unsigned char* tiles,
                                          const sm90::TileCoord& tile, int64_t n0) {
  const int tid = static_cast<int>(threadIdx.x), steps = lora_k_steps(args);
  const __nv_bfloat16* m_e = args.lora_m + tile.expert * args.lora_m_stride_e;
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const int id = tid + i * kThreads;
    const int r = id / kChunksPerRow, c = id % kChunksPerRow;
    if (c < 2 * steps) {  // the chunks the k16 steps read
      const bool ok = r < tile.rows && c * 8 < args.lora_rank;
      const __nv_bfloat16* src =
          ok ? args.lora_u + (tile.row0 + r) * args.ld_lora_u + c * 8 : args.lora_u;
      cp_async_16_zfill(
          tiles + sm90::sw128_offset(static_cast<uint32_t>(r), static_cast<uint32_t>(c)), src,
          ok ? 16 : 0);
    }
    if (id / (2 * kChunksPerRow) < 16 * steps) {
      load_b_mn_major_chunk(args, tiles + kTileBytes, m_e, args.ld_lora_m, args.lora_rank, n0, 0,
                            id);
    }
  }
}

// Dynamic shared memory of the row-grouped kernel: the pipeline's, then LoRA's tiles.
template <typename Pipeline>
constexpr size_t smem_bytes() {
  return Pipeline::kSmemBytes + kStageBytes;
}

template <typename Pipeline, bool BMnMajor>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_sm90_kernel(const GroupedGemmSm90Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  int32_t* bound = reinterpret_cast<int32_t*>(smem);             // [E + 1]
  int32_t* tile_start = bound + kGroupedGemmSm90MaxExperts + 1;  // [E + 1]
  int32_t* warp_max = tile_start + kGroupedGemmSm90MaxExperts + 1;
  const uint32_t smem_base = sm90::shared_address(smem);
  const uint32_t stages = (smem_base + static_cast<uint32_t>(kBoundsBytes) + 1023u) & ~1023u;
  unsigned char* const stage_ptr = smem + (stages - smem_base);  // the same bytes, as a pointer
  const uint32_t lora_tiles = stages + Pipeline::kStages * kStageBytes;  // after the stages
  unsigned char* const lora_ptr = stage_ptr + Pipeline::kStages * kStageBytes;
  const int64_t E = args.num_experts;

  build_expert_bounds(args.expert_offsets, E, args.num_rows, bound, warp_max);
  if (threadIdx.x == 0) {  // E <= 1024: one thread's prefix is short next to the GEMM
    tile_start[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
      tile_start[e + 1] =
          tile_start[e] + static_cast<int32_t>(sm90::m_tiles(bound[e + 1] - bound[e], kBM));
    }
  }
  __syncthreads();
  const bool glu = args.a != nullptr, halves = glu_halves(args);
  const bool lora = args.lora_u != nullptr, bias = args.bias != nullptr;
  const int64_t tile_cols =
      halves ? kGluHalf : kBN;  // output columns (intermediate ones with halves)
  const int64_t n_tiles = ((halves ? args.n / 2 : args.n) + tile_cols - 1) / tile_cols;
  const int64_t num_tiles = int64_t{tile_start[E]} * n_tiles;
  const int64_t k_blocks = (args.k + kBK - 1) / kBK;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int group = warp / 4;  // warpgroup: rows 64 group .. of the tile

  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const sm90::TileCoord tile = sm90::tile_coord<int32_t>(t, bound, tile_start, E, n_tiles, kBM);
    const int64_t n0 = tile.n_tile * tile_cols;
    const __nv_bfloat16* w_e = args.w + tile.expert * args.w_stride_e;
    int64_t a_rows[kChunksPerThread];  // read once per tile, used by every k block
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int r = (static_cast<int>(threadIdx.x) + i * kThreads) / kChunksPerRow;
      a_rows[i] = a_source_row(args, tile.row0, tile.rows, r);
    }
    float d[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) d[i] = 0.0f;

    // LoRA's tiles ride in the first k block's copy group: landed long before the epilogue.
    if (lora) load_lora(args, lora_ptr, tile, n0);
    sm90::mma_k_loop<Pipeline, false, BMnMajor>(
        k_blocks, stage_ptr, stages, static_cast<uint32_t>(group) * (64 * 128), d,
        [&](unsigned char* stage, int64_t kb) {
          load_stage<BMnMajor>(args, stage, a_rows, n0, w_e, kb * kBK);
        });
    if (bias || lora) {
      // grouped_mm's bias pass and lora_expand_add_'s rule on the tile, in that order: the GEMM's
      // result rounded as the plain kernel stores it, the bias added and rounded, then u M_e on
      // the tensor cores in the freed accumulators and the fma.
      __nv_bfloat162 base[kAcc / 2];
#pragma unroll
      for (int i = 0; i < kAcc; i += 2) {
        base[i / 2] = __floats2bfloat162_rn(d[i], d[i + 1]);
        // LoRA's MMAs add to +0; without them fma(0, -0, v) below is v, -0 included.
        d[i] = d[i + 1] = lora ? 0.0f : -0.0f;
      }
      if (bias) {
        const __nv_bfloat16* b_e = args.bias + tile.expert * args.bias_stride_e;
#pragma unroll
        for (int i = 0; i < kAcc; i += 2) {  // columns (col, col + 1): col even, same half
          const int64_t col =
              output_column(args, n0, sm90::accumulator_coord(warp % 4, lane, i).col);
          if (col >= 0) {
            const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(b_e + col);
            base[i / 2] = __floats2bfloat162_rn(__low2float(base[i / 2]) + __low2float(b),
                                                __high2float(base[i / 2]) + __high2float(b));
          }
        }
      }
      if (lora) {
        if (k_blocks == 0) {  // no k block waited for and fenced the copies of LoRA's tiles
          sm90::fence_proxy_async_shared();
          __syncthreads();
        }
        sm90::fence_accumulators(d);
        sm90::wgmma_fence();
        // (ptxas adds a warpgroup.arrive before each of these branchy MMAs: once per tile.)
#pragma unroll
        for (int j = 0; j < kBK / 16; ++j) {
          if (j < lora_k_steps(args)) {  // uniform over the block
            sm90::wgmma_m64n128k16<false, true>(
                d, sm90::operand_descriptor<false>(lora_tiles + group * (64 * 128), j),
                sm90::operand_descriptor<true>(lora_tiles + kTileBytes, j));
          }
        }
        sm90::wgmma_commit_group();
        sm90::wgmma_wait<0>();
        sm90::fence_accumulators(d);
        __syncthreads();  // the next tile's first copies refill the tiles these MMAs read
      }
#pragma unroll
      for (int i = 0; i < kAcc; i += 2) {
        const float scale = lora ? args.lora_scale : 0.0f;
        d[i] = __fmaf_rn(scale, d[i], __low2float(base[i / 2]));
        d[i + 1] = __fmaf_rn(scale, d[i + 1], __high2float(base[i / 2]));
      }
    }

    // Epilogue: value pairs (i, i + 1) are columns (c, c + 1) of one row.
    if (!halves) {  // y (or gpt-oss's h and, from its interleaved pairs, a)
#pragma unroll
      for (int i = 0; i < kAcc; i += 2) {
        const sm90::FragCoord c = sm90::accumulator_coord(warp % 4, lane, i);
        const int64_t r = 64 * group + c.row, col = n0 + c.col;
        if (r < tile.rows && col < args.n) {
          const __nv_bfloat162 pair = __floats2bfloat162_rn(d[i], d[i + 1]);
          *reinterpret_cast<__nv_bfloat162*>(args.y + (tile.row0 + r) * args.ldy + col) = pair;
          if (glu) {  // gpt-oss: gate column col, up column col + 1 (col even), as swiglu pairs
                      // them
            args.a[(tile.row0 + r) * args.lda + col / 2] = __float2bfloat16_rn(
                gpt_oss_glu(__low2float(pair), __high2float(pair), args.glu_alpha, args.glu_limit));
          }
        }
      }
    } else {
      // Values i < kAcc / 2 are gate columns c < 64; value i + kAcc / 2 is up column c + 64, same
      // row, same thread. h is rounded first and a computed from the rounded h, as swiglu does.
      const int64_t inter = args.n / 2;
#pragma unroll
      for (int i = 0; i < kAcc / 2; i += 2) {
        const sm90::FragCoord c = sm90::accumulator_coord(warp % 4, lane, i);
        const int64_t r = 64 * group + c.row, j = n0 + c.col;
        if (r < tile.rows && j < inter) {
          const __nv_bfloat162 gate = __floats2bfloat162_rn(d[i], d[i + 1]);
          const __nv_bfloat162 up = __floats2bfloat162_rn(d[i + kAcc / 2], d[i + kAcc / 2 + 1]);
          __nv_bfloat16* h_row = args.y + (tile.row0 + r) * args.ldy;
          *reinterpret_cast<__nv_bfloat162*>(h_row + j) = gate;
          *reinterpret_cast<__nv_bfloat162*>(h_row + inter + j) = up;
          const __nv_bfloat162 act =
              __floats2bfloat162_rn(silu_glu(__low2float(gate), __low2float(up)),
                                    silu_glu(__high2float(gate), __high2float(up)));
          *reinterpret_cast<__nv_bfloat162*>(args.a + (tile.row0 + r) * args.lda + j) = act;
        }
      }
    }
  }
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
        return raise_smem_limit<OverlappedPipeline>();
      },
      &sms));
  return args.pipeline == Sm90Pipeline::kOverlapped
             ? launch_pipeline<OverlappedPipeline>(args, sms, stream)
             : launch_pipeline<SerialPipeline>(args, sms, stream);
}

}  // namespace moeforge::kernels
