// The row-grouped GEMM of the opt-in MOEFORGE_GROUPED_GEMM=sm90 engine (csrc/cuda/
// grouped_mm_sm90.cpp) on Hopper's warpgroup MMA (wgmma, sm_90a): stages S1-S4 of
// docs/hopper-gemm-plan.md. Not yet run on a GPU: tests/cpp/test_grouped_gemm_sm90.cpp checks
// it on the host kernel emulator, and first on a GPU the shared-memory layout, the descriptors
// and the accumulator map before the fused epilogues.
//
//   y[r, :] = x[src(r), :] W_e^T   for the rows r of expert e, m(e) <= r < m(e + 1)
//
// src(r) = r (x in expert order, [num_rows, k]) or, with the routing plan's sorted_pairs, the token
// sorted_pairs[r] / top_k of a token-major x [num_tokens, k] — the permute fused into the A load;
// a pair outside [0, num_tokens * top_k) reads a zero row (permute's rule for a corrupt plan).
//
// x [num_rows, k] and y [num_rows, n] row-major with leading dimensions ldx / ldy; w [E, n, k]
// (HF's K-major layout: w + e * w_stride_e + j * ldw is row j of W_e) or, with w_mn_major,
// [E, k, n] (w + e * w_stride_e + q * ldw is column q of W_e, i.e. W_e^T row-major); bfloat16 in
// and out, fp32 accumulation. m(0..E): the offsets clamped into [0, num_rows] and made
// non-decreasing (expert_bounds.cuh), read on the device — no host synchronisation, CUDA-graph
// capturable. Rows of no expert (r >= m(E)) are not written. Deterministic: each element comes from
// one CTA's fixed sequence of wgmma steps.
//
// SwiGLU in the epilogue (stage S2, when `a` is given): W_e is HF's gate_up_proj [2I, k] (gate
// rows [0, I), up rows [I, 2I), n = 2I), y receives h [num_rows, 2I] and a [num_rows, I] gets
// silu(h_gate) * h_up computed from the rounded h exactly as launch_swiglu computes it
// (swiglu_math.h), so a is bitwise the swiglu of y. A tile then covers 64 intermediate columns:
// its B tile is 64 gate rows and the 64 matching up rows, so each thread holds both halves of
// every pair it writes.
//
// LoRA's up-projection in the epilogue (stage S4, when lora_u is given): for each routed row r
// of expert e the stored result (y, or h with SwiGLU, which a is then computed from) is
//   round(fma(lora_scale, u[r, :] M_e, round(x[src(r)] W_e^T)))
// i.e. the GEMM followed by lora_expand_add_ (moeforge/kernels/lora_expand.h: the same rounding
// rule, the rank sum on the tensor cores in fp32 in an unspecified fixed order), without writing
// and reading back the GEMM's output. u [num_rows, lora_rank] in expert order (row r of y, also
// when x is gathered; ld_lora_u), M_e [lora_rank, n] row-major at lora_m + e * lora_m_stride_e
// with row stride ld_lora_m (LoRA's B_e^T from a [E, r, out] copy of lora_B, or A_e = lora_A's
// rows e r..); with SwiGLU M_e's columns are h's (gate, then up).
//
// Requirements (else cudaErrorInvalidValue): k, n, ldx, ldy, ldw multiples of 8, n <=
// kGroupedGemmSm90MaxN; x, y, w 16-byte
// aligned; w_stride_e a multiple of 8; 1 <= num_experts <= kGroupedGemmSm90MaxExperts; with
// LoRA, lora_rank a multiple of 8 in [8, kSm90MaxLoraRank], ld_lora_u >= lora_rank, ld_lora_m >=
// n and lora_m_stride_e multiples of 8, lora_u and lora_m 16-byte aligned; with a bias, bias
// 16-byte aligned and bias_stride_e a multiple of 8. Not
// checked: y must not overlap x or w, and W_e must not overlap W_(e+1) (w_stride_e >= n ldw for
// distinct weights). Runs on compute capability 9.0 only (grouped_gemm_sm90_supported says
// whether this build and device can).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "moeforge/kernels/swiglu.h"

