// Kernel templates of the grouped GEMM engine (contract: moeforge/kernels/grouped_gemm.h).
// Included only by kernels/grouped_gemm*.cu, each of which instantiates the launchers for one
// element type (so that a 2-core machine compiles them in parallel).
//
// This milestone is a shared-memory-tiled SIMT engine, correct for every size and layout:
//   CTA tile 64 (rows / p) x 64 (n / q), reduction slab 32, 256 threads; thread (tx, ty) =
//   (tid % 16, tid / 16) owns outputs (ty + 16 i, tx + 16 j), i, j < 4, accumulated in registers
//   in acc_t. Operand tiles are stored k-major in shared memory (tile[k][m]), converted to acc_t
//   on the way in, with one column of padding so the transposing stores are bank-conflict free;
//   the next slab is fetched into registers while the current one is multiplied. Global loads
//   walk the operand's contiguous dimension (chosen at run time from the strides) for
//   coalescing; edges are predicated and zero-filled, so no size needs to be a tile multiple.
// The tensor-core path of launch_grouped_gemm (WMMA, kernels/grouped_gemm_wmma.cu) plugs in behind
// the same launcher: it reuses find_tile (the sync-free work mapping, with its own tile height)
// and the epilogue semantics, and the launcher picks it when the caller asks for
// GroupedGemmEngine::kWmma and the types and device allow (see launch_grouped_gemm_impl).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "grouped_gemm_wmma.h"
#include "launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm.h"
#include "moeforge/kernels/numeric.h"

namespace moeforge::kernels::grouped_gemm_detail {

constexpr int kTileM = 64;  // rows (launch_grouped_gemm) or p (wgrad) per CTA
constexpr int kTileN = 64;  // n or q per CTA
constexpr int kTileK = 32;  // reduction slab: k, or rows of one expert (wgrad)
constexpr int kThreads = 256;
constexpr int kThreadsX = 16;                    // tx: output columns tx + 16 j
constexpr int kThreadsY = kThreads / kThreadsX;  // ty: output rows ty + 16 i
constexpr int kFragM = kTileM / kThreadsY;       // 4 outputs per thread along m
constexpr int kFragN = kTileN / kThreadsX;       // 4 outputs per thread along n
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kTileM == kTileN, "TileLoader serves both operands with one shape");
static_assert(kTileK == kWarp, "k-fast loads map one warp to one slab row");
static_assert(kTileM * kTileK % kThreads == 0, "whole loads per thread");
constexpr int kLoadsPerThread = kTileM * kTileK / kThreads;  // 8

// The maximum grid.y / grid.z.
constexpr int64_t kMaxGridYZ = 65535;

// Arithmetic type of a combination of operands: double when any is double, else float.
template <typename... T>
using acc_t = std::conditional_t<(std::is_same_v<T, double> || ...), double, float>;

// Element <-> arithmetic type, through the shared conversions of numeric.h (round to nearest
// even into the half types).
template <typename acc, typename T>
__device__ __forceinline__ acc load_as(const T* p) {
  return static_cast<acc>(to_acc(*p));
}
template <typename T, typename acc>
__device__ __forceinline__ T store_as(acc v) {
  return from_acc<T>(static_cast<acc_type_t<T>>(v));
}

// ---- sync-free work mapping over device offsets -----------------------------------------------
__device__ __forceinline__ long long warp_inclusive_max(long long v, int lane) {
#pragma unroll
  for (int d = 1; d < kWarp; d *= 2) {
    const long long other = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v = v > other ? v : other;
  }
  return v;
}

__device__ __forceinline__ long long warp_inclusive_sum(long long v, int lane) {
#pragma unroll
  for (int d = 1; d < kWarp; d *= 2) {
    const long long other = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += other;
  }
  return v;
}

__device__ __forceinline__ long long warp_max(long long v) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) {
    const long long other = __shfl_xor_sync(kFullMask, v, d);
    v = v > other ? v : other;
  }
  return v;
}

