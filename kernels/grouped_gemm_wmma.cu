// Tensor-core paths of launch_grouped_gemm and launch_grouped_gemm_wgrad (the latter: see
// grouped_gemm_wgrad_wmma_kernel below) for __half / __nv_bfloat16 operands (contract:
// moeforge/kernels/grouped_gemm.h; chosen by launch_grouped_gemm_impl in grouped_gemm_impl.cuh
// when args.engine == GroupedGemmEngine::kWmma, declared in grouped_gemm_wmma.h).
//
// Design (simple and correct first; nvcuda::wmma 16x16x16 fragments, fp32 accumulators):
//   CTA tile 128 rows x 128 columns, reduction slab kBK = 32, 256 threads = 8 warps in a 4 (rows)
//   x 2 (columns) grid, each warp owning a 32 x 64 tile = 2 x 4 accumulator fragments.
//   Work mapping: the SIMT kernel's find_tile, with 128-row tiles: grid.x = ceil(S / 128) +
//   min(E + 1, S) linear M-tile ids mapped on the device from the offsets (no host sync), grid.y =
//   ceil(n / 128). Surplus CTAs exit; tiles of the dropped tail write zeros (nothing when
//   accumulating).
//   Operands go through shared memory as raw 16-bit values in a layout fixed per instantiation:
//     x     [m][k]  (row_major matrix_a, ld 40)
//     W_e   [n][k]  (col_major matrix_b, ld 40) when |w_stride_k| <= |w_stride_n| (x W^T: weight
//                   [E, out, in], lora_A, lora_B's rank-major slices), else
//           [k][n]  (row_major matrix_b, ld 136) (x W: weight [E, in, out], padded copies),
//   i.e. the smem layout follows the operand's contiguous dimension, whatever the strides are;
//   the 8-element padding keeps the 16-byte rows of load_matrix_sync conflict free and every
//   fragment pointer 32-byte aligned. The K loop is a kStages-deep cp.async pipeline in dynamic
//   shared memory (kernels/async_copy.cuh): while the warps multiply slab kt, the copies of slabs
//   kt + 1 .. kt + kStages - 1 are in flight; one barrier per slab. A 16-byte chunk (8 elements
//   along the contiguous dimension) is copied asynchronously when the dimension has unit stride,
//   the other stride is a multiple of 8, the base is 16-byte aligned and the chunk is whole;
//   otherwise (and on the K / N / row edges) it is gathered element by element, predicated,
//   zero-filled and stored synchronously into the same stage.
//   Epilogue: each warp stores one 16x16 fp32 fragment at a time into its own smem scratch, then
//   its lanes apply alpha, bias and accumulation in fp32 exactly like the SIMT kernel
//   (v = alpha * acc (+ bias) ; y = v or y + v) and store the rows < the tile's row count and the
//   columns < n, converted with round-to-nearest-even.
// Deterministic: every output element comes from one warp's fixed sequence of mma_sync calls.
// Built for every architecture in the list, but the kernel body exists only for sm80+ (bf16
// WMMA needs it); the launcher is only called where that body is loaded (wmma_supported),
// elsewhere the body traps.
#include <mma.h>

#include <cstdint>
#include <cstdlib>
#include <limits>

#include "async_copy.cuh"
#include "grouped_gemm_impl.cuh"
#include "grouped_gemm_wmma.h"
#include "launch.cuh"

