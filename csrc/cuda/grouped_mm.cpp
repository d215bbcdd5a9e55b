// CUDA grouped_mm / grouped_mm_backward: the glue around the grouped GEMM engine
// (kernels/grouped_gemm*.cu, moeforge/kernels/grouped_gemm.h). Same semantics and validation as
// csrc/cpu/grouped_mm.cpp: fp32 accumulation for the half types (fp64 for float64), rows past
// expert_offsets[E] are zero, experts without rows get zero weight / bias gradients, and an
// output_mask entry that is False costs no work and returns an empty tensor.
//
// No host synchronisation: expert_offsets stays on the device and only the kernels read it, so
// these ops can be captured in a CUDA graph. Its values therefore cannot be validated here (the
// CPU kernels do validate them); instead the kernels read the offsets defensively, clamped into
// [0, num_rows] and made non-decreasing, so that bad offsets give wrong rows but never an
// out-of-bounds read or write (see grouped_gemm.h). The weight is read in place with its own
// strides (any layout, no copy); x and grad_out only need unit stride along features.
//
// Engine, chosen per call by the environment variable MOEFORGE_GROUPED_GEMM (read on every call,
// so a test or benchmark can switch it at run time):
//   unset, "" or "auto"      the default: at::_grouped_mm (torch's CUTLASS grouped GEMM) for each
//                            GEMM of a call that it supports without a host sync (bfloat16 on
//                            sm90 / sm100, shapes below), our engine for the rest. Measured on an
//                            H100 (benchmarks/RESULTS.md, 2026-11-22): torch's sm90 kernels run
//                            the Qwen3-30B-A3B layer's GEMMs at ~330 TFLOP/s, our WMMA ones at
//                            ~120, so ours are used only where torch's cannot be
//   "moeforge"               our engine only: the tensor-core path (kernels/grouped_gemm_wmma.cu,
//                            nvcuda::wmma, cp.async pipeline) for the forward, grad_x and weight
//                            gradient GEMMs in float16 / bfloat16 on sm80+; the SIMT kernels
//                            (kernels/grouped_gemm_impl.cuh) for everything else (float32 /
//                            float64, older devices, the bias gradient). expert_lora follows
//                            the same choice (csrc/cuda/expert_lora.cpp)
//   "simt"                   our SIMT kernels for every case (the reference engine)
//   "torch"                  same as "auto" (kept as the name the benchmarks and tests use for
//                            torch's engine)
//   "sm90"                   experimental, not yet the default: our sm_90a wgmma kernels
//                            (kernels/sm90, grouped_mm_sm90.cpp) for the bfloat16 GEMMs - the
//                            forward (gathered rows read through the routing plan) and grad_x in
//                            both weight layouts (the weight read K-major or MN-major), and the
//                            K-grouped weight gradient (x read through the plan) - "auto" for
//                            what they do not take. Raises on a device or build without them
//                            (compute capability 9.0, TORCH_CUDA_ARCH_LIST with 9.0)
//   anything else            raises (a misspelt engine must not be measured as ours)
// torch's engine is used when all of these hold (torch 2.15, aten/src/ATen/native/cuda/
// GroupedBlas.cpp, GroupMM.cu, GroupMMCommon.cuh, native/GroupedMMUtils.h): bfloat16 (float16 and
// float32 go to torch's per-group loop, which copies the offsets to the host); a device of compute
// capability 9.x or 10.x (others take that loop too); 1 <= num_experts <= 1023 (its setup kernel
// has one thread per group); every size >= 1 and within int32; each operand 16-byte aligned, with
// unit stride along one of its last two dimensions, the other stride a multiple of 8 elements and
// not below that dimension's extent, and (3-D) a batch stride that is a multiple of 8; and the
// output width a multiple of 8, so that torch's output (last dimension padded to 16 bytes) is
// dense. The rest is done here, still without a sync: the offsets are passed as
// expert_offsets[1:] clamped into [0, num_rows] and made non-decreasing (torch does not guard
// against bad offsets), rows past offsets[E] (which torch leaves unwritten) are zeroed and the
// bias is added by moeforge/kernels/zero_rows.h, experts without rows get their weight gradient
// zeroed (torch's K = 0 groups are reported non-zero on sm100), and the bias gradient stays on the
// row-sum kernel of our engine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "cuda_utils.h"
#include "moeforge/kernels/grouped_gemm.h"
#include "moeforge/kernels/zero_rows.h"
#include "validation.h"