namespace moeforge::kernels {

inline constexpr int64_t kGroupedGemmSm90MaxExperts = 1024;
inline constexpr int64_t kSm90MaxLoraRank = 64;  // one k block of the epilogue's MMAs
// n's bound: the loaders keep a tile's weight row / column index in 32 bits.
inline constexpr int64_t kGroupedGemmSm90MaxN = int64_t{1} << 30;

// The main loop's pipeline, a tuning choice (all give bitwise the same results): kSerial (3
// shared-memory stages) waits for each k block's MMAs before the loop goes on; kOverlapped (4
// stages) keeps one k block's MMAs in flight while it waits for and loads the next ones;
// kWarpSpecialized (5 stages for the row-grouped GEMM, 6 for the weight gradient; 384 threads)
// has a producer warpgroup load the stages (the row-grouped GEMM's weight tiles through TMA,
// grouped_gemm_sm90_weight_via_tma), running ahead across tiles, while two consumer
// warpgroups multiply (one k block's MMAs in flight) and write the epilogue, handing stages back
// and forth through mbarriers; kWarpSpecializedWide (row-grouped GEMM only) is that pipeline on
// 128 x 256 tiles (4 stages of A 128 x 64 and B 256 x 64; one wgmma.m64n256k16 per k16 step
// reads 20 KB of shared memory per 524k MACs where two m64n128k16 read 24 KB), the tile shape
// torch's CUTLASS grouped GEMM runs; with LoRA (its operands do not fit beside four wide stages)
// or columns that one 128-column tile covers it runs kWarpSpecialized.
enum class Sm90Pipeline : int {
  kSerial = 0,
  kOverlapped = 1,
  kWarpSpecialized = 2,
  kWarpSpecializedWide = 3
};

struct GroupedGemmSm90Args {
  const __nv_bfloat16* x = nullptr;
  int64_t ldx = 0;
  const __nv_bfloat16* w = nullptr;
  int64_t ldw = 0;
  int64_t w_stride_e = 0;
  __nv_bfloat16* y = nullptr;
  int64_t ldy = 0;
  const int32_t* expert_offsets = nullptr;  // [num_experts + 1], device
  int64_t num_rows = 0, k = 0, n = 0, num_experts = 0;
  __nv_bfloat16* a = nullptr;  // [num_rows, n / 2] with SwiGLU in the epilogue, else nullptr
  int64_t lda = 0;
  const int32_t* sorted_pairs = nullptr;  // [>= num_rows] device, or nullptr (x in expert order)
  int64_t num_tokens = 0, top_k = 1;      // with sorted_pairs: x is [num_tokens, k]
  Sm90Pipeline pipeline = Sm90Pipeline::kSerial;
  // The weight MN-major: w [E, k, n] (row q of W_e^T at w + e * w_stride_e + q * ldw, the n
  // values contiguous), e.g. gpt-oss's [E, in, out] in the forward or HF's [E, out, in] in grad_x.
  bool w_mn_major = false;
  // With `a`: the gated activation, kSilu (HF's halves, above) or kGptOss (gpt-oss's
  // interleaved pairs: gate column 2j, up column 2j + 1 of h; clamped at glu_limit, sigmoid of
  // glu_alpha * gate), as launch_swiglu computes it (moeforge/kernels/swiglu.h).
  GluVariant glu = GluVariant::kSilu;
  float glu_alpha = 1.702f, glu_limit = 7.0f;
  // A bias [E, n] (bias + e * bias_stride_e) added to the rounded result as grouped_mm's bias pass
  // adds it, round(round(x W_e^T) + b_e), before LoRA's up-projection and the activation.
  const __nv_bfloat16* bias = nullptr;
  int64_t bias_stride_e = 0;
  // LoRA's up-projection in the epilogue (above), or lora_u = nullptr.
  const __nv_bfloat16* lora_u = nullptr;  // [num_rows, lora_rank], expert order
  int64_t ld_lora_u = 0, lora_rank = 0;
  const __nv_bfloat16* lora_m = nullptr;  // M_e [lora_rank, n] at lora_m + e * lora_m_stride_e
  int64_t lora_m_stride_e = 0, ld_lora_m = 0;
  float lora_scale = 1.0f;
};

// The requirements above (sizes, multiples of 8, alignment, expert count).
inline bool grouped_gemm_sm90_args_valid(const GroupedGemmSm90Args& a) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return a.num_rows >= 0 && a.num_rows <= INT32_MAX && a.k >= 0 && a.n >= 0 &&
         a.n <= kGroupedGemmSm90MaxN && a.num_experts >= 1 &&
         a.num_experts <= kGroupedGemmSm90MaxExperts && a.k % 8 == 0 && a.n % 8 == 0 &&
         a.ldx % 8 == 0 && a.ldy % 8 == 0 && a.ldw % 8 == 0 && a.w_stride_e % 8 == 0 &&
         a.ldx >= a.k && a.ldw >= (a.w_mn_major ? a.n : a.k) && a.ldy >= a.n && a.w_stride_e >= 0 &&
         a.expert_offsets != nullptr && aligned(a.x) && aligned(a.y) && aligned(a.w) &&
         (a.a == nullptr || (a.n % 16 == 0 && a.lda % 8 == 0 && a.lda >= a.n / 2 &&
                             reinterpret_cast<uintptr_t>(a.a) % 16 == 0)) &&
         (a.pipeline == Sm90Pipeline::kSerial || a.pipeline == Sm90Pipeline::kOverlapped ||
          a.pipeline == Sm90Pipeline::kWarpSpecialized ||
          a.pipeline == Sm90Pipeline::kWarpSpecializedWide) &&
         (a.sorted_pairs == nullptr ||
          (a.top_k >= 1 && a.num_tokens >= 0 && a.num_tokens <= INT32_MAX / a.top_k)) &&
         (a.glu == GluVariant::kSilu || a.glu == GluVariant::kGptOss) &&
         (a.bias == nullptr ||
          (aligned(a.bias) && a.bias_stride_e % 8 == 0 && a.bias_stride_e >= 0)) &&
         (a.lora_u == nullptr ||
          (a.lora_m != nullptr && a.lora_rank >= 8 && a.lora_rank <= kSm90MaxLoraRank &&
           a.lora_rank % 8 == 0 && a.ld_lora_u % 8 == 0 && a.ld_lora_u >= a.lora_rank &&
           a.ld_lora_m % 8 == 0 && a.ld_lora_m >= a.n && a.lora_m_stride_e % 8 == 0 &&
           a.lora_m_stride_e >= 0 && aligned(a.lora_u) && aligned(a.lora_m)));
}

