// Shared helpers of the CUDA glue (csrc/cuda/*.cpp, host compiler): turn a launcher's cudaError_t
// into a TORCH_CHECK naming the op, and map ATen element types to the CUDA types that the
// torch-free launchers in kernels/ take.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "moeforge/kernels/grouped_gemm.h"
#include "moeforge/kernels/swiglu.h"
#include "row_source.h"

namespace moeforge {

// Raises `moeforge.<op>: CUDA error: <message>` unless err is cudaSuccess.
inline void check_cuda(cudaError_t err, std::string_view op) {
  TORCH_CHECK(err == cudaSuccess, "moeforge.", op, ": CUDA error: ", cudaGetErrorString(err));
}

// The CUDA element type of an ATen scalar_t (same size and bit layout).
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using cuda_type_t = typename CudaType<scalar_t>::type;

static_assert(sizeof(at::Half) == sizeof(__half) && alignof(at::Half) == alignof(__half));
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16) &&
              alignof(at::BFloat16) == alignof(__nv_bfloat16));

// t's data as the CUDA type of scalar_t (t must hold scalar_t).
template <typename scalar_t>
const cuda_type_t<scalar_t>* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const cuda_type_t<scalar_t>*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
cuda_type_t<scalar_t>* cuda_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<cuda_type_t<scalar_t>*>(t.mutable_data_ptr<scalar_t>());
}

// The tensor-core request for our grouped GEMM launchers under MOEFORGE_GROUPED_GEMM (read per
// call; defined in grouped_mm.cpp): kWmma unless "simt" forces the SIMT kernels. The launchers
// honour it only for the element types and devices the WMMA kernels cover.
kernels::GroupedGemmEngine grouped_gemm_engine();

// torch's grouped GEMM engine (defined in grouped_mm.cpp, where the rules are listed): whether the
// engine selected by MOEFORGE_GROUPED_GEMM reaches at::_grouped_mm for x's dtype and device, and
// whether torch accepts t as an operand as it is.
bool torch_engine_applies(const at::Tensor& x, int64_t num_experts);
bool torch_operand_ok(const at::Tensor& t);
// out [S, n] = a @ b_e per expert (a [S, k], b [E, k, n]), rows past offsets[E] zero, bias[e]
// added when defined; std::nullopt where torch's engine does not apply (the caller falls back).
std::optional<at::Tensor> torch_grouped_gemm(const at::Tensor& a, const at::Tensor& b,
                                             const at::Tensor& offsets, const at::Tensor& bias,
                                             std::string_view op, cudaStream_t stream);
// G [E, p, q] with G_e = first_e^T second_e over expert e's rows (first [S, p], second [S, q]),
// zero for experts without rows; std::nullopt where torch's engine does not apply.
std::optional<at::Tensor> torch_grouped_wgrad(const at::Tensor& first, const at::Tensor& second,
                                              const at::Tensor& offsets, int64_t num_experts,
                                              std::string_view op, cudaStream_t stream);

// expert_offsets[1:] clamped into [0, num_rows] and made non-decreasing: int32 [E] on the device,
// the row ends as torch's grouped GEMM and zero_rows.h take them (one launch, no sync; E <= 1024).
at::Tensor expert_row_ends(const at::Tensor& offsets, int64_t num_rows, std::string_view op,
                           cudaStream_t stream);
// For a bfloat16 out [S, n] whose GEMM wrote only the experts' rows: rows past ends[E - 1] set to
// zero and, when bias [E, n] is defined, bias[e] added to the rows of expert e (one pass).
void finish_grouped_rows(at::Tensor& out, const at::Tensor& ends, const at::Tensor& bias,
                         std::string_view op, cudaStream_t stream);

