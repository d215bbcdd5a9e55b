// CUDA split LoRA on routed rows, PEFT's expert layout: the glue around the grouped GEMM engine
// (moeforge/kernels/grouped_gemm.h). Same semantics and validation as csrc/cpu/expert_lora.cpp:
//   lora_A [E*r, in]  expert-major: A_e[j, i] = lora_A[e*r + j, i]
//   lora_B [out, r*E] rank-major:   B_e[o, j] = lora_B[o, j*E + e]
// Both are read in place through strided expert views (B_e A_e is never formed; only torch's
// engine below needs a copy of lora_B):
//   forward   u = x A_e^T                    (lora_u, stored in x's dtype)
//             delta = scaling * u B_e^T
//   backward  du = scaling * grad_delta B_e   [rows, r]
//             grad_x = du A_e,  grad_A_e = du^T x_e,  grad_B_e = scaling * grad_delta_e^T u_e
// For bfloat16 / float16 the rank-r intermediates (u in the forward, du in the backward) stay in
// float32 between the two GEMMs, as on CPU; lora_u is rounded once to x's dtype. Under the
// default engine (MOEFORGE_GROUPED_GEMM unset / "auto", see csrc/cuda/grouped_mm.cpp), bfloat16 on
// sm90 / sm100 with rank, in and out multiples of 8 runs every GEMM through at::_grouped_mm
// instead (expert_lora_torch / expert_lora_backward_torch below): measured on an H100, our rank-r
// GEMMs were most of LoRA's cost. There the intermediates are rounded to bfloat16 between the
// GEMMs, as PEFT's own bf16 matmuls do, `scaling` multiplies a bfloat16 operand (u, du, lora_u:
// exact for power-of-two scalings such as alpha = 2r, one more rounding otherwise), and lora_B is
// read through a [E, r, out] copy (its rank-major layout has a batch stride of 1, which torch
// rejects; 2 * out * r * E bytes). Rows past
// expert_offsets[E] are zero in delta, lora_u and grad_x; experts without rows get zero grad_A /
// grad_B slices. No host synchronisation (the offsets are read by the kernels only, clamped
// defensively: see csrc/cuda/grouped_mm.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "cuda_utils.h"
#include "moeforge/kernels/grouped_gemm.h"
#include "validation.h"

