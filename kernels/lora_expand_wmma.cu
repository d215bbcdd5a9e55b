// Tensor-core path of launch_lora_expand_add for __half / __nv_bfloat16 (contract:
// moeforge/kernels/lora_expand.h; internal interface: lora_expand_wmma.h).
//
// Why: the SIMT kernel (lora_expand.cu) spends `rank` fp32 FMAs per element of out, plus the
// conversions and the u / M_e loads of every rank step: ~4 instructions per byte of out moved for
// r = 16, which kept it issue-bound at ~1.3 TB/s on an H100. On tensor cores the rank product of
// a 16 x 16 tile is one mma_sync per 16 ranks, and the kernel is left with its memory traffic (one
// read and one write of out, u's rows, M_e's tile from L2).
//
// Design: CTA tile 64 rows x 128 columns, 256 threads = 8 warps in a 4 (rows) x 2 (columns)
// grid, each warp owning 16 rows x 64 columns (4 fp32 accumulator fragments of 16 x 16; 8 per
// warp spilled under 128 registers). grid.x walks row tiles (consecutive rows of out), grid.y
// column tiles (grid.x capped: blocks stride over row tiles). Rows are grouped by expert, but a
// tile may meet several experts (usually one): it makes one pass per expert, each over 16-wide rank
// chunks staged in shared memory as raw 16-bit values —
//   u    [64][16 + 8]   the tile's rows (rows past the routed ones and ranks past `rank` zero;
//                       rows of other experts are harmless: row i of u M_e depends on u's row i
//                       only, and only the expert's rows are updated) (matrix_a, row_major),
//   M_e  [16][128 + 8]  ranks past `rank` and columns past n zero (matrix_b, row_major),
// the 8-element padding keeping 16-byte rows and 32-byte aligned fragment pointers (the zero
// padding is in both operands, so no garbage or NaN enters through 0 * x).
// After the chunks each warp stores its accumulators into its own fp32 scratch [16][64 + 4]
// and its lanes update the expert's rows 16 bytes at a time (8 lanes per row's 128 bytes, all
// four loads of a lane issued before its first store): out = round(fma(scaling, acc, out)).
// Warps without a row of the expert skip its mma and update (a warp-uniform test).
//
// Rounding: products of 16-bit values are exact in fp32; the tensor cores' fp32 accumulation
// order is unspecified (hence no bitwise equality with the CPU op, unlike the SIMT path).
// Deterministic: each element comes from one warp's fixed sequence of mma_sync calls.
// The kernel body exists for sm80+ only (bf16 WMMA needs it); elsewhere it traps, and
// lora_expand_wmma_applies keeps the launcher from choosing it.
#include "lora_expand_wmma.h"

#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "expert_bounds.cuh"
#include "launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/lora_expand.h"
#include "moeforge/kernels/numeric.h"

namespace moeforge::kernels::lora_expand_detail {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsM = 4, kWarpsN = 2;
constexpr int kWarps = kWarpsM * kWarpsN;
constexpr int kThreads = kWarps * kWarp;
constexpr int kFrag = 16;                // wmma m = n = k
constexpr int kBM = kWarpsM * kFrag;     // rows per CTA tile
constexpr int kBN = 128;                 // columns per CTA tile
constexpr int kWarpN = kBN / kWarpsN;    // columns per warp
constexpr int kFragsN = kWarpN / kFrag;  // accumulator fragments per warp
constexpr int kChunk = 8;                // 16-bit elements per 16-byte vector
constexpr int kLdU = kFrag + kChunk;     // u tile row (elements)
constexpr int kLdM = kBN + kChunk;       // M_e tile row (elements)
constexpr int64_t kMaxBlocks = 2048;     // ~8 waves of 2 CTAs on 132 SMs; blocks stride beyond
constexpr int kLdC = kWarpN + 4;         // fp32 scratch row (a multiple of 4, as wmma needs)
constexpr int kUChunks = kBM * (kFrag / kChunk);                    // 128: threads 0..127 stage u
constexpr int kChunksPerRow = kBN / kChunk;                         // 16 (M_e tile)
constexpr int kWarpChunksPerRow = kWarpN / kChunk;                  // 8 (a warp's update)
constexpr int kRowsPerUpdate = kWarp / kWarpChunksPerRow;           // 4 rows per warp instruction
constexpr int kUpdatesPerLane = kFrag * kWarpChunksPerRow / kWarp;  // 4
static_assert(kUChunks <= kThreads, "at most one u chunk per thread");
static_assert(kFrag * kChunksPerRow == kThreads, "one M_e chunk per thread");
static_assert((kLdU * 2) % 16 == 0 && (kLdM * 2) % 16 == 0, "16-byte aligned smem rows");
static_assert((kFrag * kLdU * 2) % 32 == 0 && (kFrag * 2) % 32 == 0, "32-byte fragment pointers");
static_assert((kFrag * kLdC * 4) % 32 == 0, "32-byte aligned scratch per warp");
// The kernel's static shared memory (u and M_e tiles, fp32 scratch, expert bounds) within the
// 48 KB a block may hold without the dynamic opt-in.
static_assert(2 * (kBM * kLdU + kFrag * kLdM) + 4 * (kWarps * kFrag * kLdC) +
                      4 * (kLoraExpandMaxExperts + 1 + kBoundsMaxWarps) <=
                  48 * 1024,
              "static shared memory over 48 KB");

template <typename T>
struct alignas(16) Vec {
  T v[kChunk];
};

// Eight consecutive 16-bit values of a row into smem (16-byte aligned): one vector load when
// `vector` (the caller checked stride and alignment), else element by element; `valid` of them
// are read, the rest are zero.
template <typename T>
__device__ __forceinline__ void stage_chunk(uint16_t* dst, const T* src, int valid, bool vector) {
  Vec<T> chunk;
  if (vector && valid == kChunk) {
    chunk = *reinterpret_cast<const Vec<T>*>(src);
  } else {
#pragma unroll
    for (int t = 0; t < kChunk; ++t) chunk.v[t] = t < valid ? src[t] : from_acc<T>(0.0f);
  }
  *reinterpret_cast<Vec<T>*>(dst) = chunk;
}

// 2 CTAs (16 warps) per SM, <= 128 registers: bf16 128, fp16 110, no spills (3 CTAs spilled).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    lora_expand_add_wmma_kernel(const LoraExpandArgs<T> args, bool u_vector, bool m_vector) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(MOEFORGE_KERNEL_EMULATION)
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(128) uint16_t s_u[kBM * kLdU];
  __shared__ __align__(128) uint16_t s_m[kFrag * kLdM];
  __shared__ __align__(128) float s_c[kWarps][kFrag * kLdC];
  __shared__ int32_t s_bound[kLoraExpandMaxExperts + 1];
  __shared__ int32_t s_warp_max[kBoundsMaxWarps];

