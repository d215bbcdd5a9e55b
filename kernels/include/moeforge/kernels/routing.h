// Routing plan on the GPU: a stable sort of the S = T*K (token, slot) pairs of topk_ids [T, K] by
// expert id, the inverse map and per-expert offsets. Same semantics as csrc/cpu/routing.cpp:
//
//   sorted_pairs   [S]      int32  flat pair index p = t*K + k of each routed row; rows grouped by
//                                  expert in ascending expert order, ascending p within an expert;
//                                  dropped pairs (id < 0 or id >= E) last, also ascending p
//   pair_to_row    [T, K]   int32  row of pair p in sorted_pairs, -1 for a dropped pair
//   expert_offsets [E + 1]  int32  expert e owns rows [offsets[e], offsets[e+1]); offsets[0] = 0,
//                                  offsets[E] = number of valid (non-dropped) rows
//
// Torch-free: raw device pointers, a caller-provided workspace and a stream. No host
// synchronisation and no host decision on data (CUDA-graph capturable); deterministic.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moeforge::kernels {

// Bytes of device workspace that launch_routing needs for `num_pairs` (= T*K) pairs and
// `num_experts` experts, written into *bytes. Asks CUB for its temporary storage size, which
// depends on the current device: call it with the device of the launch current. Fails (without
// touching the stream) when CUB cannot query the device, e.g. when there is none.
cudaError_t routing_workspace_bytes(int64_t num_pairs, int64_t num_experts, size_t* bytes);

// Builds the routing plan of topk_ids on `stream`. Requires 0 <= num_pairs < 2^31 and
// 1 <= num_experts < 2^31 - 1 (checked: cudaErrorInvalidValue otherwise), and `workspace` of at
// least routing_workspace_bytes(num_pairs, num_experts) bytes (any alignment), used only on
// `stream`. num_pairs == 0 is valid (expert_offsets all zero). Returns the first CUDA error.
cudaError_t launch_routing(const int32_t* topk_ids,  // [T, K], num_pairs = T*K entries
                           int64_t num_pairs, int64_t num_experts,
                           int32_t* sorted_pairs,    // [S]
                           int32_t* pair_to_row,     // [T, K]
                           int32_t* expert_offsets,  // [E + 1]
                           void* workspace, size_t workspace_bytes, cudaStream_t stream);
cudaError_t launch_routing(const int64_t* topk_ids,  // [T, K], num_pairs = T*K entries
                           int64_t num_pairs, int64_t num_experts,
                           int32_t* sorted_pairs,    // [S]
                           int32_t* pair_to_row,     // [T, K]
                           int32_t* expert_offsets,  // [E + 1]
                           void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace moeforge::kernels
