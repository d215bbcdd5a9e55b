// Built only when moeforge is compiled without CUDA (CPU-only torch, or no working nvcc): every
// op answers CUDA tensors with a clear error instead of the dispatcher's generic one.
#include <torch/library.h>

namespace moeforge {
namespace {

void no_cuda_kernels(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(
      false, "moeforge.", op.schema().name().substr(std::string("moeforge::").size()),
      ": this build of moeforge has no CUDA kernels (it was built with a CPU-only torch "
      "or without a working nvcc); reinstall with `pip install --no-build-isolation .` on a "
      "machine with a CUDA build of torch and the CUDA toolkit");
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  for (const char* name :
       {"routing", "permute", "combine", "routed_dot", "grouped_mm", "grouped_mm_backward",
        "grouped_mm_swiglu", "grouped_mm_lora", "swiglu", "swiglu_backward",
        "weighted_swiglu_backward", "weighted_swiglu_backward_", "expert_lora",
        "expert_lora_backward", "lora_expand_add_", "router_loss", "router_loss_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernels>());
  }
}

}  // namespace moeforge
