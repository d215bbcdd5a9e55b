// CUDA routing plan: the glue around kernels/routing.cu (CUB radix sort). Same outputs as
// csrc/cpu/routing.cpp; no host synchronisation, so it can run inside a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda_utils.h"
#include "moeforge/kernels/routing.h"
#include "validation.h"

namespace moeforge {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_cuda(const at::Tensor& topk_ids,
                                                            int64_t num_experts) {
  check_routing_inputs(topk_ids, num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t num_pairs = ids.numel();
  const auto opts = ids.options().dtype(at::kInt);
  at::Tensor sorted_pairs = at::empty({num_pairs}, opts);
  at::Tensor pair_to_row = at::empty(ids.sizes(), opts);
  at::Tensor offsets = at::empty({num_experts + 1}, opts);

  size_t workspace_bytes = 0;
  check_cuda(kernels::routing_workspace_bytes(num_pairs, num_experts, &workspace_bytes), "routing");
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, ids.options().dtype(at::kByte));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moeforge.routing", [&] {
    check_cuda(kernels::launch_routing(ids.const_data_ptr<index_t>(), num_pairs, num_experts,
                                       sorted_pairs.mutable_data_ptr<int32_t>(),
                                       pair_to_row.mutable_data_ptr<int32_t>(),
                                       offsets.mutable_data_ptr<int32_t>(),
                                       workspace.mutable_data_ptr(), workspace_bytes, stream),
               "routing");
  });
  return {sorted_pairs, pair_to_row, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  m.impl("routing", &routing_cuda);
}

}  // namespace moeforge
