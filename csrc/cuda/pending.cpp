// CUDA builds: the ops whose CUDA kernels have not landed yet answer CUDA tensors with a clear
// error instead of the dispatcher's generic "could not run ... with arguments from the 'CUDA'
// backend". When an op's kernel lands (csrc/cuda/<op>.cpp with its own TORCH_LIBRARY_IMPL),
// delete its line from kPendingOps.
#include <torch/library.h>

#include <string>

namespace moeforge {
namespace {

// One line per op, so that landing a kernel is a one-line change.
// clang-format off
constexpr const char* kPendingOps[] = {
    "grouped_mm",
    "grouped_mm_backward",
    "expert_lora",
    "expert_lora_backward",
};
// clang-format on

void no_cuda_kernel_yet(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, "moeforge.", op.schema().name().substr(std::string("moeforge::").size()),
              ": no CUDA kernel yet in this version of moeforge (CPU tensors work; CUDA kernels "
              "for this op are tracked in issue #3)");
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CUDA, m) {
  for (const char* name : kPendingOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernel_yet>());
  }
}

}  // namespace moeforge