namespace moeforge {
namespace {

int64_t row_stride(const at::Tensor& t) {
  return t.stride(0);
}

// Strides (e, k, n) of expert e's weight as the [k, n] operand of a row-grouped GEMM, read in
// place from weight [E, out, in] or, transposed, [E, in, out]. forward: [in, out], so that
// y = x @ operand; else [out, in], so that grad_x = grad_out @ operand.
std::array<int64_t, 3> weight_operand(const at::Tensor& weight, bool weight_transposed,
                                      bool forward) {
  const int64_t in = weight.stride(weight_transposed ? 1 : 2);
  const int64_t out = weight.stride(weight_transposed ? 2 : 1);
  return {weight.stride(0), forward ? in : out, forward ? out : in};
}

// --- engine selection (see the top of this file) -----------------------------------------------

enum class GemmEngine { kMoeforge, kSimt, kTorch, kSm90 };  // kTorch: "auto" / "torch"

GemmEngine requested_engine() {
  const char* env = std::getenv("MOEFORGE_GROUPED_GEMM");
  const std::string_view name = env == nullptr ? std::string_view() : std::string_view(env);
  if (name.empty() || name == "auto" || name == "torch") return GemmEngine::kTorch;
  if (name == "moeforge") return GemmEngine::kMoeforge;
  if (name == "simt") return GemmEngine::kSimt;
  if (name == "sm90") return GemmEngine::kSm90;
  TORCH_CHECK_VALUE(false,
                    "moeforge: MOEFORGE_GROUPED_GEMM must be \"auto\", \"moeforge\", \"simt\", "
                    "\"torch\" or \"sm90\", got \"",
                    name, "\"");
  return GemmEngine::kMoeforge;
}

}  // namespace

bool sm90_engine_requested() {
  return requested_engine() == GemmEngine::kSm90;
}

kernels::GroupedGemmEngine grouped_gemm_engine() {
  return requested_engine() == GemmEngine::kSimt ? kernels::GroupedGemmEngine::kSimt
                                                 : kernels::GroupedGemmEngine::kWmma;
}

namespace {

template <typename scalar_t>
void launch_rows(const at::Tensor& x, const kernels::RowGather& x_rows, const at::Tensor& weight,
                 std::array<int64_t, 3> ws, const at::Tensor& bias, const at::Tensor& offsets,
                 at::Tensor& out, std::string_view op, cudaStream_t stream) {
  using T = cuda_type_t<scalar_t>;
  kernels::GroupedGemmArgs<T, T, T> args;
  args.x = cuda_ptr<scalar_t>(x);
  args.ldx = row_stride(x);
  args.x_rows = x_rows;
  args.w = cuda_ptr<scalar_t>(weight);
  args.w_stride_e = ws[0];
  args.w_stride_k = ws[1];
  args.w_stride_n = ws[2];
  if (bias.defined()) {
    args.bias = cuda_ptr<scalar_t>(bias);
    args.bias_stride_e = bias.stride(0);
  }
  args.expert_offsets = offsets.const_data_ptr<int32_t>();
  args.y = cuda_mutable_ptr<scalar_t>(out);
  args.ldy = out.size(1);
  args.num_rows = out.size(0);
  args.k = x.size(1);
  args.n = out.size(1);
  args.num_experts = weight.size(0);
  // A request: the launcher keeps the SIMT kernel where the WMMA path does not apply.
  args.engine = grouped_gemm_engine();
  check_cuda(kernels::launch_grouped_gemm(args, stream), op);
}

// out [S, n] = x @ W_e per expert (+ bias[e]); rows past offsets[E] zero. See weight_operand.
// x's rows are read through `source` (x in expert order, or token-major through the plan).
at::Tensor grouped_gemm(const at::Tensor& x_in, const RowSource& source, const at::Tensor& weight,
                        const at::Tensor& offsets, const std::optional<at::Tensor>& bias_in,
                        bool weight_transposed, bool forward, std::string_view op,
                        cudaStream_t stream) {
  const at::Tensor x = as_rows(x_in);
  const int64_t n = weight.size(forward == weight_transposed ? 2 : 1);
  at::Tensor out = at::empty({source.num_rows(x), n}, x.options());
  const kernels::RowGather x_rows = row_gather(source, x);
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const std::array<int64_t, 3> ws = weight_operand(weight, weight_transposed, forward);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "moeforge.grouped_mm",
      [&] { launch_rows<scalar_t>(x, x_rows, weight, ws, bias, offsets, out, op, stream); });
  return out;
}

}  // namespace

// --- the at::_grouped_mm engine (see the top of this file) ------------------------------------