namespace moeforge::kernels::grouped_gemm_detail {
namespace {

constexpr int kWmmaBM = 128;  // rows per CTA tile (find_tile<kWmmaBM>)
constexpr int kWmmaBN = 128;  // columns per CTA tile
constexpr int kWmmaBK = 32;   // reduction slab
constexpr int kStages = 3;    // slabs in shared memory (cp.async pipeline depth)
constexpr int kWarpsM = 4, kWarpsN = 2;
constexpr int kWmmaThreads = kWarpsM * kWarpsN * kWarp;  // 256
constexpr int kFrag = 16;                                // wmma m = n = k
constexpr int kFragsM = kWmmaBM / kWarpsM / kFrag;       // 2 fragments per warp along rows
constexpr int kFragsN = kWmmaBN / kWarpsN / kFrag;       // 4 fragments per warp along columns
constexpr int kChunk = 8;                                // 16-bit elements per 16-byte chunk
constexpr int kPad = 8;
constexpr int kLdK = kWmmaBK + kPad;  // [m][k] and [n][k] tiles
constexpr int kLdN = kWmmaBN + kPad;  // [k][n] tile
constexpr int kLdC = kFrag + 4;       // fp32 epilogue scratch (a multiple of 4, as wmma needs)
constexpr int kChunksPerThread = kWmmaBM * kWmmaBK / kChunk / kWmmaThreads;  // 2
static_assert(kWmmaBN * kWmmaBK / kChunk / kWmmaThreads == kChunksPerThread, "same loader shape");
static_assert(kWmmaBK % kFrag == 0 && kWmmaBK % kChunk == 0, "whole fragments and chunks");
static_assert((kLdK * 2) % 16 == 0 && (kLdN * 2) % 16 == 0, "16-byte aligned smem rows");
static_assert((kFrag * kLdK * 2) % 32 == 0 && (kFrag * kLdN * 2) % 32 == 0,
              "32-byte aligned fragment pointers");

constexpr int kTileBElements = kWmmaBN * kLdK > kWmmaBK* kLdN ? kWmmaBN* kLdK : kWmmaBK* kLdN;
constexpr int kTileAElements = kWmmaBM * kLdK;
constexpr int kStageElements = kTileAElements + kTileBElements;   // 16-bit elements per stage
constexpr int kScratchFloats = kWarpsM * kWarpsN * kFrag * kLdC;  // epilogue, aliases the stages
constexpr size_t kWmmaSmemBytes = sizeof(uint16_t) * kStages * kStageElements;
static_assert(sizeof(uint16_t) * kTileAElements % 32 == 0 &&
                  sizeof(uint16_t) * kStageElements % 32 == 0,
              "32-byte aligned tiles");
static_assert(sizeof(float) * kScratchFloats <= kWmmaSmemBytes, "scratch fits in the stages");
// Two CTAs per SM on sm80 / sm90 (164 / 228 KB of shared memory, 128 registers a thread under
// __launch_bounds__(256, 2)); one on sm86 / sm89 (100 KB).
static_assert(kWmmaSmemBytes <= 100 * 1024, "fits an SM of every sm80+ GPU");
// Weight gradient: a and b slabs, both [32 rows][128 features] with ld kLdN.
constexpr int kWgradTileElements = kWmmaBK * kLdN;
constexpr int kWgradStageElements = 2 * kWgradTileElements;
constexpr size_t kWgradSmemBytes = sizeof(uint16_t) * kStages * kWgradStageElements;
static_assert(sizeof(uint16_t) * kWgradTileElements % 32 == 0, "32-byte aligned tiles");
static_assert(sizeof(float) * kScratchFloats <= kWgradSmemBytes, "scratch fits in the stages");
static_assert(kWmmaBM == kWmmaBN, "wgrad loads both operands with one loader shape");

// 8 consecutive (along c) 16-bit elements starting at p, as raw bits: elements j < valid are read
// at p[j * stride_c], the rest are zero (+0.0 in both half types). One 16-byte load when vec and
// the chunk is whole.
__device__ __forceinline__ uint4 load_chunk(const uint16_t* p, long long stride_c, long long valid,
                                            bool vec) {
  if (valid >= kChunk && vec) return __ldg(reinterpret_cast<const uint4*>(p));
  uint32_t w[kChunk / 2];
#pragma unroll
  for (int j = 0; j < kChunk / 2; ++j) {
    const uint32_t lo = 2 * j < valid ? __ldg(p + 2 * j * stride_c) : 0u;
    const uint32_t hi = 2 * j + 1 < valid ? __ldg(p + (2 * j + 1) * stride_c) : 0u;
    w[j] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// A tile of kRows x kCols 16-bit elements of an operand whose element (r, c) is at
// base[r * stride_r + c * stride_c], valid for r < r_limit and c < c_limit (zero outside).
// issue(r0, c0, tile, ld) copies the tile at (r0, c0) into shared memory as tile[r * ld + c] in
// 16-byte chunks along c (thread tid owns chunks tid + 256 l, so the lanes of a warp walk c, then
// r). kUnitC: stride_c is 1 (known at compile time; x).
// gather(g, origin, first, rows_fixed): the operand's rows go through a RowGather (the token
// permutation fused into the load): row r is then read at origin + gathered_row(g, first + r) *
// stride_r, and as zeros where that is -1. rows_fixed: every issue() has r0 = 0 (the forward's x
// tile, whose rows stay while k advances), so this thread's source rows are resolved once here
// instead of an index load per slab in front of each cp.async.
template <int kRows, int kCols, bool kUnitC = false>
struct ChunkLoader {
  static constexpr int kChunksPerRow = kCols / kChunk;
  static_assert(kRows * kChunksPerRow == kChunksPerThread * kWmmaThreads, "whole chunks");

  const uint16_t* base;
  long long stride_r, stride_c, r_limit, c_limit;
  bool vec;
  RowGather rows;  // index == nullptr: no gather
  long long first = 0;
  bool rows_fixed = false;
  int32_t fixed_src[kChunksPerThread];  // rows_fixed: source row of chunk l, -1 for none

  __device__ __forceinline__ ChunkLoader(const void* base_, long long stride_r_,
                                         long long stride_c_, long long r_limit_,
                                         long long c_limit_)
      : base(static_cast<const uint16_t*>(base_)),
        stride_r(stride_r_),
        stride_c(kUnitC ? 1 : stride_c_),
        r_limit(r_limit_),
        c_limit(c_limit_) {
    // Every chunk start is then 16-byte aligned: r0 * stride_r, c0 and c are multiples of 8.
    vec = (kUnitC || stride_c == 1) && stride_r % kChunk == 0 &&
          reinterpret_cast<uintptr_t>(base_) % (kChunk * sizeof(uint16_t)) == 0;
  }

  // Reads row r at origin + gathered_row(g, first_ + r) * stride_r from now on. The vector
  // condition carries over: the row offsets stay multiples of stride_r.
  __device__ __forceinline__ void gather(const RowGather& g, const void* origin, long long first_,
                                         bool rows_fixed_) {
    rows = g;
    first = first_;
    rows_fixed = rows_fixed_;
    vec = vec && reinterpret_cast<uintptr_t>(origin) % (kChunk * sizeof(uint16_t)) == 0;
    base = static_cast<const uint16_t*>(origin);
    if (rows_fixed) {
#pragma unroll
      for (int l = 0; l < kChunksPerThread; ++l) {
        const int r = (static_cast<int>(threadIdx.x) + l * kWmmaThreads) / kChunksPerRow;
        fixed_src[l] = r < r_limit ? static_cast<int32_t>(gathered_row(g, first + r)) : -1;
      }
    }
  }

  // Copies the tile at (r0, c0) into tile[r * ld + c] (one pipeline stage): cp.async for whole
  // aligned chunks, a predicated zero-filling gather and a plain store for the others.
  __device__ __forceinline__ void issue(long long r0, long long c0, uint16_t* tile, int ld) const {
#pragma unroll
    for (int l = 0; l < kChunksPerThread; ++l) {
      const int chunk = static_cast<int>(threadIdx.x) + l * kWmmaThreads;
      const int r = chunk / kChunksPerRow, c = (chunk % kChunksPerRow) * kChunk;
      const long long gr = r0 + r, gc = c0 + c;
      long long src_r = gr;
      bool row_ok = gr < r_limit;
      if (rows.index != nullptr && row_ok) {
        src_r = rows_fixed ? fixed_src[l] : gathered_row(rows, first + gr);
        row_ok = src_r >= 0;
      }
      const long long valid = row_ok ? c_limit - gc : 0;
      const long long sc = kUnitC ? 1 : stride_c;
      const uint16_t* src = base + (row_ok ? src_r : 0) * stride_r + gc * sc;
      uint16_t* dst = tile + r * ld + c;
      if (vec && valid >= kChunk) {
        cp_async_16(dst, src);
      } else {
        *reinterpret_cast<uint4*>(dst) = load_chunk(src, sc, valid, false);
      }
    }
  }
};

// Writes one lane's 8 consecutive outputs of a row, out[cc] for cc < count:
//   v = alpha * src[cc] (+ bias[cc]) (+ out[cc] when accumulate), rounded to nearest into TY.
// vec: out is 16-byte aligned (so 8 elements are one or two 16-byte words); whole chunks then move
// with vector loads and stores instead of 8 scattered 2- or 4-byte ones.
template <typename TY, typename TB>
__device__ __forceinline__ void store_chunk(TY* out, const float* src, float alpha, const TB* bias,
                                            bool accumulate, int count, bool vec) {
  constexpr int kWords = kChunk * sizeof(TY) / sizeof(uint4);
  static_assert(kChunk * sizeof(TY) % sizeof(uint4) == 0, "whole 16-byte words");
  if (vec && count == kChunk) {
    union {
      uint4 words[kWords];
      TY values[kChunk];
    } chunk;
    if (accumulate) {
#pragma unroll
      for (int w = 0; w < kWords; ++w) chunk.words[w] = reinterpret_cast<const uint4*>(out)[w];
    }
#pragma unroll
    for (int cc = 0; cc < kChunk; ++cc) {
      float v = alpha * src[cc];
      if (bias != nullptr) v += load_as<float>(bias + cc);
      if (accumulate) v = load_as<float>(&chunk.values[cc]) + v;
      chunk.values[cc] = store_as<TY>(v);
    }
#pragma unroll
    for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(out)[w] = chunk.words[w];
    return;
  }
  for (int cc = 0; cc < count; ++cc) {
    float v = alpha * src[cc];
    if (bias != nullptr) v += load_as<float>(bias + cc);
    if (accumulate) v = load_as<float>(out + cc) + v;
    out[cc] = store_as<TY>(v);
  }
}

#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(MOEFORGE_KERNEL_EMULATION)
using AccFragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFrag, kFrag, kFrag, float>;

// The K loop of both kernels: a kStages-deep cp.async pipeline over k_tiles slabs of kWmmaBK,
// slab kt staged by issue_slab(kt) into stage kt % kStages (A tile at the stage's start, B tile
// at b_offset), then this warp's 32 x 64 block of mma_sync into frag. Tile layouts in shared
// memory: A as [m][k] (kAOuterMajor, row_major matrix_a) or [k][m] (col_major); B as [n][k]
// (kBOuterMajor, col_major matrix_b) or [k][n] (row_major). Ends with every copy landed and a
// barrier, so the stages may be reused.
template <typename T, bool kAOuterMajor, bool kBOuterMajor, typename IssueSlab>
__device__ __forceinline__ void mma_pipeline(const uint16_t* stages, int stage_elements,
                                             int b_offset, int lda, int ldb, long long k_tiles,
                                             int warp_m, int warp_n, IssueSlab issue_slab,
                                             AccFragment (&frag)[kFragsM][kFragsN]) {
  namespace wmma = nvcuda::wmma;
  using ALayout = std::conditional_t<kAOuterMajor, wmma::row_major, wmma::col_major>;
  using BLayout = std::conditional_t<kBOuterMajor, wmma::col_major, wmma::row_major>;
  // Element (outer, k) of a staged tile, outer = m (A) or n (B).
  const auto offset = [](bool outer_major, int outer, int k, int ld) {
    return outer_major ? outer * ld + k : k * ld + outer;
  };
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(frag[i][j], 0.0f);
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) issue_slab(s);
    cp_async_commit();  // one group per slab, empty past the end, so the wait count holds
  }
  for (long long kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of slab kt have landed ...
    __syncthreads();  // ... and everyone's; every warp is done with slab kt - 1's stage
    if (kt + kStages - 1 < k_tiles) issue_slab(kt + kStages - 1);  // into slab kt - 1's stage
    cp_async_commit();
    const T* a_tile = reinterpret_cast<const T*>(stages + (kt % kStages) * stage_elements);
    const T* b_tile = a_tile + b_offset;
#pragma unroll 1
    for (int kk = 0; kk < kWmmaBK; kk += kFrag) {
      // All A fragments of the warp, then one B fragment at a time (fewer live registers).
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, ALayout> fa[kFragsM];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        const int m = (warp_m * kFragsM + i) * kFrag;
        wmma::load_matrix_sync(fa[i], a_tile + offset(kAOuterMajor, m, kk, lda), lda);
      }
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, BLayout> fb;
        const int n = (warp_n * kFragsN + j) * kFrag;
        wmma::load_matrix_sync(fb, b_tile + offset(kBOuterMajor, n, kk, ldb), ldb);
#pragma unroll
        for (int i = 0; i < kFragsM; ++i) wmma::mma_sync(frag[i][j], fa[i], fb, frag[i][j]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; the caller's scratch reuses the stages
  __syncthreads();
}

// The epilogue walk of both kernels, one 16x16 fragment at a time through this warp's fp32
// scratch: lane owns row lane / 2, columns (lane % 2) * 8 + [0, 8) of each fragment and gets
// store(r, c0, src) with its tile-relative row and first column and the 8 values at src.
template <typename Store>
__device__ __forceinline__ void for_each_output_chunk(float* scratch, int lane, int warp_m,
                                                      int warp_n,
                                                      AccFragment (&frag)[kFragsM][kFragsN],
                                                      Store store) {
  const int fr = lane / 2, fc = (lane % 2) * kChunk;
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) {
      nvcuda::wmma::store_matrix_sync(scratch, frag[i][j], kLdC, nvcuda::wmma::mem_row_major);
      __syncwarp();
      store((warp_m * kFragsM + i) * kFrag + fr, (warp_n * kFragsN + j) * kFrag + fc,
            scratch + fr * kLdC + fc);
      __syncwarp();
    }
  }
}
#endif

// y[rows of one 128-row tile, n0 : n0 + 128] as described at the top of this file.
// kKMajor: W_e staged as [n][k] (col_major matrix_b), else as [k][n] (row_major matrix_b).
template <typename T, typename TY, bool kKMajor>
__global__ void __launch_bounds__(kWmmaThreads, 2)
    grouped_gemm_wmma_kernel(const GroupedGemmArgs<T, T, TY> args) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(MOEFORGE_KERNEL_EMULATION)
  using acc = float;
  uint16_t* const stages = dynamic_shared_memory<uint16_t>();  // [kStages][kStageElements]
  __shared__ TileInfo info;
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kWarp) {
    find_tile<kWmmaBM>(args.expert_offsets, args.num_experts, args.num_rows, blockIdx.x, tid,
                       &info);
  }
  __syncthreads();
  const TileInfo t = info;
  if (t.group < 0) return;  // surplus CTA (uniform)