// Source row of operand row r under the gather g (grouped_gemm.h, RowGather): r itself without a
// gather, else index[r] / divisor, or -1 (a row of zeros) when that is outside [0, limit).
__device__ __forceinline__ long long gathered_row(const RowGather& g, long long r) {
  if (g.index == nullptr) return r;
  const int32_t v = g.index[r];
  if (v < 0) return -1;
  // 0 <= v < 2^31 and 1 <= divisor < 2^31 (gather_ok): a 32-bit unsigned division, far cheaper
  // than a 64-bit one.
  const long long src = static_cast<uint32_t>(v) / static_cast<uint32_t>(g.divisor);
  return src < g.limit ? src : -1;
}

// A gather's arguments are usable (no gather, or 1 <= divisor < 2^31 and limit >= 0).
inline bool gather_ok(const RowGather& g) {
  return g.index == nullptr || (g.divisor >= 1 && g.divisor <= 0x7fffffff && g.limit >= 0);
}

// Rows [m(e), m(e+1)) of expert e (the clamped, non-decreasing reading of the offsets described
// in grouped_gemm.h). Warp-collective: all 32 lanes call it; every lane gets the result.
// O(e / 32) loads per lane.
__device__ __forceinline__ void expert_rows(const int32_t* __restrict__ offsets, long long e,
                                            long long num_rows, int lane, long long* begin,
                                            long long* end) {
  long long max_begin = 0, max_end = 0;  // 0: the clamp from below
  for (long long j = 1 + lane; j <= e + 1; j += kWarp) {
    const long long v = offsets[j];
    if (j <= e && v > max_begin) max_begin = v;
    if (v > max_end) max_end = v;
  }
  max_begin = warp_max(max_begin);
  max_end = warp_max(max_end);
  *begin = max_begin < num_rows ? max_begin : num_rows;
  *end = max_end < num_rows ? max_end : num_rows;
}

// expert_rows for a whole CTA: the first warp (linear thread index < 32) reads the offsets, then
// one barrier; every thread gets [*begin, *end). Called by every thread of the CTA.
__device__ __forceinline__ void cta_expert_rows(const int32_t* __restrict__ offsets, long long e,
                                                long long num_rows, long long* begin,
                                                long long* end) {
  __shared__ long long range[2];
  const int tid = static_cast<int>(threadIdx.x + threadIdx.y * blockDim.x);
  if (tid < kWarp) {
    long long b, en;
    expert_rows(offsets, e, num_rows, tid, &b, &en);
    if (tid == 0) {
      range[0] = b;
      range[1] = en;
    }
  }
  __syncthreads();
  *begin = range[0];
  *end = range[1];
}

struct TileInfo {
  long long group;    // expert, num_experts for the dropped tail, -1 for a surplus CTA
  long long row0;     // first row of this tile
  long long row_end;  // end of the group's rows (tile: [row0, min(row0 + TileM, row_end)))
};

// Maps the linear M-tile id `tile` to its group and rows without any host involvement. Groups
// are the experts 0..E-1, each cut into ceil(rows / TileM) tiles, then group E: the dropped rows
// [m(E), S). Their total is at most ceil(S / TileM) + min(E + 1, S), the grid's x extent; CTAs
// past the total are surplus and get group -1. (TileM: kTileM for the SIMT kernels, the WMMA
// kernel's own tile height for it.) Warp-collective (lanes scan 32 groups at a time:
// running max of the clamped offsets, then a prefix sum of the tile counts); lane 0 writes *info.
// O(E / 32) steps of a few shuffles per CTA.
template <int TileM = kTileM>
__device__ __forceinline__ void find_tile(const int32_t* __restrict__ offsets,
                                          long long num_experts, long long num_rows, long long tile,
                                          int lane, TileInfo* info) {
  long long carry_end = 0;    // m(first group of this chunk)
  long long carry_tiles = 0;  // tiles of all earlier groups
  for (long long base = 0; base <= num_experts; base += kWarp) {
    const long long g = base + lane;
    long long end = num_rows;  // the tail group (and lanes past it) end at S
    if (g < num_experts) {
      const long long v = offsets[g + 1];
      end = v < num_rows ? v : num_rows;
    }
    if (end < carry_end) end = carry_end;  // also clamps negative offsets up to >= 0
    end = warp_inclusive_max(end, lane);
    long long begin = __shfl_up_sync(kFullMask, end, 1);
    if (lane == 0) begin = carry_end;
    const long long tiles = (end - begin + TileM - 1) / TileM;
    const long long inclusive = warp_inclusive_sum(tiles, lane) + carry_tiles;
    const unsigned hit = __ballot_sync(kFullMask, tile < inclusive);
    if (hit != 0) {
      if (lane == __ffs(hit) - 1) {
        info->group = g;
        info->row0 = begin + (tile - (inclusive - tiles)) * TileM;
        info->row_end = end;
      }
      return;
    }
    carry_end = __shfl_sync(kFullMask, end, kWarp - 1);
    carry_tiles = __shfl_sync(kFullMask, inclusive, kWarp - 1);
  }
  if (lane == 0) info->group = -1;
}