// Whether this build holds the sm_90a kernel (CUDA architecture 9.0 in the build) and the
// current device is compute capability 9.0.
cudaError_t grouped_gemm_sm90_supported(bool* supported);

// Launches the kernel on `stream`: cudaErrorInvalidValue for arguments that break the
// requirements, cudaErrorNotSupported where grouped_gemm_sm90_supported is false, else the first
// CUDA error.
cudaError_t launch_grouped_gemm_sm90(const GroupedGemmSm90Args& args, cudaStream_t stream);

// Whether the warp-specialised pipelines read this launch's weight through TMA: a tensor map
// describes it (kernels/sm90/tma.cuh: positive strides, multiples of 16 bytes, experts not
// overlapping, k >= 1) and the driver encodes it. Where not (e.g. experts sharing one weight,
// w_stride_e = 0), kWarpSpecialized / kWarpSpecializedWide run kOverlapped: the same results.
bool grouped_gemm_sm90_weight_via_tma(const GroupedGemmSm90Args& args);

// ---- the K-grouped weight gradient (kernels/sm90/grouped_wgrad_sm90.cu) ----------------------
//
//   g[e, i, j] = sum over the rows r of expert e (m(e) <= r < m(e + 1)) of a[src(r), i] b[src(r),
//   j]
//
// i.e. G_e = A_e^T B_e, the weight gradient of a row-grouped GEMM (A = its output gradient and B
// its input for a weight [E, out, in]; the other way round for [E, in, out]). a [num_rows, p]
// and b [num_rows, q] row-major (lda, ldb); one of them may be read through the routing plan
// (gather_a / gather_b: row r is token sorted_pairs[r] / top_k of a token-major [num_tokens, .]
// operand; a pair outside [0, num_tokens * top_k) reads a zero row). g [E, p, q] (g_stride_e,
// ldg), bfloat16; fp32 accumulation over the expert's rows in row order, 64 at a time; an
// expert without rows gets G_e = 0. Offsets as above (clamped, non-decreasing, on the device).
// Deterministic: each G_e tile comes from one CTA's fixed sequence of wgmma steps. Requirements
// (else cudaErrorInvalidValue): p, q, lda, ldb, ldg, g_stride_e multiples of 8, lda >= p,
// ldb >= q, ldg >= q, g_stride_e >= p ldg; a, b, g 16-byte aligned; 1 <= num_experts <=
// kGroupedGemmSm90MaxExperts; at most one of gather_a / gather_b. Not checked: g must not overlap
// a or b.
struct GroupedWgradSm90Args {
  const __nv_bfloat16* a = nullptr;
  int64_t lda = 0;
  const __nv_bfloat16* b = nullptr;
  int64_t ldb = 0;
  __nv_bfloat16* g = nullptr;
  int64_t g_stride_e = 0, ldg = 0;
  const int32_t* expert_offsets = nullptr;  // [num_experts + 1], device
  int64_t num_rows = 0, p = 0, q = 0, num_experts = 0;
  const int32_t* sorted_pairs = nullptr;  // [>= num_rows] device, with gather_a or gather_b
  int64_t num_tokens = 0, top_k = 1;
  bool gather_a = false, gather_b = false;
  // kSerial, kOverlapped or kWarpSpecialized (128 x 128 tiles only: no kWarpSpecializedWide)
  Sm90Pipeline pipeline = Sm90Pipeline::kSerial;
};