  build_expert_bounds(args.offsets, args.num_experts, args.rows, s_bound, s_warp_max);
  const int64_t routed = s_bound[args.num_experts];  // rows from here on stay as they are
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / kWarp, lane = tid % kWarp;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  const int64_t wc0 = c0 + warp_n * kWarpN;  // the warp's first column
  T* const su = reinterpret_cast<T*>(s_u);
  T* const sm = reinterpret_cast<T*>(s_m);

  // Blocks stride over the row tiles (the grid is capped), building the bounds once for many.
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM; r0 < routed;
       r0 += static_cast<int64_t>(gridDim.x) * kBM) {
    const int64_t r1 = r0 + kBM < routed ? r0 + kBM : routed;
    const int64_t w0 = r0 + warp_m * kFrag;  // the warp's first row
    for (int64_t e = expert_of_row(s_bound, args.num_experts, r0);
         e < args.num_experts && s_bound[e] < r1; ++e) {
      const int64_t s0 = s_bound[e] > r0 ? s_bound[e] : r0;
      const int64_t s1 = s_bound[e + 1] < r1 ? s_bound[e + 1] : r1;
      if (s0 >= s1) continue;  // an empty expert (uniform over the block)
      const bool warp_has_rows = w0 < s1 && w0 + kFrag > s0;
      const T* m_e = args.m + e * args.m_stride_e;

      wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kFragsN];
#pragma unroll
      for (int f = 0; f < kFragsN; ++f) wmma::fill_fragment(acc[f], 0.0f);

      for (int64_t k0 = 0; k0 < args.rank; k0 += kFrag) {
        __syncthreads();       // every warp has read the previous chunk's (or expert's) tiles
        if (tid < kUChunks) {  // u: thread -> (row, half of the 16 ranks)
          const int row = tid / 2, half = tid % 2;
          const int64_t r = r0 + row, k = k0 + half * kChunk, left = args.rank - k;
          const int valid = r < r1 && left > 0 ? (left < kChunk ? int(left) : kChunk) : 0;
          stage_chunk(s_u + row * kLdU + half * kChunk, args.u + r * args.ld_u + k, valid,
                      u_vector);
        }
        {  // M_e: thread -> (rank, 8 columns)
          const int krow = tid / kChunksPerRow, chunk = tid % kChunksPerRow;
          const int64_t k = k0 + krow, col = c0 + chunk * kChunk;
          const int valid = k < args.rank && col < args.n ? kChunk : 0;  // n % 8 == 0
          stage_chunk(s_m + krow * kLdM + chunk * kChunk, m_e + k * args.m_stride_j + col, valid,
                      m_vector);
        }
        __syncthreads();
        if (warp_has_rows) {
          wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
          wmma::load_matrix_sync(a, su + warp_m * kFrag * kLdU, kLdU);
#pragma unroll
          for (int f = 0; f < kFragsN; ++f) {
            wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> b;
            wmma::load_matrix_sync(b, sm + warp_n * kWarpN + f * kFrag, kLdM);
            wmma::mma_sync(acc[f], a, b, acc[f]);
          }
        }
      }
      if (!warp_has_rows) continue;

      float* const scratch = s_c[warp];
#pragma unroll
      for (int f = 0; f < kFragsN; ++f) {
        wmma::store_matrix_sync(scratch + f * kFrag, acc[f], kLdC, wmma::mem_row_major);
      }
      __syncwarp();
      // Lane -> (row 4i + lane / 8, 8 columns lane % 8): a row's 128 bytes per 8 lanes.
      const int lane_row = lane / kWarpChunksPerRow, col_chunk = lane % kWarpChunksPerRow;
      const int64_t col = wc0 + col_chunk * kChunk;
      T* const out_lane = args.out + (w0 + lane_row) * args.ld_out + col;
      const int64_t step = kRowsPerUpdate * args.ld_out;
      const int first = static_cast<int>(s0 - w0), last = static_cast<int>(s1 - w0);  // warp rows
      const bool col_ok = col < args.n;
      Vec<T> o[kUpdatesPerLane];
#pragma unroll
      for (int i = 0; i < kUpdatesPerLane; ++i) {
        const int row = i * kRowsPerUpdate + lane_row;
        if (row >= first && row < last && col_ok) {
          o[i] = *reinterpret_cast<const Vec<T>*>(out_lane + i * step);
        }
      }
#pragma unroll
      for (int i = 0; i < kUpdatesPerLane; ++i) {
        const int row = i * kRowsPerUpdate + lane_row;
        if (row >= first && row < last && col_ok) {
          const float* c = scratch + row * kLdC + col_chunk * kChunk;
#pragma unroll
          for (int t = 0; t < kChunk; ++t) {
            o[i].v[t] = from_acc<T>(__fmaf_rn(args.scaling, c[t], to_acc(o[i].v[t])));
          }
          *reinterpret_cast<Vec<T>*>(out_lane + i * step) = o[i];
        }
      }
      __syncwarp();  // the scratch is read before the next expert's accumulators overwrite it
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched: lora_expand_wmma_applies is false without an sm80+ image
#endif
}