  const long long n0 = static_cast<long long>(blockIdx.y) * kWmmaBN;
  const long long rows = t.row_end - t.row0 < kWmmaBM ? t.row_end - t.row0 : kWmmaBM;
  const long long cols = args.n - n0 < kWmmaBN ? args.n - n0 : kWmmaBN;
  TY* __restrict__ y = args.y + t.row0 * args.ldy + n0;
  if (t.group == args.num_experts) {  // dropped rows
    if (args.accumulate) return;
    for (int i = tid; i < kWmmaBM * kWmmaBN; i += kWmmaThreads) {
      const int r = i / kWmmaBN, c = i % kWmmaBN;
      if (r < rows && c < cols) y[r * args.ldy + c] = store_as<TY>(acc(0));
    }
    return;
  }

  const int warp = tid / kWarp, lane = tid % kWarp;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  const long long sk = args.w_stride_k, sn = args.w_stride_n;
  const T* w = args.w + t.group * args.w_stride_e + n0 * sn;
  // x: (r, c) = (row, k). W: (r, c) = (n, k) when k-major, else (k, n).
  ChunkLoader<kWmmaBM, kWmmaBK, true> lx(args.x + t.row0 * args.ldx, args.ldx, 1, rows, args.k);
  if (args.x_rows.index != nullptr) lx.gather(args.x_rows, args.x, t.row0, /*rows_fixed=*/true);
  ChunkLoader<kKMajor ? kWmmaBN : kWmmaBK, kKMajor ? kWmmaBK : kWmmaBN> lw(
      w, kKMajor ? sn : sk, kKMajor ? sk : sn, kKMajor ? cols : args.k, kKMajor ? args.k : cols);
  constexpr int kLdW = kKMajor ? kLdK : kLdN;
  const auto issue_slab = [&](long long kt) {
    uint16_t* stage = stages + (kt % kStages) * kStageElements;
    const long long k0 = kt * kWmmaBK;
    lx.issue(0, k0, stage, kLdK);
    if constexpr (kKMajor) {
      lw.issue(0, k0, stage + kTileAElements, kLdW);
    } else {
      lw.issue(k0, 0, stage + kTileAElements, kLdW);
    }
  };
  AccFragment frag[kFragsM][kFragsN];
  mma_pipeline<T, true, kKMajor>(stages, kStageElements, kTileAElements, kLdK, kLdW,
                                 (args.k + kWmmaBK - 1) / kWmmaBK, warp_m, warp_n, issue_slab,
                                 frag);