// ---- operand tiles ----------------------------------------------------------------------------
template <typename acc>
struct SmemTiles {
  acc a[kTileK][kTileM + 1];  // a[k][m]
  acc b[kTileK][kTileN + 1];  // b[k][n]
};

// One 64 x 32 operand tile, element (mn, k) at base[mn * stride_mn + k * stride_k] for
// mn < mn_limit and k < k_limit (zero outside). fetch(k0) loads slab [k0, k0 + 32) into
// registers, store() writes them k-major into shared memory. With k_fast the lanes of a warp walk
// k (for operands contiguous along k), else mn; either way load l of this thread is element
// (mn0 + l * dmn, k0 + kt + l * dk), at ptr + k0 * stride_k + l * step.
//
// Optionally (gather()) the rows of the operand - its mn index (x of the forward GEMM) or its k
// index (the rows of a weight-gradient operand) - go through a RowGather: element (mn, k) is then
// read at origin + src * stride_mn + k * stride_k (or mn * stride_mn + src * stride_k) with
// src = gathered_row(g, first + mn (or k)), and as zero where src < 0. (Resolved per slab: caching
// the 8 source rows of the mn case costs this kernel its last registers and spills.)
template <typename T, typename acc>
struct TileLoader {
  const T* ptr;  // this thread's first element at k0 = 0
  long long step, stride_k, mn_limit, k_limit;
  int mn0, dmn, kt, dk;
  acc regs[kLoadsPerThread];
  // gather state (g.index == nullptr: none)
  RowGather g;
  const T* origin = nullptr;
  long long stride_mn = 0, first = 0;
  bool gather_mn = false;

  __device__ __forceinline__ TileLoader(const T* base, long long stride_mn_, long long stride_k_,
                                        long long mn_limit_, long long k_limit_, bool k_fast)
      : stride_k(stride_k_), mn_limit(mn_limit_), k_limit(k_limit_) {
    const int tid = static_cast<int>(threadIdx.x);
    if (k_fast) {
      mn0 = tid / kTileK, dmn = kThreads / kTileK, kt = tid % kTileK, dk = 0;
    } else {
      mn0 = tid % kTileM, dmn = 0, kt = tid / kTileM, dk = kThreads / kTileM;
    }
    ptr = base + mn0 * stride_mn_ + kt * stride_k;
    step = dmn * stride_mn_ + dk * stride_k;
    stride_mn = stride_mn_;
  }

  // Reads the operand's rows through `gather`: origin is the operand's element (0, 0) before the
  // gather, first the operand row of this tile's mn = 0 (along_mn) or k = 0.
  __device__ __forceinline__ void gather(const RowGather& gather_, const T* origin_,
                                         long long first_, bool along_mn) {
    g = gather_;
    origin = origin_;
    first = first_;
    gather_mn = along_mn;
  }

  __device__ __forceinline__ void fetch(long long k0) {
    if (g.index != nullptr) {
      fetch_gathered(k0);
      return;
    }
    const T* p = ptr + k0 * stride_k;
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const bool ok = mn0 + l * dmn < mn_limit && k0 + kt + l * dk < k_limit;
      regs[l] = ok ? load_as<acc>(p + l * step) : acc(0);
    }
  }

  __device__ __forceinline__ void fetch_gathered(long long k0) {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      long long mn = mn0 + l * dmn, k = k0 + kt + l * dk;
      bool ok = mn < mn_limit && k < k_limit;
      if (ok) {
        const long long src = gathered_row(g, first + (gather_mn ? mn : k));
        ok = src >= 0;
        mn = gather_mn ? src : mn;
        k = gather_mn ? k : src;
      }
      regs[l] = ok ? load_as<acc>(origin + mn * stride_mn + k * stride_k) : acc(0);
    }
  }

  __device__ __forceinline__ void store(acc (*tile)[kTileM + 1]) const {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) tile[kt + l * dk][mn0 + l * dmn] = regs[l];
  }
};

