// CPU lora_expand_add_: out[i, :] += scaling * u[i, :] M_e for the rows i of expert e (see
// registration.cpp). The arithmetic of the SIMT kernel in kernels/lora_expand.cu step for step:
// the rank sum with fused multiply-adds in ascending j in the op-math type, then one fused
// multiply-add into out and one rounding, so CPU and that kernel agree bit for bit (16-bit types
// with widths a multiple of 8 run on tensor cores on sm80+ instead, which sum in their own order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>

#include "checks.h"
#include "validation.h"

namespace moeforge {
namespace {

// lora_weight as M [E, r, n], contiguous.
at::Tensor expert_major(const at::Tensor& lora_weight, int64_t rank, int64_t num_experts,
                        bool rank_major) {
  const int64_t n = rank_major ? lora_weight.size(0) : lora_weight.size(1);
  return rank_major ? lora_weight.reshape({n, rank, num_experts}).permute({2, 1, 0}).contiguous()
                    : lora_weight.reshape({num_experts, rank, n}).contiguous();
}

void lora_expand_add_cpu(at::Tensor out, const at::Tensor& u_in, const at::Tensor& lora_weight,
                         const at::Tensor& expert_offsets, double scaling, bool rank_major) {
  constexpr std::string_view op = "lora_expand_add_";
  const int64_t num_experts =
      check_lora_expand_add_inputs(out, u_in, lora_weight, expert_offsets, rank_major);
  check_offsets_values(op, expert_offsets, out.size(0));
  const int64_t rank = u_in.size(1), n = out.size(1);
  if (out.size(0) == 0 || n == 0) return;
  const at::Tensor u = u_in.contiguous();
  const at::Tensor m = expert_major(lora_weight, rank, num_experts, rank_major);
  const at::Tensor offs = expert_offsets.contiguous();
  const int32_t* o = offs.const_data_ptr<int32_t>();
  const int64_t ld_out = out.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "moeforge.lora_expand_add_", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* y = out.mutable_data_ptr<scalar_t>();
        const scalar_t* uu = u.const_data_ptr<scalar_t>();
        const scalar_t* mm = m.const_data_ptr<scalar_t>();
        const acc_t s = static_cast<acc_t>(scaling);
        for (int64_t e = 0; e < num_experts; ++e) {
          const scalar_t* me = mm + e * rank * n;
          at::parallel_for(o[e], o[e + 1], 16, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              for (int64_t c = 0; c < n; ++c) {
                acc_t acc = 0;
                for (int64_t j = 0; j < rank; ++j) {
                  acc = std::fma(static_cast<acc_t>(uu[i * rank + j]),
                                 static_cast<acc_t>(me[j * n + c]), acc);
                }
                scalar_t& dst = y[i * ld_out + c];
                dst = static_cast<scalar_t>(std::fma(s, acc, static_cast<acc_t>(dst)));
              }
            }
          });
        }
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("lora_expand_add_", &lora_expand_add_cpu);
}

}  // namespace moeforge