namespace moeforge {
namespace {

// The type the rank-r intermediates are kept in: float for the half types, else T itself.
template <typename T>
using inter_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
constexpr at::ScalarType inter_dtype() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

// Sizes and the strided expert views of lora_A / lora_B, as (stride_e, stride_k, stride_n) of the
// [k, n] operand each GEMM reads.
struct Lora {
  int64_t num_rows, in, out, rank, num_experts;
  const at::Tensor& A;
  const at::Tensor& B;
  // A_e^T [in, r]: element (i, j) = lora_A[e*r + j, i]
  std::array<int64_t, 3> a_t() const { return {rank * A.stride(0), A.stride(1), A.stride(0)}; }
  // A_e [r, in]
  std::array<int64_t, 3> a() const { return {rank * A.stride(0), A.stride(0), A.stride(1)}; }
  // B_e^T [r, out]: element (j, o) = lora_B[o, j*E + e]
  std::array<int64_t, 3> b_t() const {
    return {B.stride(1), num_experts * B.stride(1), B.stride(0)};
  }
  // B_e [out, r]
  std::array<int64_t, 3> b() const { return {B.stride(1), B.stride(0), num_experts * B.stride(1)}; }
};

// y [rows, n] = alpha * x [rows, k] @ W_e per expert; W_e at w with strides ws. Dropped rows of y
// are zero.
template <typename TX, typename TW, typename TY>
void rows_gemm(const TX* x, int64_t ldx, const TW* w, std::array<int64_t, 3> ws, TY* y,
               int64_t num_rows, int64_t k, int64_t n, const at::Tensor& offsets,
               int64_t num_experts, double alpha, std::string_view op, cudaStream_t stream,
               const kernels::RowGather& x_rows = {}) {
  kernels::GroupedGemmArgs<TX, TW, TY> args;
  args.x = x;
  args.ldx = ldx;
  args.x_rows = x_rows;
  args.w = w;
  args.w_stride_e = ws[0];
  args.w_stride_k = ws[1];
  args.w_stride_n = ws[2];
  args.expert_offsets = offsets.const_data_ptr<int32_t>();
  args.y = y;
  args.ldy = n;
  args.num_rows = num_rows;
  args.k = k;
  args.n = n;
  args.num_experts = num_experts;
  args.alpha = alpha;
  // Tensor cores where the types allow (x A_e^T and grad_delta B_e: half-type operands into the
  // float32 rank-r intermediate); the float32-operand GEMMs stay on SIMT.
  args.engine = grouped_gemm_engine();
  check_cuda(kernels::launch_grouped_gemm(args, stream), op);
}

// G_e [p, q] = alpha * a_e^T b_e per expert into g with strides gs.
template <typename TA, typename TB, typename TG>
void wgrad_gemm(const TA* a, int64_t lda, int64_t p, const TB* b, int64_t ldb, int64_t q, TG* g,
                std::array<int64_t, 3> gs, int64_t num_rows, const at::Tensor& offsets,
                int64_t num_experts, double alpha, std::string_view op, cudaStream_t stream,
                const kernels::RowGather& b_rows = {}, const kernels::RowGather& a_rows = {}) {
  kernels::GroupedGemmWgradArgs<TA, TB, TG> args;
  args.a = a;
  args.lda = lda;
  args.b = b;
  args.ldb = ldb;
  args.a_rows = a_rows;
  args.b_rows = b_rows;
  args.expert_offsets = offsets.const_data_ptr<int32_t>();
  args.g = g;
  args.g_stride_e = gs[0];
  args.g_stride_p = gs[1];
  args.g_stride_q = gs[2];
  args.num_rows = num_rows;
  args.p = p;
  args.q = q;
  args.num_experts = num_experts;
  args.alpha = alpha;
  check_cuda(kernels::launch_grouped_gemm_wgrad(args, stream), op);
}

template <typename T>
const T* data(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data(at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// --- at::_grouped_mm for every GEMM (the default engine, where it applies) ------------------

// lora_B [out, r*E] as B_e^T [E, r, out], contiguous (the copy torch's engine needs).
at::Tensor b_transposed_copy(const at::Tensor& lora_B, int64_t rank, int64_t num_experts) {
  return lora_B.reshape({lora_B.size(0), rank, num_experts}).permute({2, 1, 0}).contiguous();
}

bool torch_lora_applies(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                        int64_t rank, int64_t num_experts) {
  return torch_engine_applies(x, num_experts) && rank % 8 == 0 && x.size(1) % 8 == 0 &&
         lora_B.size(0) % 8 == 0 && lora_A.scalar_type() == x.scalar_type() &&
         lora_B.scalar_type() == x.scalar_type();
}

// (delta, lora_u) through torch's engine; std::nullopt where a GEMM does not apply (the caller
// then runs our kernels from the start).
std::optional<std::tuple<at::Tensor, at::Tensor>> expert_lora_torch(
    const at::Tensor& x_in, const RowSource& source, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& offsets, double scaling, int64_t rank,
    cudaStream_t stream) {
  constexpr std::string_view op = "expert_lora";
  const int64_t num_experts = offsets.size(0) - 1, in = x_in.size(1);
  if (!torch_lora_applies(x_in, lora_A, lora_B, rank, num_experts)) return std::nullopt;
  // An x that torch would reject is known now, before any work (the gathered copy is dense).
  if (!source.gathered() && !torch_operand_ok(as_rows(x_in))) return std::nullopt;
  const at::Tensor x = source.gathered() ? source.rows(x_in) : as_rows(x_in);
  // u = x A_e^T: A_e^T [in, r] is lora_A viewed [E, r, in], transposed.
  const std::optional<at::Tensor> u = torch_grouped_gemm(
      x, lora_A.reshape({num_experts, rank, in}).transpose(1, 2), offsets, {}, op, stream);
  if (!u) return std::nullopt;
  const std::optional<at::Tensor> delta = torch_grouped_gemm(
      u->mul(scaling), b_transposed_copy(lora_B, rank, num_experts), offsets, {}, op, stream);
  if (!delta) return std::nullopt;
  return std::make_tuple(*delta, *u);
}

// (grad_x, grad_A, grad_B) through torch's engine; std::nullopt as above.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> expert_lora_backward_torch(
    const at::Tensor& grad_delta_in, const at::Tensor& x_in, const at::Tensor& lora_u_in,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& offsets, double scaling,
    std::array<bool, 3> output_mask, const LoraBackwardSources& sources, int64_t rank,
    cudaStream_t stream) {
  constexpr std::string_view op = "expert_lora_backward";
  const int64_t num_experts = offsets.size(0) - 1, in = x_in.size(1), out = lora_B.size(0);
  if (!torch_lora_applies(x_in, lora_A, lora_B, rank, num_experts) ||
      grad_delta_in.scalar_type() != x_in.scalar_type()) {
    return std::nullopt;
  }
  // Operands torch would reject are known now, before any work (gathered copies are dense).
  if (!sources.grad_delta.gathered() && !torch_operand_ok(as_rows(grad_delta_in))) {
    return std::nullopt;
  }
  if (output_mask[1] && !sources.x.gathered() && !torch_operand_ok(as_rows(x_in))) {
    return std::nullopt;
  }
  const at::Tensor grad_delta = sources.grad_delta.gathered()
                                    ? sources.grad_delta.rows(grad_delta_in)
                                    : as_rows(grad_delta_in);
  const auto empty = [&] { return at::empty({0}, x_in.options()); };
  at::Tensor grad_x = empty(), grad_A = empty(), grad_B = empty();
  if (output_mask[0] || output_mask[1]) {
    const at::Tensor b_t = b_transposed_copy(lora_B, rank, num_experts);  // [E, r, out]
    // du = scaling * grad_delta B_e [rows, r]
    std::optional<at::Tensor> du =
        torch_grouped_gemm(grad_delta, b_t.transpose(1, 2), offsets, {}, op, stream);
    if (!du) return std::nullopt;
    du->mul_(scaling);
    if (output_mask[0]) {  // grad_x = du A_e
      std::optional<at::Tensor> g =
          torch_grouped_gemm(*du, lora_A.reshape({num_experts, rank, in}), offsets, {}, op, stream);
      if (!g) return std::nullopt;
      grad_x = *g;
    }
    if (output_mask[1]) {  // grad_A_e [r, in] = du_e^T x_e: [E, r, in] is lora_A's layout
      const at::Tensor x = sources.x.gathered() ? sources.x.rows(x_in) : as_rows(x_in);
      std::optional<at::Tensor> g = torch_grouped_wgrad(*du, x, offsets, num_experts, op, stream);
      if (!g) return std::nullopt;
      grad_A = g->reshape(lora_A.sizes());
    }
  }
  if (output_mask[2]) {  // grad_B_e [out, r] = scaling * grad_delta_e^T u_e, back to rank-major
    const at::Tensor u_scaled = as_rows(lora_u_in).to(x_in.scalar_type()).mul(scaling);
    std::optional<at::Tensor> g =
        torch_grouped_wgrad(grad_delta, u_scaled, offsets, num_experts, op, stream);
    if (!g) return std::nullopt;
    grad_B = g->permute({1, 2, 0}).reshape({out, rank * num_experts});
  }
  return std::make_tuple(grad_x, grad_A, grad_B);
}

std::tuple<at::Tensor, at::Tensor> expert_lora_cuda(
    const at::Tensor& x_in, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& expert_offsets, double scaling, const std::optional<at::Tensor>& sorted_pairs,
    const std::optional<at::Tensor>& pair_to_row) {
  constexpr std::string_view op = "expert_lora";
  const int64_t rank = check_expert_lora_inputs(op, x_in, lora_A, lora_B, expert_offsets);
  const RowSource source = row_source(op, x_in, sorted_pairs, pair_to_row);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor offsets = expert_offsets.contiguous();
  if (auto result =
          expert_lora_torch(x_in, source, lora_A, lora_B, offsets, scaling, rank, stream)) {
    return *result;
  }
  const at::Tensor x = as_rows(x_in);
  const kernels::RowGather x_rows = row_gather(source, x);
  const Lora l{source.num_rows(x),  x.size(1), lora_B.size(0), rank,
               offsets.size(0) - 1, lora_A,    lora_B};
  at::Tensor delta = at::empty({l.num_rows, l.out}, x.options());
  at::Tensor lora_u = at::empty({l.num_rows, rank}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "moeforge.expert_lora", [&] {
        using T = cuda_type_t<scalar_t>;
        using I = inter_t<T>;
        // u = x A_e^T, in I (lora_u itself when I is x's type).
        at::Tensor u = std::is_same_v<I, T>
                           ? lora_u
                           : at::empty({l.num_rows, rank}, x.options().dtype(inter_dtype<T>()));
        rows_gemm(data<T>(x), x.stride(0), data<T>(lora_A), l.a_t(), mutable_data<I>(u), l.num_rows,
                  l.in, rank, offsets, l.num_experts, 1.0, op, stream, x_rows);
        // delta = scaling * u B_e^T
        rows_gemm(data<I>(u), rank, data<T>(lora_B), l.b_t(), mutable_data<T>(delta), l.num_rows,
                  rank, l.out, offsets, l.num_experts, scaling, op, stream);
        if constexpr (!std::is_same_v<I, T>) lora_u.copy_(u);
      });
  return {delta, lora_u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_lora_backward_cuda(
    const at::Tensor& grad_delta_in, const at::Tensor& x_in, const at::Tensor& lora_u_in,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& expert_offsets,
    double scaling, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& sorted_pairs,
    const std::optional<at::Tensor>& pair_to_row, bool x_through_plan,
    bool grad_delta_through_plan) {
  constexpr std::string_view op = "expert_lora_backward";
  check_expert_lora_inputs(op, x_in, lora_A, lora_B, expert_offsets);
  const LoraBackwardSources sources = lora_backward_sources(
      op, x_in, grad_delta_in, sorted_pairs, pair_to_row, x_through_plan, grad_delta_through_plan);
  const int64_t rank = check_expert_lora_backward_inputs(
      grad_delta_in, x_in, lora_u_in, lora_A, lora_B, expert_offsets, sources.num_rows,
      sources.grad_delta.gathered() ? grad_delta_in.size(0) : sources.num_rows);
  const int64_t out_features = lora_B.size(0);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor offsets = expert_offsets.contiguous();
  if (auto result =
          expert_lora_backward_torch(grad_delta_in, x_in, lora_u_in, lora_A, lora_B, offsets,
                                     scaling, output_mask, sources, rank, stream)) {
    return *result;
  }
  // The CPU kernel accepts any floating grad_delta / lora_u (it computes in float32 or float64);
  // here they are brought to x's dtype (a no-op for the tensors autograd passes).
  const at::Tensor grad_delta = as_rows(grad_delta_in.to(x_in.scalar_type()));
  const at::Tensor lora_u = as_rows(lora_u_in.to(x_in.scalar_type()));
  const Lora l{sources.num_rows,    x_in.size(1), out_features, rank,
               offsets.size(0) - 1, lora_A,       lora_B};
  // grad_delta's rows: read through the plan (token-major) or in expert order.
  const kernels::RowGather grad_delta_rows = row_gather(sources.grad_delta, grad_delta);
  const auto empty = [&] { return at::empty({0}, x_in.options()); };
  at::Tensor grad_x = output_mask[0] ? at::empty({l.num_rows, l.in}, x_in.options()) : empty();
  at::Tensor grad_A = output_mask[1] ? at::empty(lora_A.sizes(), lora_A.options()) : empty();
  at::Tensor grad_B = output_mask[2] ? at::empty(lora_B.sizes(), lora_B.options()) : empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x_in.scalar_type(), "moeforge.expert_lora_backward", [&] {
        using T = cuda_type_t<scalar_t>;
        using I = inter_t<T>;
        if (output_mask[0] || output_mask[1]) {
          // du = scaling * grad_delta B_e [rows, r], in I; zero on dropped rows.
          at::Tensor du = at::empty({l.num_rows, rank}, x_in.options().dtype(inter_dtype<T>()));
          rows_gemm(data<T>(grad_delta), grad_delta.stride(0), data<T>(lora_B), l.b(),
                    mutable_data<I>(du), l.num_rows, l.out, rank, offsets, l.num_experts, scaling,
                    op, stream, grad_delta_rows);
          if (output_mask[0]) {  // grad_x = du A_e
            rows_gemm(data<I>(du), rank, data<T>(lora_A), l.a(), mutable_data<T>(grad_x),
                      l.num_rows, rank, l.in, offsets, l.num_experts, 1.0, op, stream);
          }
          if (output_mask[1]) {  // grad_A_e [r, in] = du_e^T x_e, expert-major rows of grad_A
            const at::Tensor x = as_rows(x_in);
            wgrad_gemm(data<I>(du), rank, rank, data<T>(x), x.stride(0), l.in,
                       mutable_data<T>(grad_A), {rank * l.in, l.in, 1}, l.num_rows, offsets,
                       l.num_experts, 1.0, op, stream, row_gather(sources.x, x));
          }
        }
        if (output_mask[2]) {  // grad_B_e [out, r] = scaling * grad_delta_e^T u_e, rank-major
          wgrad_gemm(data<T>(grad_delta), grad_delta.stride(0), l.out, data<T>(lora_u),
                     lora_u.stride(0), rank, mutable_data<T>(grad_B),
                     {1, rank * l.num_experts, l.num_experts}, l.num_rows, offsets, l.num_experts,
                     scaling, op, stream, {}, grad_delta_rows);
        }
      });
  return {grad_x, grad_A, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("expert_lora", &expert_lora_cuda);
  m.impl("expert_lora_backward", &expert_lora_backward_cuda);
}

}  // namespace moeforge