// acc_frag[i][j] += sum_k A[k][ty + 16 i] * B[k][tx + 16 j] over k in [0, k_len), slab by slab,
// with the next slab's global loads in flight during the current slab's FMAs. Block-collective.
template <typename acc, typename TA, typename TB>
__device__ __forceinline__ void mainloop(SmemTiles<acc>& smem, TileLoader<TA, acc>& la,
                                         TileLoader<TB, acc>& lb, long long k_len,
                                         acc (&frag)[kFragM][kFragN]) {
  const int tx = static_cast<int>(threadIdx.x) % kThreadsX;
  const int ty = static_cast<int>(threadIdx.x) / kThreadsX;
  if (k_len <= 0) return;
  la.fetch(0);
  lb.fetch(0);
  for (long long k0 = 0; k0 < k_len; k0 += kTileK) {
    la.store(smem.a);
    lb.store(smem.b);
    __syncthreads();
    if (k0 + kTileK < k_len) {
      la.fetch(k0 + kTileK);
      lb.fetch(k0 + kTileK);
    }
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      acc a[kFragM], b[kFragN];
#pragma unroll
      for (int i = 0; i < kFragM; ++i) a[i] = smem.a[k][ty + kThreadsY * i];
#pragma unroll
      for (int j = 0; j < kFragN; ++j) b[j] = smem.b[k][tx + kThreadsX * j];
#pragma unroll
      for (int i = 0; i < kFragM; ++i) {
#pragma unroll
        for (int j = 0; j < kFragN; ++j) frag[i][j] += a[i] * b[j];  // contracted to FMA
      }
    }
    __syncthreads();
  }
}

// ---- launch_grouped_gemm ----------------------------------------------------------------------
// Row-grouped GEMM. Grid (ceil(S/64) + min(E+1, S), ceil(n/64)): blockIdx.x is a linear M-tile id
// mapped to (expert, 64-row tile) by find_tile from the device offsets; blockIdx.y the n tile.
// Expert tiles compute y[r, n0:n0+64] = alpha * x[r, :] W_e[:, n0:n0+64] (+ bias) (+ y) for
// their <= 64 rows; the tail group's tiles write zeros (nothing when accumulating); surplus CTAs
// exit. O(rows * k * n) FMAs; each output element is written by one thread (deterministic).
template <typename TX, typename TW, typename TY>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_kernel(const GroupedGemmArgs<TX, TW, TY> args) {
  using acc = acc_t<TX, TW, TY>;
  __shared__ SmemTiles<acc> smem;
  __shared__ TileInfo info;
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kWarp) {
    find_tile(args.expert_offsets, args.num_experts, args.num_rows, blockIdx.x, tid, &info);
  }
  __syncthreads();
  const TileInfo t = info;
  if (t.group < 0) return;  // surplus CTA (uniform)

  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  const long long n0 = static_cast<long long>(blockIdx.y) * kTileN;
  const long long rows = t.row_end - t.row0 < kTileM ? t.row_end - t.row0 : kTileM;
  TY* __restrict__ y = args.y + t.row0 * args.ldy + n0;
  if (t.group == args.num_experts) {  // dropped rows
    if (args.accumulate) return;
#pragma unroll
    for (int i = 0; i < kFragM; ++i) {
      const int r = ty + kThreadsY * i;
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        const int c = tx + kThreadsX * j;
        if (r < rows && n0 + c < args.n) y[r * args.ldy + c] = store_as<TY>(acc(0));
      }
    }
    return;
  }

  const long long sk = args.w_stride_k, sn = args.w_stride_n;
  TileLoader<TX, acc> lx(args.x + t.row0 * args.ldx, args.ldx, 1, rows, args.k, true);
  if (args.x_rows.index != nullptr) lx.gather(args.x_rows, args.x, t.row0, /*along_mn=*/true);
  TileLoader<TW, acc> lw(args.w + t.group * args.w_stride_e + n0 * sn, sn, sk, args.n - n0, args.k,
                         llabs(sk) <= llabs(sn));
  acc frag[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragN; ++j) frag[i][j] = acc(0);
  }
  mainloop(smem, lx, lw, args.k, frag);

  const acc alpha = static_cast<acc>(args.alpha);
  const TW* __restrict__ bias =
      args.bias != nullptr ? args.bias + t.group * args.bias_stride_e + n0 : nullptr;
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
    const int r = ty + kThreadsY * i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      const int c = tx + kThreadsX * j;
      if (n0 + c >= args.n) continue;
      acc v = alpha * frag[i][j];
      if (bias != nullptr) v += load_as<acc>(bias + c);
      TY* out = y + r * args.ldy + c;
      if (args.accumulate) v = load_as<acc>(out) + v;
      *out = store_as<TY>(v);
    }
  }
}