// torch takes its CUTLASS path (no host sync) for bfloat16 on sm90 / sm100 only. Under "sm90"
// it serves the GEMMs our sm_90a kernel does not cover.
bool torch_engine_applies(const at::Tensor& x, int64_t num_experts) {
  const GemmEngine engine = requested_engine();
  if ((engine != GemmEngine::kTorch && engine != GemmEngine::kSm90) ||
      x.scalar_type() != at::kBFloat16) {
    return false;
  }
  if (num_experts < 1 || num_experts > 1023) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop != nullptr && (prop->major == 9 || prop->major == 10);
}

// An operand torch's grouped GEMM accepts (check_valid_strides_and_return_transposed, as bool),
// non-empty and within int32.
bool torch_operand_ok(const at::Tensor& t) {
  constexpr int64_t kAlign = 8;  // 16 bytes of bfloat16
  for (const int64_t size : t.sizes()) {
    if (size < 1 || size > std::numeric_limits<int32_t>::max()) return false;
  }
  if (reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  const int64_t d = t.dim();
  if (d == 3 && t.stride(0) % kAlign != 0) return false;
  const int64_t s_row = t.stride(d - 2), s_col = t.stride(d - 1);
  if (s_row == 1 && s_col >= t.size(d - 2)) return s_col % kAlign == 0;
  if (s_col == 1 && s_row >= t.size(d - 1)) return s_row % kAlign == 0;
  return false;
}

// expert_offsets[1:] as torch reads them (cumulative row ends), clamped into [0, num_rows] and
// made non-decreasing like our engine reads them: one small launch per GEMM call (a clamp and
// a cummax through ATen were two launches and five ops of host work, 12 times per LoRA step).
// No sync. offsets: int32 [E + 1] (validated), E <= 1024.
at::Tensor expert_row_ends(const at::Tensor& offsets, int64_t num_rows, std::string_view op,
                           cudaStream_t stream) {
  const int64_t num_experts = offsets.size(0) - 1;
  const at::Tensor offs = offsets.contiguous();
  at::Tensor ends = at::empty({num_experts}, offs.options().dtype(at::kInt));
  check_cuda(kernels::launch_expert_row_ends(offs.const_data_ptr<int32_t>(), num_experts, num_rows,
                                             ends.mutable_data_ptr<int32_t>(), stream),
             op);
  return ends;
}

void finish_grouped_rows(at::Tensor& out, const at::Tensor& ends, const at::Tensor& bias,
                         std::string_view op, cudaStream_t stream) {
  using T = __nv_bfloat16;
  const int64_t num_rows = out.size(0), n = out.size(1), num_experts = ends.size(0);
  const int32_t* ends_ptr = ends.const_data_ptr<int32_t>();
  if (bias.defined()) {
    check_cuda(kernels::launch_add_grouped_bias<T>(
                   cuda_mutable_ptr<at::BFloat16>(out), out.stride(0), num_rows, n,
                   cuda_ptr<at::BFloat16>(bias), bias.stride(0), ends_ptr, num_experts, stream),
               op);
  } else {
    check_cuda(kernels::launch_zero_rows_from<T>(cuda_mutable_ptr<at::BFloat16>(out), out.stride(0),
                                                 num_rows, n, ends_ptr + (num_experts - 1), stream),
               op);
  }
}

namespace {

// torch pads its output's last dimension to 16 bytes; the widths we let through are multiples of
// 8, so this is a no-op kept as a guard.
at::Tensor dense(at::Tensor t) {
  return t.is_contiguous() ? t : t.contiguous();
}

}  // namespace

// out [S, n] = a @ b_e per expert through at::_grouped_mm, with rows past ends[E-1] zero and, when
// given, bias[e] added to the rows of e; std::nullopt when torch's engine does not apply.
// a [S, k]; b [E, k, n] (any strides torch accepts).
std::optional<at::Tensor> torch_grouped_gemm(const at::Tensor& a_in, const at::Tensor& b,
                                             const at::Tensor& offsets, const at::Tensor& bias,
                                             std::string_view op, cudaStream_t stream) {
  const at::Tensor a = as_rows(a_in);
  const int64_t num_rows = a.size(0), n = b.size(2), num_experts = b.size(0);
  if (!torch_engine_applies(a, num_experts) || n % 8 != 0 || !torch_operand_ok(a) ||
      !torch_operand_ok(b)) {
    return std::nullopt;
  }
  const at::Tensor ends = expert_row_ends(offsets, num_rows, op, stream);
  at::Tensor out = dense(at::_grouped_mm(a, b, ends));
  finish_grouped_rows(out, ends, bias, op, stream);
  return out;
}

// G [E, p, q] with G_e = first_e^T second_e over the rows of e through the 2-D x 2-D form of
// at::_grouped_mm (offsets along K), experts without rows zeroed; std::nullopt when torch's engine
// does not apply. first [S, p], second [S, q].
std::optional<at::Tensor> torch_grouped_wgrad(const at::Tensor& first, const at::Tensor& second,
                                              const at::Tensor& offsets, int64_t num_experts,
                                              std::string_view op, cudaStream_t stream) {
  // first^T is [p, S] with unit stride along p ("column major" to torch) and second is row major:
  // the one 2-D x 2-D layout for which torch accepts empty groups (GroupMMCommon.cuh asserts
  // K > 0 per group for the others). p, q multiples of 8 keep first's row stride above 1, so
  // that torch does see first^T as column major, and the output dense.
  const at::Tensor a = first.t();
  const int64_t num_rows = first.size(0), p = first.size(1), q = second.size(1);
  if (!torch_engine_applies(first, num_experts) || p % 8 != 0 || q % 8 != 0 ||
      first.stride(1) != 1 || second.stride(1) != 1 || !torch_operand_ok(a) ||
      !torch_operand_ok(second)) {
    return std::nullopt;
  }
  const at::Tensor ends = expert_row_ends(offsets, num_rows, op, stream);
  at::Tensor g = dense(at::_grouped_mm(a, second, ends));
  check_cuda(kernels::launch_zero_empty_groups<__nv_bfloat16>(
                 cuda_mutable_ptr<at::BFloat16>(g), g.stride(0), p * q,
                 ends.const_data_ptr<int32_t>(), num_experts, stream),
             op);
  return g;
}

namespace {

// torch's engine has no gather: where the selected engine ("auto", the default) reaches
// at::_grouped_mm, a gathered x is materialised (the permute it replaces) and the GEMM reads that
// copy. (For a corrupt plan the copy's rows follow permute's rule, our gathered loads clamp the
// index: the two engines may then differ; a plan made by routing is never corrupt.)
bool gather_first(const RowSource& source, const at::Tensor& x, int64_t num_experts) {
  return source.gathered() && torch_engine_applies(x, num_experts);
}

at::Tensor grouped_mm_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& bias,
                           bool weight_transposed, const std::optional<at::Tensor>& sorted_pairs,
                           const std::optional<at::Tensor>& pair_to_row) {
  check_grouped_mm_inputs(x_in, weight, expert_offsets, bias, weight_transposed);
  RowSource source = row_source("grouped_mm", x_in, sorted_pairs, pair_to_row);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor offsets = expert_offsets.contiguous();
  const at::Tensor bias_rows = bias.has_value() ? bias->contiguous() : at::Tensor();
  // "sm90": y = x W_e^T with W_e as [out, in], the rows gathered in the kernel's loads.
  if (std::optional<at::Tensor> out =
          sm90_grouped_gemm(x_in, source, weight_transposed ? weight.transpose(1, 2) : weight,
                            offsets, bias_rows, "grouped_mm", stream)) {
    return *out;
  }
  const bool copy_x = gather_first(source, x_in, weight.size(0));
  const at::Tensor x = copy_x ? source.rows(x_in) : x_in;
  if (copy_x) source = RowSource{};
  // torch's engine: y = x @ W_e with W_e as [in, out].
  if (!source.gathered()) {
    if (std::optional<at::Tensor> out =
            torch_grouped_gemm(x, weight_transposed ? weight : weight.transpose(1, 2), offsets,
                               bias_rows, "grouped_mm", stream)) {
      return *out;
    }
  }
  return grouped_gemm(x, source, weight, offsets, bias, weight_transposed, /*forward=*/true,
                      "grouped_mm", stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_arg, const at::Tensor& weight,
    const at::Tensor& expert_offsets, bool weight_transposed, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& sorted_pairs, const std::optional<at::Tensor>& pair_to_row) {
  constexpr std::string_view op = "grouped_mm_backward";
  check_grouped_mm_inputs(x_arg, weight, expert_offsets, std::nullopt, weight_transposed, op);
  RowSource source = row_source(op, x_arg, sorted_pairs, pair_to_row);
  check_grouped_mm_backward_inputs(grad_out_in, x_arg, weight, expert_offsets, weight_transposed,
                                   source.num_rows(x_arg));
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor offsets = expert_offsets.contiguous();
  const at::Tensor grad_out = as_rows(grad_out_in);
  const int64_t num_rows = grad_out.size(0), num_experts = weight.size(0);
  // x is read by the weight gradient only (gathered there, or copied first for torch's engine).
  // The weight gradient goes first, so that such a copy [S, in] is freed before grad_x [S, in]
  // is allocated: the two never coexist (0.5 GB of peak memory for Qwen3's gate_up at T=16384).
  const int64_t out_features = grad_out.size(1);
  const auto empty = [&] { return at::empty({0}, x_arg.options()); };
  at::Tensor grad_w = empty();
  // "sm90": our K-grouped kernel, x read through the plan (no copy).
  std::optional<at::Tensor> sm90_grad_w;
  if (output_mask[1]) {
    sm90_grad_w = sm90_grouped_wgrad(
        weight_transposed ? x_arg : grad_out, weight_transposed ? grad_out : x_arg, source,
        /*gather_first=*/weight_transposed, offsets, num_experts, op, stream);
  }
  if (sm90_grad_w) {
    grad_w = *sm90_grad_w;
  } else if (output_mask[1]) {
    const bool copy_x = gather_first(source, x_arg, num_experts);
    const at::Tensor x = as_rows(copy_x ? source.rows(x_arg) : x_arg);
    if (copy_x) source = RowSource{};
    // grad_weight in the weight's own layout (contiguous): [E, out, in] = grad_out_e^T x_e, or
    // transposed [E, in, out] = x_e^T grad_out_e. The operand whose features index the weight's
    // last dimension goes second, so that the stores run along contiguous memory.
    const at::Tensor& first = weight_transposed ? x : grad_out;
    const at::Tensor& second = weight_transposed ? grad_out : x;
    std::optional<at::Tensor> torch_grad_w;
    if (!source.gathered()) {
      torch_grad_w = torch_grouped_wgrad(first, second, offsets, num_experts, op, stream);
    }
    grad_w = torch_grad_w ? *torch_grad_w : at::empty(weight.sizes(), weight.options());
    if (!torch_grad_w) {
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, x.scalar_type(), "moeforge.grouped_mm_backward", [&] {
            using T = cuda_type_t<scalar_t>;
            kernels::GroupedGemmWgradArgs<T, T, T> args;
            args.a = cuda_ptr<scalar_t>(first);
            args.lda = row_stride(first);
            args.b = cuda_ptr<scalar_t>(second);
            args.ldb = row_stride(second);
            (weight_transposed ? args.a_rows : args.b_rows) = row_gather(source, x);
            args.expert_offsets = offsets.const_data_ptr<int32_t>();
            args.g = cuda_mutable_ptr<scalar_t>(grad_w);
            args.g_stride_e = grad_w.stride(0);
            args.g_stride_p = grad_w.stride(1);
            args.g_stride_q = grad_w.stride(2);
            args.num_rows = num_rows;
            args.p = first.size(1);
            args.q = second.size(1);
            args.num_experts = num_experts;
            args.engine = grouped_gemm_engine();  // tensor cores for fp16 / bf16 on sm80+
            check_cuda(kernels::launch_grouped_gemm_wgrad(args, stream), op);
          });
    }
  }  // x's copy (if any) is released here

  // grad_x = grad_out @ W_e read as [out, in]: the row-grouped GEMM again, dropped rows zero.
  at::Tensor grad_x = empty();
  if (output_mask[0]) {
    // sm90's w_nk is W_e as [in, out] (either layout's strides); torch's b is [out, in].
    std::optional<at::Tensor> fast_grad_x = sm90_grouped_gemm(
        grad_out, RowSource{}, weight_transposed ? weight : weight.transpose(1, 2), offsets,
        at::Tensor(), op, stream);
    if (!fast_grad_x) {
      fast_grad_x =
          torch_grouped_gemm(grad_out, weight_transposed ? weight.transpose(1, 2) : weight, offsets,
                             at::Tensor(), op, stream);
    }
    grad_x = fast_grad_x ? *fast_grad_x
                         : grouped_gemm(grad_out, RowSource{}, weight, offsets, std::nullopt,
                                        weight_transposed, /*forward=*/false, op, stream);
  }
  at::Tensor grad_b =
      output_mask[2] ? at::empty({num_experts, out_features}, x_arg.options()) : empty();
  if (output_mask[2]) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad_out.scalar_type(), "moeforge.grouped_mm_backward", [&] {
          check_cuda(kernels::launch_grouped_row_sum(
                         cuda_ptr<scalar_t>(grad_out), row_stride(grad_out),
                         offsets.const_data_ptr<int32_t>(), cuda_mutable_ptr<scalar_t>(grad_b),
                         out_features, num_rows, out_features, num_experts, stream),
                     op);
        });
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cuda);
}

}  // namespace moeforge
