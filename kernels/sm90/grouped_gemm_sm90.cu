// Stage S1 of docs/hopper-gemm-plan.md (contract: moeforge/kernels/grouped_gemm_sm90.h): a dense
// grouped GEMM on wgmma, built for sm_90a only (CMakeLists.txt), not yet run on a GPU. The host
// kernel emulator (tests/emu) runs it with wgmma emulated from the documented layout (below), so
// its schedule, loads, pipeline and epilogue are tested on machines without a GPU.
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

namespace moeforge::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 128, kBN = 128, kBK = 64;  // kBK bf16 = one 128-byte swizzled row
constexpr int kTileBytes = kBM * kBK * 2;      // 16 KB, A and B alike (kBN == kBM)
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kChunksPerRow = kBK * 2 / 16;                       // 8
constexpr int kChunksPerThread = kBM * kChunksPerRow / kThreads;  // 4 of A, 4 of B
constexpr int kAcc = kBN / 2;      // fp32 accumulators per thread of an m64n128 result
constexpr int kGluHalf = kBN / 2;  // with SwiGLU: gate columns, then as many up columns
// An MN-major B tile: two blocks of 64 columns (128-byte k rows), each kBK rows deep.
constexpr uint32_t kMnBlockBytes = kBK * 128;
constexpr size_t kBoundsBytes = 4 * (2 * (kGroupedGemmSm90MaxExperts + 1) + kBoundsMaxWarps);

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
static_assert(kBM == kBN, "one chunk mapping serves A and B");

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

// d[64 x 128] += A[64 x 16] B, both bf16 in shared memory through their descriptors: A K-major;
// B K-major (its 128 n rows of 16 k values, TransB false) or MN-major (16 k rows of 128 n
// values, TransB true: the instruction's transpose-B immediate); fp32 accumulators (scale-d = 1).
template <bool TransB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[kAcc], uint64_t desc_a,
                                                 uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const int scale_d = 1;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, %67;\n"
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
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TransB ? 1 : 0));
#elif defined(MOEFORGE_KERNEL_EMULATION)
  // Each thread adds its own accumulators' products (accumulator_coord), reading both operands
  // through their descriptors as the hardware is documented to: K-major rows of 128 bytes in
  // 8-row atoms SBO bytes apart, the 128-byte swizzle applied to the address (sm90_layout.h).
  // This checks that the kernel's writers, descriptors and epilogue agree with one reading of
  // the layout; only a GPU confirms the reading. Like the hardware's, the MMA is asynchronous:
  // the products are added when a wgmma_wait retires its group, and its operands, read at issue
  // and again then, must not have changed in between (a stage refilled under an in-flight MMA).
  // MN-major (B with TransB): 128-byte rows of 64 MN values, one per k, 8 k rows per atom and
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
        o.a[h][kk] = element(desc_a, 16 * warp + lane / 4 + 8 * h, kk, false);
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
#else
  (void)d, (void)desc_a, (void)desc_b;
#endif
}

