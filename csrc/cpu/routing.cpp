// CPU routing plan: a stable counting sort of the T*K (token, slot) pairs by expert id.
// O(S + E), deterministic; ids outside [0, E) are dropped and placed after every valid row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "validation.h"

namespace moeforge {
namespace {

template <typename index_t>
void build_plan(const index_t* ids, int64_t num_pairs, int64_t num_experts, int32_t* sorted_pairs,
                int32_t* pair_to_row, int32_t* offsets) {
  // counts[E] collects the dropped pairs so they land after every expert's rows.
  std::vector<int64_t> next(num_experts + 1, 0);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    ++next[(e >= 0 && e < num_experts) ? e : num_experts];
  }
  int64_t running = 0;
  for (int64_t e = 0; e <= num_experts; ++e) {
    offsets[e] = static_cast<int32_t>(running);
    const int64_t count = next[e];
    next[e] = running;
    running += count;
  }
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    const bool valid = e >= 0 && e < num_experts;
    const int64_t row = next[valid ? e : num_experts]++;
    sorted_pairs[row] = static_cast<int32_t>(p);
    pair_to_row[p] = valid ? static_cast<int32_t>(row) : -1;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_cpu(const at::Tensor& topk_ids,
                                                           int64_t num_experts) {
  check_routing_inputs(topk_ids, num_experts);
  const at::Tensor ids = topk_ids.contiguous();
  const auto opts = ids.options().dtype(at::kInt);
  at::Tensor sorted_pairs = at::empty({ids.numel()}, opts);
  at::Tensor pair_to_row = at::empty(ids.sizes(), opts);
  at::Tensor offsets = at::empty({num_experts + 1}, opts);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moeforge.routing", [&] {
    build_plan<index_t>(ids.data_ptr<index_t>(), ids.numel(), num_experts,
                        sorted_pairs.data_ptr<int32_t>(), pair_to_row.data_ptr<int32_t>(),
                        offsets.data_ptr<int32_t>());
  });
  return {sorted_pairs, pair_to_row, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("routing", &routing_cpu);
}

}  // namespace moeforge