  const acc alpha = static_cast<acc>(args.alpha);
  const T* __restrict__ bias =
      args.bias != nullptr ? args.bias + t.group * args.bias_stride_e + n0 : nullptr;
  // Chunk starts (c0 multiple of 8) are 16-byte aligned when y and its row pitch are.
  const bool vec_out =
      args.ldy % kChunk == 0 && reinterpret_cast<uintptr_t>(y) % sizeof(uint4) == 0;
  for_each_output_chunk(
      reinterpret_cast<float*>(stages) + warp * kFrag * kLdC, lane, warp_m, warp_n, frag,
      [&](int r, int c0, const float* src) {
        if (r >= rows || c0 >= cols) return;
        const int count = cols - c0 < kChunk ? static_cast<int>(cols - c0) : kChunk;
        store_chunk(y + r * args.ldy + c0, src, alpha, bias != nullptr ? bias + c0 : bias,
                    args.accumulate, count, vec_out);
      });
#elif defined(__CUDA_ARCH__)
  __trap();  // no WMMA body below sm80: the launcher only runs this kernel on sm80+ devices
#endif
}

// G_e[p0 : p0 + 128, q0 : q0 + 128] = alpha * sum over the rows r of expert e of a[r, :]^T b[r, :]
// (launch_grouped_gemm_wgrad's contract). Grid (q tiles, p tiles, E), like the SIMT kernel: one
// CTA loops over all rows of its expert, so there is no cross-CTA reduction and the order of the
// sums is fixed. The reduction runs over rows: slab kt holds rows [32 kt, 32 kt + 32) of a and b,
// both staged as [row][feature] (ld kLdN), read as a col_major matrix_a (a^T) and a row_major
// matrix_b. Same pipeline, warp grid and epilogue as the forward kernel; the epilogue stores
// through G's strides.
template <typename T>
__global__ void __launch_bounds__(kWmmaThreads, 2)
    grouped_gemm_wgrad_wmma_kernel(const GroupedGemmWgradArgs<T, T, T> args) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(MOEFORGE_KERNEL_EMULATION)
  using acc = float;
  uint16_t* const stages = dynamic_shared_memory<uint16_t>();  // [kStages][kWgradStageElements]
  const int tid = static_cast<int>(threadIdx.x);
  const long long e = blockIdx.z;
  long long begin, end;
  cta_expert_rows(args.expert_offsets, e, args.num_rows, &begin, &end);
  const long long rows = end - begin;
  const long long p0 = static_cast<long long>(blockIdx.y) * kWmmaBM;
  const long long q0 = static_cast<long long>(blockIdx.x) * kWmmaBN;
  const long long p_valid = args.p - p0 < kWmmaBM ? args.p - p0 : kWmmaBM;
  const long long q_valid = args.q - q0 < kWmmaBN ? args.q - q0 : kWmmaBN;

  const int warp = tid / kWarp, lane = tid % kWarp;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  // (r, c) = (row of the expert, feature) for both operands.
  ChunkLoader<kWmmaBK, kWmmaBM, true> la(args.a + begin * args.lda + p0, args.lda, 1, rows,
                                         p_valid);
  ChunkLoader<kWmmaBK, kWmmaBN, true> lb(args.b + begin * args.ldb + q0, args.ldb, 1, rows,
                                         q_valid);
  if (args.a_rows.index != nullptr) la.gather(args.a_rows, args.a + p0, begin, false);
  if (args.b_rows.index != nullptr) lb.gather(args.b_rows, args.b + q0, begin, false);
  const auto issue_slab = [&](long long kt) {
    uint16_t* stage = stages + (kt % kStages) * kWgradStageElements;
    la.issue(kt * kWmmaBK, 0, stage, kLdN);
    lb.issue(kt * kWmmaBK, 0, stage + kWgradTileElements, kLdN);
  };
  AccFragment frag[kFragsM][kFragsN];
  mma_pipeline<T, false, false>(stages, kWgradStageElements, kWgradTileElements, kLdN, kLdN,
                                (rows + kWmmaBK - 1) / kWmmaBK, warp_m, warp_n, issue_slab, frag);

  const acc alpha = static_cast<acc>(args.alpha);
  T* __restrict__ g = args.g + e * args.g_stride_e + p0 * args.g_stride_p + q0 * args.g_stride_q;
  // G rows contiguous along q ([E, p, q] with unit q stride) take 16-byte stores.
  const bool unit_q = args.g_stride_q == 1;
  const bool vec_out = unit_q && args.g_stride_p % kChunk == 0 &&
                       reinterpret_cast<uintptr_t>(g) % sizeof(uint4) == 0;
  for_each_output_chunk(
      reinterpret_cast<float*>(stages) + warp * kFrag * kLdC, lane, warp_m, warp_n, frag,
      [&](int r, int c0, const float* src) {
        if (r >= p_valid || c0 >= q_valid) return;
        const int count = q_valid - c0 < kChunk ? static_cast<int>(q_valid - c0) : kChunk;
        if (unit_q) {
          store_chunk(g + r * args.g_stride_p + c0, src, alpha, static_cast<const T*>(nullptr),
                      false, count, vec_out);
        } else {
          for (int cc = 0; cc < count; ++cc) {
            g[r * args.g_stride_p + (c0 + cc) * args.g_stride_q] = store_as<T>(alpha * src[cc]);
          }
        }
      });
