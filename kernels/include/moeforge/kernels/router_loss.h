// Fused router losses on the GPU (same semantics as csrc/cpu/router_loss.cpp): over the kept rows
// (row_mask != 0, or all rows) of every layer's logits [T_l, E]:
//
//   count_e = #kept rows whose top-k (by logit, ties to the lower index) holds e
//   psum_e  = sum of softmax(logits)_e;  zsum = sum of logsumexp(logits)^2;  R = #kept rows
//   aux = E * sum_e count_e * psum_e / R^2,  z = zsum / R   (both 0 when R == 0)
//
// No host synchronisation, deterministic (fixed-order reductions whose order depends on the
// shapes alone, no float atomics):
//   launch_router_stats(_layers)   per layer, or per batch of up to kRouterLayersPerLaunch layers
//                                  in one launch: per-block partial sums into `partials`
//   launch_router_finalize         once (two kernels): reduces all partials in double, writes
//                                  aux, z and counts
//   launch_router_loss_backward(_layers)  likewise: d(g_aux * aux + g_z * z) / d logits
// Element types: float, double, __half, __nv_bfloat16; losses and partials in acc_type_t.
// Limits: 1 <= top_k <= E <= kRouterMaxExperts (float64 logits with E near 1024 need 64 KB of
// shared memory: more than sm75 allows, fine on sm80+). NaN logits rank lowest in the top-k.
// E <= 256 with top_k <= 16 (float; half and bf16 with E even) takes a one-thread-per-row path,
// everything else one warp per row (router_loss.cu); which one depends on the shapes and the
// element type alone, never on pointers or the device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moeforge/kernels/numeric.h"

namespace moeforge::kernels {

constexpr int64_t kRouterMaxExperts = 1024;

// Blocks (and so rows of `partials`) that launch_router_stats uses for `num_tokens` rows of
// `num_experts` logits: one per 128 rows (E <= 256) or per 16 rows (larger E), up to a cap that
// keeps a layer's partials near 2^18 elements (1 MB of float, 2 MB of double).
int64_t router_stats_blocks(int64_t num_tokens, int64_t num_experts);
// Width of one row of `partials`: [count_0..E) [psum_0..E) [zsum] [kept].
inline int64_t router_partial_width(int64_t num_experts) {
  return 2 * num_experts + 2;
}

// Several layers in one launch (grid.y = layer): their logits [T_l, E] (and, for the backward,
// their gradients). All layers share E, top_k and the keep mask (which then needs equal T_l).
inline constexpr int kRouterLayersPerLaunch = 32;
template <typename scalar_t>
struct RouterLayers {
  const scalar_t* logits[kRouterLayersPerLaunch] = {};
  scalar_t* grad_logits[kRouterLayersPerLaunch] = {};  // backward only
  int64_t num_tokens[kRouterLayersPerLaunch] = {};
  int count = 0;  // in [0, kRouterLayersPerLaunch]
};

// Statistics of every layer in `layers` in one launch: layer l writes its
// router_stats_blocks(T_l, E) partial rows after those of layers 0..l-1, from `partials` on, the
// same rows launch_router_stats would write for it alone.
template <typename scalar_t>
cudaError_t launch_router_stats_layers(const RouterLayers<scalar_t>& layers,
                                       const uint8_t* keep,  // [T] or nullptr
                                       int64_t num_experts, int64_t top_k,
                                       acc_type_t<scalar_t>* partials, cudaStream_t stream);

// launch_router_loss_backward for every layer in `layers` (grad_logits[l] [T_l, E]) in one launch.
template <typename scalar_t>
cudaError_t launch_router_loss_backward_layers(const RouterLayers<scalar_t>& layers,
                                               const uint8_t* keep, const int64_t* counts,
                                               const acc_type_t<scalar_t>* grad_aux,
                                               const acc_type_t<scalar_t>* grad_z,
                                               int64_t num_experts, int64_t top_k,
                                               cudaStream_t stream);

template <typename scalar_t>
cudaError_t launch_router_stats(
    const scalar_t* logits,  // [T, E]
    const uint8_t* keep,     // [T] or nullptr (keep all)
    int64_t num_tokens, int64_t num_experts, int64_t top_k,
    acc_type_t<scalar_t>* partials,  // [router_stats_blocks(T, E), width]
    cudaStream_t stream);

// Doubles of device scratch that launch_router_finalize needs for `num_partials` rows of
// partials (at most 16 rows of width router_partial_width; 0 when num_partials == 0).
int64_t router_finalize_workspace_elems(int64_t num_partials, int64_t num_experts);

// Reduces `num_partials` rows of partials: column sums in double over fixed contiguous chunks of
// rows (into `workspace`), then over the chunks in order. aux, z: device scalars; counts [E]
// int64. workspace: router_finalize_workspace_elems(num_partials, E) doubles on the device (may be
// nullptr only when num_partials == 0), overwritten.
template <typename acc_t>
cudaError_t launch_router_finalize(const acc_t* partials,  // [num_partials, width]
                                   int64_t num_partials, int64_t num_experts, acc_t* aux, acc_t* z,
                                   int64_t* counts, double* workspace, cudaStream_t stream);

// grad_aux, grad_z: device scalars (the incoming gradients of aux and z); counts from the forward.
template <typename scalar_t>
cudaError_t launch_router_loss_backward(const scalar_t* logits,  // [T, E]
                                        const uint8_t* keep,     // [T] or nullptr
                                        const int64_t* counts,   // [E]
                                        const acc_type_t<scalar_t>* grad_aux,
                                        const acc_type_t<scalar_t>* grad_z,
                                        scalar_t* grad_logits,  // [T, E]
                                        int64_t num_tokens, int64_t num_experts, int64_t top_k,
                                        cudaStream_t stream);

}  // namespace moeforge::kernels