template <typename TX, typename TW, typename TY>
cudaError_t launch_grouped_gemm_impl(const GroupedGemmArgs<TX, TW, TY>& args, cudaStream_t stream) {
  if (args.num_rows < 0 || args.k < 0 || args.n < 0 || args.num_experts < 0) {
    return cudaErrorInvalidValue;
  }
  if (args.num_rows == 0 || args.n == 0) return cudaSuccess;  // empty output
  if (args.y == nullptr || args.expert_offsets == nullptr || !gather_ok(args.x_rows)) {
    return cudaErrorInvalidValue;
  }
  if (args.k > 0 && args.num_experts > 0 && (args.x == nullptr || args.w == nullptr)) {
    return cudaErrorInvalidValue;  // (x and w are only read for k > 0 and E > 0)
  }
  const int64_t n_tiles = (args.n + kTileN - 1) / kTileN;
  const int64_t groups =
      args.num_experts + 1 < args.num_rows ? args.num_experts + 1 : args.num_rows;
  const int64_t m_tiles = (args.num_rows + kTileM - 1) / kTileM + groups;
  if (n_tiles > kMaxGridYZ || m_tiles > std::numeric_limits<int32_t>::max()) {
    return cudaErrorInvalidValue;
  }
  // Tensor-core path (kernels/grouped_gemm_wmma.cu): same find_tile mapping (128-row tiles) and
  // epilogue, on request, for the types it covers, on sm80+; every other case keeps this kernel.
  if constexpr (kWmmaTypes<TX, TW, TY>) {
    if (args.engine == GroupedGemmEngine::kWmma) {
      bool tensor_cores = false;
      MOEFORGE_CUDA_CHECK(wmma_supported(&tensor_cores));
      if (tensor_cores) return launch_grouped_gemm_wmma(args, stream);
    }
  }
  MOEFORGE_CUDA_CHECK(
      launch_kernel(grouped_gemm_kernel<TX, TW, TY>,
                    dim3(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles)), kThreads,
                    0, stream, args));
  return cudaSuccess;
}