inline bool grouped_wgrad_sm90_args_valid(const GroupedWgradSm90Args& a) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return a.num_rows >= 0 && a.num_rows <= INT32_MAX && a.p >= 0 && a.q >= 0 && a.num_experts >= 1 &&
         a.num_experts <= kGroupedGemmSm90MaxExperts && a.p % 8 == 0 && a.q % 8 == 0 &&
         a.lda % 8 == 0 && a.ldb % 8 == 0 && a.ldg % 8 == 0 && a.g_stride_e % 8 == 0 &&
         a.lda >= a.p && a.ldb >= a.q && a.ldg >= a.q && a.g_stride_e >= a.p * a.ldg &&
         a.expert_offsets != nullptr && aligned(a.a) && aligned(a.b) && aligned(a.g) &&
         !(a.gather_a && a.gather_b) &&
         (a.pipeline == Sm90Pipeline::kSerial || a.pipeline == Sm90Pipeline::kOverlapped ||
          a.pipeline == Sm90Pipeline::kWarpSpecialized) &&
         (!(a.gather_a || a.gather_b) ||
          (a.sorted_pairs != nullptr && a.top_k >= 1 && a.num_tokens >= 0 &&
           a.num_tokens <= INT32_MAX / a.top_k));
}

// Launches it on `stream`: cudaErrorInvalidValue for arguments that break the requirements,
// cudaErrorNotSupported where grouped_gemm_sm90_supported is false, else the first CUDA error.
cudaError_t launch_grouped_wgrad_sm90(const GroupedWgradSm90Args& args, cudaStream_t stream);

}  // namespace moeforge::kernels