// Makes every later use of d depend on the asm statements before it: the compiler may not move
// the epilogue's reads of the accumulators above the wgmma wait, which names no registers.
__device__ __forceinline__ void fence_accumulators(float (&d)[kAcc]) {
#if defined(MOEFORGE_KERNEL_EMULATION)
  (void)d;  // the emulated wgmma is an ordinary call
#else
#pragma unroll
  for (int i = 0; i < kAcc; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// The row of x that row r of a tile (rows [row0, row0 + rows) of the routed order) reads, or -1
// for a zero row: r past the segment's tail, or (gathering) a pair outside [0, T * top_k).
__device__ __forceinline__ int64_t a_source_row(const GroupedGemmSm90Args& args, int64_t row0,
                                                int64_t rows, int r) {
  if (r >= rows) return -1;
  const int64_t routed = row0 + r;
  if (args.sorted_pairs == nullptr) return routed;
  const int64_t pair = args.sorted_pairs[routed];
  return pair >= 0 && pair < args.num_tokens * args.top_k ? pair / args.top_k : -1;
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
      if (args.a != nullptr) {
        const int64_t inter = args.n / 2, j = n0 + (r % kGluHalf);
        b_row = (r < kGluHalf ? 0 : inter) + j;
        b_ok = j < inter;
      }
      b_ok = b_ok && k_bytes > 0;
      const __nv_bfloat16* b_src = b_ok ? w_e + b_row * args.ldw + k : args.w;
      cp_async_16_zfill(stage + kTileBytes + offset, b_src, b_ok ? k_bytes : 0);
    } else {
      // B MN-major: k row k0 + kr of W_e, 16 chunks of 8 columns; chunks 0-7 (columns n0..)
      // fill the first 64-column block, chunks 8-15 the second (with SwiGLU: the up columns
      // I + n0.. instead of n0 + 64..), zero past n and past k.
      const int kr = id / (2 * kChunksPerRow), chunk = id % (2 * kChunksPerRow);
      const int64_t kb = k0 + kr, half = chunk / kChunksPerRow;
      const int64_t j = (args.a != nullptr ? n0 : n0 + half * 64) + (chunk % kChunksPerRow) * 8;
      const int64_t limit = args.a != nullptr ? args.n / 2 : args.n;
      const int64_t col = (args.a != nullptr && half == 1 ? args.n / 2 : 0) + j;
      const bool b_ok = kb < args.k && j < limit;
      const int n_bytes = b_ok ? static_cast<int>(std::min<int64_t>(8, limit - j)) * 2 : 0;
      const __nv_bfloat16* b_src = b_ok ? w_e + kb * args.ldw + col : args.w;
      cp_async_16_zfill(stage + kTileBytes +
                            sm90::sw128_mn_offset(static_cast<uint32_t>(kr),
                                                  static_cast<uint32_t>(chunk), kMnBlockBytes),
                        b_src, n_bytes);
    }
  }
}