// Whether MOEFORGE_GROUPED_GEMM is "sm90" (grouped_mm.cpp).
bool sm90_engine_requested();
// LoRA's up-projection for the sm90 kernel's epilogue (grouped_mm_lora, grouped_mm_swiglu):
// out += scaling * u M_e as lora_expand_add_ computes it, u [S, r] in expert order, M_e from
// lora_weight in PEFT's layout (rank_major: lora_B [n, r*E]; else lora_A [E*r, n]).
struct Sm90LoraExpand {
  const at::Tensor& u;
  const at::Tensor& lora_weight;
  bool rank_major;
  double scaling;
};
// out [S, n] = x's rows (in expert order, or through source's plan) times w_nk[e]^T per expert,
// bias[e] added when defined (then with lora its up-projection: the order of grouped_mm's bias
// and lora_expand_add_), rows past the experts' end zero, by our sm_90a kernel
// (grouped_mm_sm90.cpp): under MOEFORGE_GROUPED_GEMM=sm90, for the GEMMs it covers (bfloat16,
// w_nk [E, n, k] with unit stride along k or along n, sizes / strides multiples of 8, 16-byte
// aligned, E <= 1024; with lora, its up-projection added in the epilogue: bfloat16, rank a
// multiple of 8 up to 64); std::nullopt for the rest (the caller falls back). Raises when "sm90"
// is asked for on a device or build without the kernel.
std::optional<at::Tensor> sm90_grouped_gemm(const at::Tensor& x, const RowSource& source,
                                            const at::Tensor& w_nk, const at::Tensor& offsets,
                                            const at::Tensor& bias, std::string_view op,
                                            cudaStream_t stream,
                                            const Sm90LoraExpand* lora = nullptr);

// The gated activation of grouped_mm_swiglu's kernel: HF's SiLU halves or gpt-oss's interleaved
// clamped pairs (alpha, limit).
struct Sm90Glu {
  kernels::GluVariant variant;
  double alpha, limit;
};
// (h, a) of grouped_mm_swiglu in one launch of our sm_90a kernel: h = x's rows times
// gate_up_w_nk[e]^T [S, 2I] (+ bias[e] when defined, then with lora the gate_up adapter's
// up-projection, as grouped_mm and lora_expand_add_ add them), a = the activation of h [S, I],
// rows of no expert zero in both. Same conditions as sm90_grouped_gemm, and I a multiple of 8;
// std::nullopt otherwise.
std::optional<std::tuple<at::Tensor, at::Tensor>> sm90_grouped_gemm_swiglu(
    const at::Tensor& x, const RowSource& source, const at::Tensor& gate_up_w_nk,
    const at::Tensor& offsets, const Sm90Glu& glu, const at::Tensor& bias,
    const Sm90LoraExpand* lora, std::string_view op, cudaStream_t stream);

// G [E, p, q], G_e = first_e^T second_e over the rows of expert e (first [S, p], second [S, q];
// with source's plan the operand named by gather_first - first if true, else second - is
// token-major and read through it), experts without rows zero, by our sm_90a kernel under
// MOEFORGE_GROUPED_GEMM=sm90 (bfloat16, p and q multiples of 8, 16-byte aligned, E <= 1024);
// std::nullopt otherwise. Raises as sm90_grouped_gemm does.
std::optional<at::Tensor> sm90_grouped_wgrad(const at::Tensor& first, const at::Tensor& second,
                                             const RowSource& source, bool gather_first,
                                             const at::Tensor& offsets, int64_t num_experts,
                                             std::string_view op, cudaStream_t stream);

// A 2-D operand as the GEMM kernels read it: rows at a row stride, unit stride along the
// columns. t itself when it already is one, else a contiguous copy.
inline at::Tensor as_rows(const at::Tensor& t) {
  return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

// The kernels' form of a RowSource over x (kernels::RowGather): routed row r reads x row
// sorted_pairs[r] / top_k; no gather when x is already in expert order.
inline kernels::RowGather row_gather(const RowSource& source, const at::Tensor& x) {
  kernels::RowGather g;
  if (source.gathered()) {
    g.index = source.sorted_pairs.const_data_ptr<int32_t>();
    g.divisor = source.top_k;
    g.limit = x.size(0);
  }
  return g;
}

}  // namespace moeforge