// ---- launch_grouped_gemm_wgrad ----------------------------------------------------------------
// Weight-gradient grouped GEMM. Grid (ceil(q/64), ceil(p/64), E): one CTA per (expert, p tile,
// q tile) loops over all rows of its expert in slabs of 32 (expert_rows from the device
// offsets), so there is no cross-CTA reduction: no atomics, a fixed summation order per output
// element, bitwise reproducible. Experts without rows write zeros. O(rows * p * q) FMAs.
// (Load balance follows the per-expert row counts; a split over rows with a fixed-order second
// stage can be added behind the same launcher when few, large experts leave SMs idle.)
template <typename TA, typename TB, typename TG>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_wgrad_kernel(const GroupedGemmWgradArgs<TA, TB, TG> args) {
  using acc = acc_t<TA, TB, TG>;
  __shared__ SmemTiles<acc> smem;
  const int tid = static_cast<int>(threadIdx.x);
  const long long e = blockIdx.z;
  long long begin, end;
  cta_expert_rows(args.expert_offsets, e, args.num_rows, &begin, &end);
  const long long rows = end - begin;
  const long long p0 = static_cast<long long>(blockIdx.y) * kTileM;
  const long long q0 = static_cast<long long>(blockIdx.x) * kTileN;

  TileLoader<TA, acc> la(args.a + begin * args.lda + p0, 1, args.lda, args.p - p0, rows, false);
  TileLoader<TB, acc> lb(args.b + begin * args.ldb + q0, 1, args.ldb, args.q - q0, rows, false);
  if (args.a_rows.index != nullptr) la.gather(args.a_rows, args.a + p0, begin, /*along_mn=*/false);
  if (args.b_rows.index != nullptr) lb.gather(args.b_rows, args.b + q0, begin, /*along_mn=*/false);
  acc frag[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragN; ++j) frag[i][j] = acc(0);
  }
  mainloop(smem, la, lb, rows, frag);

  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  const acc alpha = static_cast<acc>(args.alpha);
  TG* __restrict__ g = args.g + e * args.g_stride_e + p0 * args.g_stride_p + q0 * args.g_stride_q;
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
    const int r = ty + kThreadsY * i;
    if (p0 + r >= args.p) continue;
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      const int c = tx + kThreadsX * j;
      if (q0 + c >= args.q) continue;
      g[r * args.g_stride_p + c * args.g_stride_q] = store_as<TG>(alpha * frag[i][j]);
    }
  }
}

template <typename TA, typename TB, typename TG>
cudaError_t launch_grouped_gemm_wgrad_impl(const GroupedGemmWgradArgs<TA, TB, TG>& args,
                                           cudaStream_t stream) {
  if (args.num_rows < 0 || args.p < 0 || args.q < 0 || args.num_experts < 0) {
    return cudaErrorInvalidValue;
  }
  if (args.num_experts == 0 || args.p == 0 || args.q == 0) return cudaSuccess;  // empty output
  if (args.g == nullptr || args.expert_offsets == nullptr || !gather_ok(args.a_rows) ||
      !gather_ok(args.b_rows)) {
    return cudaErrorInvalidValue;
  }
  if (args.num_rows > 0 && (args.a == nullptr || args.b == nullptr)) return cudaErrorInvalidValue;
  const int64_t p_tiles = (args.p + kTileM - 1) / kTileM;
  const int64_t q_tiles = (args.q + kTileN - 1) / kTileN;
  if (p_tiles > kMaxGridYZ || args.num_experts > kMaxGridYZ ||
      q_tiles > std::numeric_limits<int32_t>::max()) {
    return cudaErrorInvalidValue;
  }
  // Tensor-core path (kernels/grouped_gemm_wmma.cu): 128 x 128 tiles of G_e, the same per-expert
  // row loop, on request, for the types it covers, on sm80+; every other case keeps this kernel.
  if constexpr (kWmmaWgradTypes<TA, TB, TG>) {
    if (args.engine == GroupedGemmEngine::kWmma) {
      bool tensor_cores = false;
      MOEFORGE_CUDA_CHECK(wmma_supported(&tensor_cores));
      if (tensor_cores) return launch_grouped_gemm_wgrad_wmma(args, stream);
    }
  }
  MOEFORGE_CUDA_CHECK(
      launch_kernel(grouped_gemm_wgrad_kernel<TA, TB, TG>,
                    dim3(static_cast<unsigned>(q_tiles), static_cast<unsigned>(p_tiles),
                         static_cast<unsigned>(args.num_experts)),
                    kThreads, 0, stream, args));
  return cudaSuccess;
}

// ---- launch_grouped_row_sum -------------------------------------------------------------------
// Per-expert column sums (bias gradient). Grid (ceil(q/32), E), block (32, 8): thread (c, s) sums
// rows begin + s, begin + s + 8, ... of column c; the 8 partial sums are then added in order of
// s by the s = 0 thread. Fixed order, no atomics. O(rows * q) loads, coalesced along q.
constexpr int kSumCols = 32, kSumSlices = 8;

