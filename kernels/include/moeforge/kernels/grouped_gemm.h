// Grouped GEMM engine for expert-sorted rows: the GEMMs of the expert FFN, their gradients and
// split LoRA. Torch-free: raw device pointers, sizes, strides in elements and a cudaStream_t.
// Notation: S rows (x is [S, k]), E experts; expert e owns rows [offsets[e], offsets[e+1]) of the
// expert-sorted rows made by launch_routing (moeforge/kernels/routing.h), rows from offsets[E]
// on are dropped pairs.
//
//   launch_grouped_gemm        row-grouped GEMM, per expert e and row r of e:
//                                y[r, :] = alpha * x[r, :] @ W_e (+ bias[e, :]) (+ y[r, :])
//                              with W_e [k, n] addressed through arbitrary strides, so that
//                              [E, out, in] (x W^T), [E, in, out] (x W) and LoRA's expert slices
//                              of lora_A / lora_B are read in place, without a copy
//   launch_grouped_gemm_wgrad  weight-gradient grouped GEMM, per expert e:
//                                G_e[p, q] = alpha * sum over the rows r of e of a[r, p] * b[r, q]
//                              into arbitrary output strides ([E, in, out], [E, out, in], LoRA)
//   launch_grouped_row_sum     per-expert column sums (the bias gradient):
//                                out[e, j] = sum over the rows r of e of b[r, j]
//
// No host synchronisation: expert_offsets stays on the device and is only read by the kernels,
// so every launcher is CUDA-graph capturable and its launch configuration depends on sizes only.
// Offsets are read defensively, so that bad values never make a kernel read or write out of
// bounds: expert e owns rows [m(e), m(e+1)) with m(0) = 0 and
//   m(e) = min(S, max(0, offsets[1], ..., offsets[e]))        (offsets[0] is taken as 0),
// i.e. the offsets clamped into [0, S] and made non-decreasing; for valid offsets (offsets[0] = 0,
// non-decreasing, offsets[E] <= S) that is exactly [offsets[e], offsets[e+1]). Rows from m(E) on
// are the dropped rows.
//
// Element types: each operand has its own type among float, double, __half, __nv_bfloat16;
// arithmetic in double when any operand is double, else float (fp32 accumulation for the half
// types). Instantiated combinations (kernels/grouped_gemm*.cu): every type with itself, plus, for
// T = __half and __nv_bfloat16, launch_grouped_gemm<T, T, float> and <float, T, T> and
// launch_grouped_gemm_wgrad<float, T, T> (split LoRA keeps its rank-r intermediates in float32).
//
// Deterministic: no atomics; every output element is computed by one thread (or, on the tensor-core
// path, one warp) that sums in a fixed order, so two runs give bitwise equal results. Launchers
// check their arguments (cudaErrorInvalidValue: negative sizes, null pointers where data is needed,
// a gather with divisor outside [1, 2^31) or limit < 0, sizes beyond the grid limits noted
// below), check every launch, and return the first CUDA error.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moeforge::kernels {

// Kernel family of launch_grouped_gemm / launch_grouped_gemm_wgrad. kWmma is a request: it is
// honoured on a device of compute capability 8.0 or newer for launch_grouped_gemm with TX == TW
// among __half / __nv_bfloat16 and TY == TX or float, and for launch_grouped_gemm_wgrad with
// TA == TB == TG among __half / __nv_bfloat16 (tensor cores through nvcuda::wmma, 16x16x16
// fragments, fp32 accumulation, CTA tile 128 x 128, 3-stage cp.async pipeline); every other case
// runs the SIMT kernels. Both give the same results contract (the
// sums differ only in rounding order) and both are deterministic.
enum class GroupedGemmEngine : int { kSimt = 0, kWmma = 1 };

// An optional gather of an operand's rows: the token permutation fused into the GEMM's operand
// load, so that expert-sorted rows are read straight from the token-major activations instead of
// from a permuted copy. With index set, row r of the operand is row index[r] / divisor of the
// source (e.g. index = the routing plan's sorted_pairs, divisor = top_k: the token of each routed
// row); an index outside [0, limit * divisor) reads as a row of zeros (so a corrupt plan cannot
// read out of bounds). index == nullptr: row r is row r (no gather).
struct RowGather {
  const int32_t* index = nullptr;  // [num_rows], device
  int64_t divisor = 1;             // in [1, 2^31)
  int64_t limit = 0;               // rows of the source
};