// Whether the current device runs the kernel: compute capability 8.0+ and an sm80+ image loaded
// for it (not older PTX). Both instantiations come from one architecture list, so one stands for
// both; the answer is cached per device (three runtime calls on every launch otherwise).
cudaError_t device_runs_wmma_kernel(bool* runs) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int8_t> cache[kCachedDevices];  // 0 unknown, 1 no, 2 yes
  int device = 0;
  MOEFORGE_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < kCachedDevices;
  if (cached && cache[device].load() != 0) {
    *runs = cache[device].load() == 2;
    return cudaSuccess;
  }
  int major = 0;
  MOEFORGE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  *runs = false;
  if (major >= 8) {
    cudaFuncAttributes attributes{};
    MOEFORGE_CUDA_CHECK(
        cudaFuncGetAttributes(&attributes, lora_expand_add_wmma_kernel<__nv_bfloat16>));
    *runs = attributes.ptxVersion >= 80;
  }
  if (cached) cache[device].store(*runs ? 2 : 1);
  return cudaSuccess;
}

}  // namespace

template <typename T>
cudaError_t lora_expand_wmma_applies(const T* out, int64_t ld_out, int64_t n, bool* applies) {
  *applies = false;
  if (n % kChunk != 0 || ld_out % kChunk != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0 ||
      (n + kBN - 1) / kBN > 65535) {
    return cudaSuccess;
  }
  return device_runs_wmma_kernel(applies);
}

template <typename T>
cudaError_t launch_lora_expand_add_wmma(const LoraExpandArgs<T>& args, cudaStream_t stream) {
  const int64_t row_tiles = (args.rows + kBM - 1) / kBM;
  const int64_t col_tiles = (args.n + kBN - 1) / kBN;
  if (col_tiles > 65535) return cudaErrorInvalidValue;  // grid.y (applies() excludes it)
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool u_vector = args.ld_u % kChunk == 0 && aligned(args.u);
  const bool m_vector =
      args.m_stride_j % kChunk == 0 && args.m_stride_e % kChunk == 0 && aligned(args.m);
  const int64_t row_blocks = std::clamp<int64_t>(kMaxBlocks / col_tiles, 1, row_tiles);
  MOEFORGE_CUDA_CHECK(
      launch_kernel(lora_expand_add_wmma_kernel<T>,
                    dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_tiles)),
                    dim3(kThreads), 0, stream, args, u_vector, m_vector));
  return cudaSuccess;
}

#define MOEFORGE_INSTANTIATE_LORA_EXPAND_WMMA(T)                                       \
  template cudaError_t lora_expand_wmma_applies<T>(const T*, int64_t, int64_t, bool*); \
  template cudaError_t launch_lora_expand_add_wmma<T>(const LoraExpandArgs<T>&, cudaStream_t);

MOEFORGE_INSTANTIATE_LORA_EXPAND_WMMA(__half)
MOEFORGE_INSTANTIATE_LORA_EXPAND_WMMA(__nv_bfloat16)
#undef MOEFORGE_INSTANTIATE_LORA_EXPAND_WMMA

}  // namespace moeforge::kernels::lora_expand_detail