template <typename T>
__global__ void __launch_bounds__(kSumCols* kSumSlices)
    grouped_row_sum_kernel(const T* __restrict__ b, int64_t ldb,
                           const int32_t* __restrict__ offsets, T* __restrict__ out,
                           int64_t out_stride_e, int64_t num_rows, int64_t q) {
  using acc = acc_t<T>;
  __shared__ acc partial[kSumSlices][kSumCols];
  const int c = static_cast<int>(threadIdx.x), s = static_cast<int>(threadIdx.y);
  const long long e = blockIdx.y;
  long long begin, end;
  cta_expert_rows(offsets, e, num_rows, &begin, &end);
  const long long col = static_cast<long long>(blockIdx.x) * kSumCols + c;
  acc sum = acc(0);
  if (col < q) {
    for (long long r = begin + s; r < end; r += kSumSlices) sum += load_as<acc>(b + r * ldb + col);
  }
  partial[s][c] = sum;
  __syncthreads();
  if (s == 0 && col < q) {
    acc total = partial[0][c];
#pragma unroll
    for (int i = 1; i < kSumSlices; ++i) total += partial[i][c];
    out[e * out_stride_e + col] = store_as<T>(total);
  }
}

template <typename T>
cudaError_t launch_grouped_row_sum_impl(const T* b, int64_t ldb, const int32_t* expert_offsets,
                                        T* out, int64_t out_stride_e, int64_t num_rows, int64_t q,
                                        int64_t num_experts, cudaStream_t stream) {
  if (num_rows < 0 || q < 0 || num_experts < 0) return cudaErrorInvalidValue;
  if (num_experts == 0 || q == 0) return cudaSuccess;  // empty output
  if (out == nullptr || expert_offsets == nullptr || (num_rows > 0 && b == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t col_blocks = (q + kSumCols - 1) / kSumCols;
  if (num_experts > kMaxGridYZ || col_blocks > std::numeric_limits<int32_t>::max()) {
    return cudaErrorInvalidValue;
  }
  MOEFORGE_CUDA_CHECK(
      launch_kernel(grouped_row_sum_kernel<T>,
                    dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(num_experts)),
                    dim3(kSumCols, kSumSlices), 0, stream, b, ldb, expert_offsets, out,
                    out_stride_e, num_rows, q));
  return cudaSuccess;
}

}  // namespace moeforge::kernels::grouped_gemm_detail

namespace moeforge::kernels {

template <typename TX, typename TW, typename TY>
cudaError_t launch_grouped_gemm(const GroupedGemmArgs<TX, TW, TY>& args, cudaStream_t stream) {
  return grouped_gemm_detail::launch_grouped_gemm_impl(args, stream);
}

template <typename TA, typename TB, typename TG>
cudaError_t launch_grouped_gemm_wgrad(const GroupedGemmWgradArgs<TA, TB, TG>& args,
                                      cudaStream_t stream) {
  return grouped_gemm_detail::launch_grouped_gemm_wgrad_impl(args, stream);
}

template <typename T>
cudaError_t launch_grouped_row_sum(const T* b, int64_t ldb, const int32_t* expert_offsets, T* out,
                                   int64_t out_stride_e, int64_t num_rows, int64_t q,
                                   int64_t num_experts, cudaStream_t stream) {
  return grouped_gemm_detail::launch_grouped_row_sum_impl(b, ldb, expert_offsets, out, out_stride_e,
                                                          num_rows, q, num_experts, stream);
}

}  // namespace moeforge::kernels

// Explicit instantiations, one line per combination of element types (in kernels/grouped_gemm*.cu,
// at global scope).
#define MOEFORGE_INSTANTIATE_GROUPED_GEMM(TX, TW, TY)                      \
  template cudaError_t moeforge::kernels::launch_grouped_gemm<TX, TW, TY>( \
      const moeforge::kernels::GroupedGemmArgs<TX, TW, TY>&, cudaStream_t);
#define MOEFORGE_INSTANTIATE_GROUPED_GEMM_WGRAD(TA, TB, TG)                      \
  template cudaError_t moeforge::kernels::launch_grouped_gemm_wgrad<TA, TB, TG>( \
      const moeforge::kernels::GroupedGemmWgradArgs<TA, TB, TG>&, cudaStream_t);
#define MOEFORGE_INSTANTIATE_GROUPED_ROW_SUM(T)                      \
  template cudaError_t moeforge::kernels::launch_grouped_row_sum<T>( \
      const T*, int64_t, const int32_t*, T*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