// y = alpha * x @ W_e (+ bias[e]) (+ y) on the rows of each expert e.
template <typename TX, typename TW, typename TY>
struct GroupedGemmArgs {
  const TX* x = nullptr;  // [num_rows, k], row r at x + r * ldx (contiguous along k)
  int64_t ldx = 0;
  RowGather x_rows;  // optional: row r of x at x + (x_rows.index[r] / x_rows.divisor) * ldx
  // W_e[kk, nn] = w[e * w_stride_e + kk * w_stride_k + nn * w_stride_n]
  //   weight [E, out, in] used as x W^T: w_stride_e = out*in, w_stride_k = 1,  w_stride_n = in
  //   weight [E, in, out] used as x W:   w_stride_e = in*out, w_stride_k = out, w_stride_n = 1
  const TW* w = nullptr;
  int64_t w_stride_e = 0, w_stride_k = 0, w_stride_n = 0;
  const TW* bias = nullptr;  // [num_experts, n], row e at bias + e * bias_stride_e; or nullptr
  int64_t bias_stride_e = 0;
  const int32_t* expert_offsets = nullptr;  // [num_experts + 1], device
  TY* y = nullptr;                          // [num_rows, n], row r at y + r * ldy
  int64_t ldy = 0;
  int64_t num_rows = 0, k = 0, n = 0, num_experts = 0;
  double alpha = 1.0;
  // false: y = alpha * x W_e (+ bias) on routed rows and y = 0 on dropped rows; y is not read.
  // true:  y += alpha * x W_e (+ bias) on routed rows; dropped rows are left untouched.
  bool accumulate = false;
  GroupedGemmEngine engine = GroupedGemmEngine::kSimt;
};

// Limits: n <= 65535 * 64 (grid.y). k == 0 is valid (y = bias, or 0).
template <typename TX, typename TW, typename TY>
cudaError_t launch_grouped_gemm(const GroupedGemmArgs<TX, TW, TY>& args, cudaStream_t stream);

// G_e = alpha * A_e^T B_e for every expert e, where A_e / B_e are the rows of e; experts with no
// rows get G_e = 0, dropped rows contribute nothing. Every element of every G_e is written.
template <typename TA, typename TB, typename TG>
struct GroupedGemmWgradArgs {
  const TA* a = nullptr;  // [num_rows, p], row r at a + r * lda
  int64_t lda = 0;
  const TB* b = nullptr;  // [num_rows, q], row r at b + r * ldb
  int64_t ldb = 0;
  RowGather a_rows, b_rows;  // optional gathers of a's and b's rows (as GroupedGemmArgs::x_rows)
  const int32_t* expert_offsets = nullptr;  // [num_experts + 1], device
  // G_e[pp, qq] = g[e * g_stride_e + pp * g_stride_p + qq * g_stride_q]
  TG* g = nullptr;
  int64_t g_stride_e = 0, g_stride_p = 0, g_stride_q = 0;
  int64_t num_rows = 0, p = 0, q = 0, num_experts = 0;
  double alpha = 1.0;
  GroupedGemmEngine engine = GroupedGemmEngine::kSimt;
};

// Limits: p <= 65535 * 64 (grid.y), num_experts <= 65535 (grid.z).
template <typename TA, typename TB, typename TG>
cudaError_t launch_grouped_gemm_wgrad(const GroupedGemmWgradArgs<TA, TB, TG>& args,
                                      cudaStream_t stream);

// out[e, j] = sum over the rows r of expert e of b[r, j] (0 for experts without rows), summed in
// the accumulation type in a fixed order and rounded once. Limit: num_experts <= 65535 (grid.y).
template <typename T>
cudaError_t launch_grouped_row_sum(const T* b,  // [num_rows, q], row r at b + r * ldb
                                   int64_t ldb,
                                   const int32_t* expert_offsets,  // [num_experts + 1]
                                   T* out,  // [num_experts, q], row e at out + e * out_stride_e
                                   int64_t out_stride_e, int64_t num_rows, int64_t q,
                                   int64_t num_experts, cudaStream_t stream);

}  // namespace moeforge::kernels