#elif defined(__CUDA_ARCH__)
  __trap();  // no WMMA body below sm80: the launcher only runs this kernel on sm80+ devices
#endif
}

}  // namespace

template <typename T, typename TY>
cudaError_t launch_grouped_gemm_wmma(const GroupedGemmArgs<T, T, TY>& args, cudaStream_t stream) {
  const int64_t n_tiles = (args.n + kWmmaBN - 1) / kWmmaBN;
  const int64_t groups =
      args.num_experts + 1 < args.num_rows ? args.num_experts + 1 : args.num_rows;
  const int64_t m_tiles = (args.num_rows + kWmmaBM - 1) / kWmmaBM + groups;
  if (n_tiles > kMaxGridYZ || m_tiles > std::numeric_limits<int32_t>::max()) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  const auto kernel = llabs(args.w_stride_k) <= llabs(args.w_stride_n)
                          ? grouped_gemm_wmma_kernel<T, TY, true>
                          : grouped_gemm_wmma_kernel<T, TY, false>;
  MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kWmmaSmemBytes)));
  MOEFORGE_CUDA_CHECK(launch_kernel(kernel, grid, kWmmaThreads, kWmmaSmemBytes, stream, args));
  return cudaSuccess;
}

cudaError_t wmma_supported(bool* supported) {
  *supported = false;
  int device = 0, major = 0;
  MOEFORGE_CUDA_CHECK(cudaGetDevice(&device));
  MOEFORGE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) return cudaSuccess;
  // Every WMMA kernel of this file is built from the same architecture list: one stands for all.
  cudaFuncAttributes attributes{};
  MOEFORGE_CUDA_CHECK(
      cudaFuncGetAttributes(&attributes, grouped_gemm_wmma_kernel<__half, __half, true>));
  *supported = attributes.ptxVersion >= 80;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_grouped_gemm_wgrad_wmma(const GroupedGemmWgradArgs<T, T, T>& args,
                                           cudaStream_t stream) {
  const int64_t p_tiles = (args.p + kWmmaBM - 1) / kWmmaBM;
  const int64_t q_tiles = (args.q + kWmmaBN - 1) / kWmmaBN;
  if (p_tiles > kMaxGridYZ || args.num_experts > kMaxGridYZ ||
      q_tiles > std::numeric_limits<int32_t>::max()) {
    return cudaErrorInvalidValue;
  }
  const auto kernel = grouped_gemm_wgrad_wmma_kernel<T>;
  MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kWgradSmemBytes)));
  const dim3 grid(static_cast<unsigned>(q_tiles), static_cast<unsigned>(p_tiles),
                  static_cast<unsigned>(args.num_experts));
  MOEFORGE_CUDA_CHECK(launch_kernel(kernel, grid, kWmmaThreads, kWgradSmemBytes, stream, args));
  return cudaSuccess;
}

template cudaError_t launch_grouped_gemm_wgrad_wmma<__half>(
    const GroupedGemmWgradArgs<__half, __half, __half>&, cudaStream_t);
template cudaError_t launch_grouped_gemm_wgrad_wmma<__nv_bfloat16>(
    const GroupedGemmWgradArgs<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>&, cudaStream_t);

template cudaError_t launch_grouped_gemm_wmma<__half, __half>(
    const GroupedGemmArgs<__half, __half, __half>&, cudaStream_t);
template cudaError_t launch_grouped_gemm_wmma<__half, float>(
    const GroupedGemmArgs<__half, __half, float>&, cudaStream_t);
template cudaError_t launch_grouped_gemm_wmma<__nv_bfloat16, __nv_bfloat16>(
    const GroupedGemmArgs<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_grouped_gemm_wmma<__nv_bfloat16, float>(
    const GroupedGemmArgs<__nv_bfloat16, __nv_bfloat16, float>&, cudaStream_t);

}  // namespace moeforge::kernels::grouped_gemm_detail