template <typename Pipeline, bool BMnMajor>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_sm90_kernel(const GroupedGemmSm90Args args) {
  constexpr int kStages = Pipeline::kStages, kAhead = Pipeline::kAhead;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  int32_t* bound = reinterpret_cast<int32_t*>(smem);             // [E + 1]
  int32_t* tile_start = bound + kGroupedGemmSm90MaxExperts + 1;  // [E + 1]
  int32_t* warp_max = tile_start + kGroupedGemmSm90MaxExperts + 1;
  const uint32_t smem_base = shared_address(smem);
  const uint32_t stages = (smem_base + static_cast<uint32_t>(kBoundsBytes) + 1023u) & ~1023u;
  unsigned char* const stage_ptr = smem + (stages - smem_base);  // the same bytes, as a pointer
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
  const bool glu = args.a != nullptr;
  const int64_t tile_cols = glu ? kGluHalf : kBN;  // output columns (intermediate ones with SwiGLU)
  const int64_t n_tiles = ((glu ? args.n / 2 : args.n) + tile_cols - 1) / tile_cols;
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

#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
      if (s < k_blocks)
        load_stage<BMnMajor>(args, stage_ptr + s * kStageBytes, a_rows, n0, w_e, s * kBK);
      cp_async_commit();
    }
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      cp_async_wait<kAhead - 1>();  // this thread's copies of stage kb have landed
      fence_proxy_async_shared();
      // Everyone's copies of stage kb are in, and every warpgroup's MMAs of k block
      // kb - 1 - kMmaInFlight have retired: the stage the loads below refill is free.
      __syncthreads();
      const int64_t next = kb + kAhead;
      if (next < k_blocks) {
        load_stage<BMnMajor>(args, stage_ptr + (next % kStages) * kStageBytes, a_rows, n0, w_e,
                             next * kBK);
      }
      cp_async_commit();
      const uint32_t stage = stages + static_cast<uint32_t>(kb % kStages) * kStageBytes;
      const uint32_t a_tile = stage + static_cast<uint32_t>(group) * (64 * 128);
      const uint32_t b_tile = stage + kTileBytes;
      fence_accumulators(d);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < kBK / 16; ++j) {  // k16 steps: 32 bytes along the swizzled rows
        const uint64_t desc_a =
            sm90::gmma_descriptor(a_tile + 32u * j, 16, 1024, sm90::GmmaLayout::kSwizzle128B);
        // B: K-major like A, or MN-major (two 64-column blocks, 8-row k atoms: 2 per k16 step).
        const uint64_t desc_b =
            BMnMajor
                ? sm90::gmma_descriptor(b_tile + 2048u * j, kMnBlockBytes, 1024,
                                        sm90::GmmaLayout::kSwizzle128B)
                : sm90::gmma_descriptor(b_tile + 32u * j, 16, 1024, sm90::GmmaLayout::kSwizzle128B);
        wgmma_m64n128k16<BMnMajor>(d, desc_a, desc_b);
      }
      wgmma_commit_group();
      wgmma_wait<Pipeline::kMmaInFlight>();
      fence_accumulators(d);
    }
    wgmma_wait<0>();
    fence_accumulators(d);
    cp_async_wait<0>();
    __syncthreads();  // the next tile's prologue refills stages this tile's last steps read

    // Epilogue: value pairs (i, i + 1) are columns (c, c + 1) of one row.
    if (!glu) {
#pragma unroll
      for (int i = 0; i < kAcc; i += 2) {
        const sm90::FragCoord c = sm90::accumulator_coord(warp % 4, lane, i);
        const int64_t r = 64 * group + c.row, col = n0 + c.col;
        if (r < tile.rows && col < args.n) {
          const __nv_bfloat162 pair = __floats2bfloat162_rn(d[i], d[i + 1]);
          *reinterpret_cast<__nv_bfloat162*>(args.y + (tile.row0 + r) * args.ldy + col) = pair;
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

// Per device, what a launch needs from the runtime, looked up once (an op calls the launcher 2-6
// times per layer step): whether the device is compute capability 9.0 and, once the kernel's
// shared-memory limit is raised there (a per-device setting), its SM count.
constexpr int kMaxCachedDevices = 64;
std::atomic<int> g_device_state[kMaxCachedDevices];  // 0 unknown, -1 unsupported, 1 supported
std::atomic<int> g_device_sms[kMaxCachedDevices];    // 0 until prepared

template <typename Pipeline>
cudaError_t raise_smem_limit() {
  for (auto* kernel :
       {grouped_gemm_sm90_kernel<Pipeline, false>, grouped_gemm_sm90_kernel<Pipeline, true>}) {
    MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(Pipeline::kSmemBytes)));
  }
  return cudaSuccess;
}

// The SM count of `device` after raising every variant's dynamic shared-memory limit on it.
cudaError_t prepare_device(int device, int* sms) {
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached && (*sms = g_device_sms[device].load(std::memory_order_acquire)) > 0) {
    return cudaSuccess;
  }
  MOEFORGE_CUDA_CHECK(raise_smem_limit<SerialPipeline>());
  MOEFORGE_CUDA_CHECK(raise_smem_limit<OverlappedPipeline>());
  MOEFORGE_CUDA_CHECK(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device));
  if (cached) g_device_sms[device].store(*sms, std::memory_order_release);
  return cudaSuccess;
}

template <typename Pipeline>
cudaError_t launch_pipeline(const GroupedGemmSm90Args& args, int sms, cudaStream_t stream) {
  auto* kernel = args.w_mn_major ? grouped_gemm_sm90_kernel<Pipeline, true>
                                 : grouped_gemm_sm90_kernel<Pipeline, false>;
  MOEFORGE_CUDA_CHECK(launch_kernel(kernel, dim3(static_cast<unsigned>(sms)), dim3(kThreads),
                                    Pipeline::kSmemBytes, stream, args));
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
  bool supported = false;
  MOEFORGE_CUDA_CHECK(grouped_gemm_sm90_supported(&supported));
  if (!supported) return cudaErrorNotSupported;
  int device = 0, sms = 0;
  MOEFORGE_CUDA_CHECK(cudaGetDevice(&device));
  MOEFORGE_CUDA_CHECK(prepare_device(device, &sms));
  return args.pipeline == Sm90Pipeline::kOverlapped
             ? launch_pipeline<OverlappedPipeline>(args, sms, stream)
             : launch_pipeline<SerialPipeline>(args, sms, stream);
}

}  // namespace moeforge::kernels
