// CUDA fused router losses: the glue around kernels/router_loss.cu. Same semantics and
// validation as csrc/cpu/router_loss.cpp. One stats launch per 32 layers writes their rows of a
// shared partial-sum buffer; one finalize call (two kernels, through a small double workspace)
// reduces them: no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda_utils.h"
#include "moeforge/kernels/router_loss.h"
#include "validation.h"

namespace moeforge {
namespace {

// [T] uint8 keep flags (mask != 0) on the logits' device, or undefined.
at::Tensor keep_flags(const std::optional<at::Tensor>& row_mask) {
  return row_mask.has_value() ? row_mask->ne(0).to(at::kByte).contiguous() : at::Tensor();
}

// Each layer's logits, contiguous (kept alive until the launches that read them are queued).
std::vector<at::Tensor> contiguous_layers(at::TensorList logits) {
  std::vector<at::Tensor> out;
  out.reserve(logits.size());
  for (const auto& layer : logits) out.push_back(layer.contiguous());
  return out;
}

// Layers [first, first + kRouterLayersPerLaunch) of `layers` (and their gradients when `grads`
// is not empty) as one launch's batch.
template <typename scalar_t>
kernels::RouterLayers<cuda_type_t<scalar_t>> layer_batch(const std::vector<at::Tensor>& layers,
                                                         std::vector<at::Tensor>& grads,
                                                         size_t first) {
  kernels::RouterLayers<cuda_type_t<scalar_t>> batch;
  for (size_t l = first; l < layers.size() && batch.count < kernels::kRouterLayersPerLaunch;
       ++l, ++batch.count) {
    batch.logits[batch.count] = cuda_ptr<scalar_t>(layers[l]);
    if (!grads.empty()) batch.grad_logits[batch.count] = cuda_mutable_ptr<scalar_t>(grads[l]);
    batch.num_tokens[batch.count] = layers[l].size(0);
  }
  return batch;
}

const uint8_t* keep_ptr(const at::Tensor& keep) {
  return keep.defined() ? keep.const_data_ptr<uint8_t>() : nullptr;
}

void check_expert_limit(std::string_view op, int64_t num_experts) {
  MOEFORGE_CHECK_VALUE(num_experts <= kernels::kRouterMaxExperts, op,
                       "the CUDA kernel supports num_experts <= ", kernels::kRouterMaxExperts,
                       ", got ", num_experts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_loss_cuda(
    at::TensorList logits, const std::optional<at::Tensor>& row_mask, int64_t top_k) {
  check_router_loss_inputs("router_loss", logits, row_mask, top_k);
  const int64_t num_experts = logits[0].size(1);
  check_expert_limit("router_loss", num_experts);
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor keep = keep_flags(row_mask);
  int64_t num_partials = 0;
  for (const auto& layer : logits)
    num_partials += kernels::router_stats_blocks(layer.size(0), num_experts);
  const int64_t width = kernels::router_partial_width(num_experts);
  at::Tensor aux, z;
  const at::Tensor counts = at::empty({num_experts}, logits[0].options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits[0].scalar_type(), "moeforge.router_loss", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto acc_opts = logits[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value);
        at::Tensor partials = at::empty({num_partials, width}, acc_opts);
        // Up to kRouterLayersPerLaunch layers per launch; each batch's partial rows follow the
        // previous batch's.
        const std::vector<at::Tensor> layers = contiguous_layers(logits);
        std::vector<at::Tensor> no_grads;
        int64_t row = 0;
        for (size_t first = 0; first < layers.size(); first += kernels::kRouterLayersPerLaunch) {
          const auto batch = layer_batch<scalar_t>(layers, no_grads, first);
          check_cuda(kernels::launch_router_stats_layers(
                         batch, keep_ptr(keep), num_experts, top_k,
                         partials.mutable_data_ptr<acc_t>() + row * width, stream),
                     "router_loss");
          for (int l = 0; l < batch.count; ++l) {
            row += kernels::router_stats_blocks(batch.num_tokens[l], num_experts);
          }
        }
        aux = at::empty({}, acc_opts);
        z = at::empty({}, acc_opts);
        at::Tensor workspace =
            at::empty({kernels::router_finalize_workspace_elems(num_partials, num_experts)},
                      logits[0].options().dtype(at::kDouble));
        check_cuda(kernels::launch_router_finalize(partials.const_data_ptr<acc_t>(), num_partials,
                                                   num_experts, aux.mutable_data_ptr<acc_t>(),
                                                   z.mutable_data_ptr<acc_t>(),
                                                   counts.mutable_data_ptr<int64_t>(),
                                                   workspace.mutable_data_ptr<double>(), stream),
                   "router_loss");
      });
  return {aux, z, counts};
}

std::vector<at::Tensor> router_loss_backward_cuda(const at::Tensor& grad_aux,
                                                  const at::Tensor& grad_z, at::TensorList logits,
                                                  const std::optional<at::Tensor>& row_mask,
                                                  const at::Tensor& expert_counts, int64_t top_k) {
  constexpr std::string_view op = "router_loss_backward";
  check_router_loss_inputs(op, logits, row_mask, top_k);
  const int64_t num_experts = logits[0].size(1);
  check_expert_limit(op, num_experts);
  MOEFORGE_CHECK_VALUE(expert_counts.dim() == 1 && expert_counts.size(0) == num_experts, op,
                       "expert_counts must be [num_experts] = [", num_experts, "], got ",
                       expert_counts.sizes());
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor keep = keep_flags(row_mask);
  const at::Tensor counts = expert_counts.to(logits[0].device(), at::kLong).contiguous();
  std::vector<at::Tensor> grads;
  grads.reserve(logits.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits[0].scalar_type(), "moeforge.router_loss_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto acc = c10::CppTypeToScalarType<acc_t>::value;
        const at::Tensor ga = grad_aux.to(logits[0].device(), acc).contiguous();
        const at::Tensor gz = grad_z.to(logits[0].device(), acc).contiguous();
        const std::vector<at::Tensor> layers = contiguous_layers(logits);
        for (const auto& layer : layers) grads.push_back(at::empty_like(layer));
        for (size_t first = 0; first < layers.size(); first += kernels::kRouterLayersPerLaunch) {
          const auto batch = layer_batch<scalar_t>(layers, grads, first);
          check_cuda(kernels::launch_router_loss_backward_layers(
                         batch, keep_ptr(keep), counts.const_data_ptr<int64_t>(),
                         ga.const_data_ptr<acc_t>(), gz.const_data_ptr<acc_t>(), num_experts, top_k,
                         stream),
                     op);
        }
      });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("router_loss", &router_loss_cuda);
  m.impl("router_loss_backward", &router_loss_backward_cuda);
}

}  // namespace moeforge
