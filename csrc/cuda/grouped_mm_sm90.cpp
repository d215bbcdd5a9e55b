// The glue of MOEFORGE_GROUPED_GEMM=sm90 (grouped_mm.cpp lists the engines): grouped_mm's
// row-grouped GEMMs through our sm_90a wgmma kernel (kernels/sm90, moeforge/kernels/
// grouped_gemm_sm90.h) where it covers them, with the gather fused into its A loads. Experimental:
// an engine to test and time against at::_grouped_mm before it becomes the default.
//
// MOEFORGE_SM90_PIPELINE picks the kernel's main-loop pipeline (read on every call, so that one
// benchmark run times each): unset, "" or "serial" (each k block's MMAs retire before the loop
// goes on), "overlapped" (one k block's MMAs stay in flight), "warp_specialized" (a producer
// warpgroup loads while two consumer warpgroups multiply), "warp_specialized_wide" (the same on
// 128 x 256 tiles; GEMMs with LoRA's epilogue or one tile's columns, and the weight gradient,
// run "warp_specialized"); anything else raises. All give bitwise the same results.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string_view>
#include <tuple>

#include "cuda_utils.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "moeforge/kernels/zero_rows.h"

namespace moeforge {
namespace {

// A row stride as the kernel takes it: for one row (or none) any stride reads the same bytes, so
// the row's extent stands in for whatever stride the tensor reports.
int64_t leading_dim(const at::Tensor& t, int64_t dim, int64_t extent) {
  return t.size(dim) > 1 ? t.stride(dim) : extent;
}

// "sm90" was asked for: raise unless this device and build have the kernel.
void require_sm90_kernel(std::string_view op) {
  bool supported = false;
  check_cuda(kernels::grouped_gemm_sm90_supported(&supported), op);
  TORCH_CHECK(supported, "moeforge.", op,
              ": MOEFORGE_GROUPED_GEMM=sm90 needs a compute capability 9.0 GPU and a build for "
              "CUDA architecture 9.0 (TORCH_CUDA_ARCH_LIST=9.0); this device or build has no "
              "sm_90a kernel: unset the variable or set it to \"auto\"");
}

kernels::Sm90Pipeline requested_pipeline() {
  const char* env = std::getenv("MOEFORGE_SM90_PIPELINE");
  const std::string_view name = env == nullptr ? std::string_view() : std::string_view(env);
  if (name.empty() || name == "serial") return kernels::Sm90Pipeline::kSerial;
  if (name == "overlapped") return kernels::Sm90Pipeline::kOverlapped;
  if (name == "warp_specialized") return kernels::Sm90Pipeline::kWarpSpecialized;
  if (name == "warp_specialized_wide") return kernels::Sm90Pipeline::kWarpSpecializedWide;
  TORCH_CHECK_VALUE(false,
                    "moeforge: MOEFORGE_SM90_PIPELINE must be \"serial\", \"overlapped\", "
                    "\"warp_specialized\" or \"warp_specialized_wide\", got \"",
                    name, "\"");
  return kernels::Sm90Pipeline::kSerial;
}

// The kernel's arguments for x's rows (through source) times w_nk[e]^T, output pointers unset;
// std::nullopt where "sm90" is not the engine or the GEMM is not one the kernel covers (dtype,
// strides, expert count; the alignment rules are checked once the outputs are set). Raises where
// "sm90" is asked for on a device or build without the kernel.
std::optional<kernels::GroupedGemmSm90Args> sm90_args(const at::Tensor& x, const RowSource& source,
                                                      const at::Tensor& w_nk,
                                                      const at::Tensor& offsets,
                                                      std::string_view op) {
  if (!sm90_engine_requested()) return std::nullopt;
  require_sm90_kernel(op);
  const int64_t num_experts = w_nk.size(0), n = w_nk.size(1), k = w_nk.size(2);
  if (x.scalar_type() != at::kBFloat16 || (x.size(1) > 1 && x.stride(1) != 1) ||
      num_experts > kernels::kGroupedGemmSm90MaxExperts) {
    return std::nullopt;
  }
  // W_e K-major (unit stride along k: w_nk [E, n, k] row-major) or MN-major (unit stride along n:
  // its transpose [E, k, n] row-major); any other strides take another engine.
  const bool k_major = k <= 1 || w_nk.stride(2) == 1;
  if (!k_major && n > 1 && w_nk.stride(1) != 1) return std::nullopt;
  kernels::GroupedGemmSm90Args args;
  args.x = cuda_ptr<at::BFloat16>(x);
  args.ldx = leading_dim(x, 0, k);
  args.w = cuda_ptr<at::BFloat16>(w_nk);
  args.w_mn_major = !k_major;
  args.ldw = k_major ? leading_dim(w_nk, 1, k) : leading_dim(w_nk, 2, n);
  args.w_stride_e = leading_dim(w_nk, 0, (k_major ? n : k) * args.ldw);
  args.num_rows = source.num_rows(x);
  args.k = k;
  args.n = n;
  args.num_experts = num_experts;
  args.expert_offsets = offsets.const_data_ptr<int32_t>();
  args.pipeline = requested_pipeline();  // the row-grouped kernel has all four
  if (source.gathered()) {
    args.sorted_pairs = source.sorted_pairs.const_data_ptr<int32_t>();
    args.num_tokens = x.size(0);
    args.top_k = source.top_k;
  }
  return args;
}

// The epilogue's operands as the kernel reads them (kept alive by the caller until the launch
// is queued): the bias with unit stride along n; u with unit stride along its rows, M_e [r, n]
// row-major - lora_A's rows as they are, the rank-major lora_B through an [E, r, n] copy (2 n r E
// bytes, as lora_expand_add_ makes).
struct EpilogueOperands {
  at::Tensor bias, u, m;
};

// Points args (outputs set, otherwise valid) at the bias and LoRA's operands, copying only after
// the dtype and rank checks; false where the kernel does not take them (dtype, rank; LoRA
// operands' strides and alignment).
bool set_epilogue_args(kernels::GroupedGemmSm90Args& args, const at::Tensor& bias,
                       const Sm90LoraExpand* lora, EpilogueOperands& keep) {
  if (bias.defined() && bias.scalar_type() != at::kBFloat16) return false;
  const int64_t rank = lora != nullptr ? lora->u.size(1) : 0;
  if (lora != nullptr &&
      (lora->u.scalar_type() != at::kBFloat16 || lora->lora_weight.scalar_type() != at::kBFloat16 ||
       rank % 8 != 0 || rank > kernels::kSm90MaxLoraRank)) {
    return false;
  }
  if (bias.defined()) {  // read as 4-byte pairs: a view the kernel cannot take is copied
    const bool fits = (bias.size(1) <= 1 || bias.stride(1) == 1) &&
                      (bias.size(0) <= 1 || bias.stride(0) % 8 == 0) &&
                      reinterpret_cast<uintptr_t>(bias.const_data_ptr()) % 16 == 0;
    keep.bias = fits ? bias : bias.clone(at::MemoryFormat::Contiguous);
    args.bias = cuda_ptr<at::BFloat16>(keep.bias);
    args.bias_stride_e = leading_dim(keep.bias, 0, args.n);
  }
  if (lora != nullptr) {
    const int64_t n = args.n, num_experts = args.num_experts;
    keep.u = as_rows(lora->u);
    keep.m = lora->rank_major ? lora->lora_weight.reshape({n, rank, num_experts})
                                    .permute({2, 1, 0})
                                    .contiguous()
                                    .reshape({num_experts * rank, n})
                              : as_rows(lora->lora_weight);
    args.lora_u = cuda_ptr<at::BFloat16>(keep.u);
    args.ld_lora_u = leading_dim(keep.u, 0, rank);
    args.lora_rank = rank;
    args.lora_m = cuda_ptr<at::BFloat16>(keep.m);
    args.ld_lora_m = leading_dim(keep.m, 0, n);
    args.lora_m_stride_e = rank * args.ld_lora_m;
    args.lora_scale = static_cast<float>(lora->scaling);
  }
  return kernels::grouped_gemm_sm90_args_valid(args);
}

// Launches args (outputs and epilogue set) and zeroes the rows of no expert in y (and a).
void launch_and_finish(const kernels::GroupedGemmSm90Args& args, const at::Tensor& offsets,
                       std::string_view op, cudaStream_t stream) {
  const at::Tensor ends = expert_row_ends(offsets, args.num_rows, op, stream);
  const int32_t* end = ends.const_data_ptr<int32_t>() + (ends.size(0) - 1);
  check_cuda(kernels::launch_grouped_gemm_sm90(args, stream), op);
  check_cuda(kernels::launch_zero_rows_from<__nv_bfloat16>(args.y, args.ldy, args.num_rows, args.n,
                                                           end, stream),
             op);
  if (args.a != nullptr) {  // rows of no expert: zero, as swiglu gives for zero h
    check_cuda(kernels::launch_zero_rows_from<__nv_bfloat16>(args.a, args.lda, args.num_rows,
                                                             args.n / 2, end, stream),
               op);
  }
}

}  // namespace

std::optional<at::Tensor> sm90_grouped_gemm(const at::Tensor& x_in, const RowSource& source,
                                            const at::Tensor& w_nk, const at::Tensor& offsets,
                                            const at::Tensor& bias, std::string_view op,
                                            cudaStream_t stream, const Sm90LoraExpand* lora) {
  if (!sm90_engine_requested()) return std::nullopt;  // before as_rows' copy
  const at::Tensor x = as_rows(x_in);
  std::optional<kernels::GroupedGemmSm90Args> args = sm90_args(x, source, w_nk, offsets, op);
  if (!args) return std::nullopt;
  at::Tensor out = at::empty({args->num_rows, args->n}, x.options());
  args->y = cuda_mutable_ptr<at::BFloat16>(out);
  args->ldy = args->n;
  // Alignment and multiples of 8 (the kernel's 16-byte copies): checked on the real pointers,
  // first without the epilogue's operands (no copy of them for a call that falls back anyway).
  EpilogueOperands keep;
  if (!kernels::grouped_gemm_sm90_args_valid(*args) ||
      !set_epilogue_args(*args, bias, lora, keep)) {
    return std::nullopt;
  }
  launch_and_finish(*args, offsets, op, stream);
  return out;
}

std::optional<std::tuple<at::Tensor, at::Tensor>> sm90_grouped_gemm_swiglu(
    const at::Tensor& x_in, const RowSource& source, const at::Tensor& gate_up_w_nk,
    const at::Tensor& offsets, const Sm90Glu& glu, const at::Tensor& bias,
    const Sm90LoraExpand* lora, std::string_view op, cudaStream_t stream) {
  if (!sm90_engine_requested()) return std::nullopt;  // before as_rows' copy
  const at::Tensor x = as_rows(x_in);
  std::optional<kernels::GroupedGemmSm90Args> args =
      sm90_args(x, source, gate_up_w_nk, offsets, op);
  if (!args) return std::nullopt;
  const int64_t rows = args->num_rows, inter = args->n / 2;
  at::Tensor h = at::empty({rows, args->n}, x.options());
  at::Tensor a = at::empty({rows, inter}, x.options());
  args->y = cuda_mutable_ptr<at::BFloat16>(h);
  args->ldy = args->n;
  args->a = cuda_mutable_ptr<at::BFloat16>(a);
  args->lda = inter;
  args->glu = glu.variant;
  args->glu_alpha = static_cast<float>(glu.alpha);
  args->glu_limit = static_cast<float>(glu.limit);
  EpilogueOperands keep;  // e.g. I % 8 != 0 falls back
  if (!kernels::grouped_gemm_sm90_args_valid(*args) ||
      !set_epilogue_args(*args, bias, lora, keep)) {
    return std::nullopt;
  }
  launch_and_finish(*args, offsets, op, stream);
  return std::make_tuple(h, a);
}

std::optional<at::Tensor> sm90_grouped_wgrad(const at::Tensor& first_in,
                                             const at::Tensor& second_in, const RowSource& source,
                                             bool gather_first, const at::Tensor& offsets,
                                             int64_t num_experts, std::string_view op,
                                             cudaStream_t stream) {
  if (!sm90_engine_requested()) return std::nullopt;
  require_sm90_kernel(op);
  if (first_in.scalar_type() != at::kBFloat16 ||
      num_experts > kernels::kGroupedGemmSm90MaxExperts) {
    return std::nullopt;
  }
  const at::Tensor first = as_rows(first_in), second = as_rows(second_in);
  const int64_t p = first.size(1), q = second.size(1);
  kernels::GroupedWgradSm90Args args;
  args.a = cuda_ptr<at::BFloat16>(first);
  args.lda = leading_dim(first, 0, p);
  args.b = cuda_ptr<at::BFloat16>(second);
  args.ldb = leading_dim(second, 0, q);
  args.num_rows =
      source.gathered() ? source.sorted_pairs.size(0) : (gather_first ? second : first).size(0);
  args.p = p;
  args.q = q;
  args.num_experts = num_experts;
  args.expert_offsets = offsets.const_data_ptr<int32_t>();
  const kernels::Sm90Pipeline pipeline = requested_pipeline();
  args.pipeline = pipeline == kernels::Sm90Pipeline::kWarpSpecializedWide
                      ? kernels::Sm90Pipeline::kWarpSpecialized  // the wgrad kernel's tiles
                      : pipeline;
  if (source.gathered()) {
    args.sorted_pairs = source.sorted_pairs.const_data_ptr<int32_t>();
    args.num_tokens = (gather_first ? first : second).size(0);
    args.top_k = source.top_k;
    (gather_first ? args.gather_a : args.gather_b) = true;
  }
  at::Tensor g = at::empty({num_experts, p, q}, first.options());
  args.g = cuda_mutable_ptr<at::BFloat16>(g);
  args.ldg = q;
  args.g_stride_e = p * q;
  if (!kernels::grouped_wgrad_sm90_args_valid(args)) return std::nullopt;
  check_cuda(kernels::launch_grouped_wgrad_sm90(args, stream), op);
  return g;
}

}  // namespace moeforge
