// The gated activations of MoE expert FFNs and their derivatives, as scalar functions shared by
// the CPU kernels (csrc/cpu) and the CUDA kernels (kernels/). Arithmetic in `T` = float or double.
//
//   silu    (HF Qwen/Mixtral/OLMoE/DeepSeek): a = silu(g) * u = g * sigmoid(g) * u
//   gpt_oss (clamped):  g' = min(g, limit), u' = clamp(u, -limit, limit),
//                       a = (u' + 1) * g' * sigmoid(alpha * g')
// Gradients through the clamps pass where the input lies inside the closed interval and are zero
// outside it. Exactly at a bound the derivative is a choice of subgradient: torch 2.15's clamp
// backward (what HF's gpt-oss autograd uses there) passes nothing at the bound itself, so gradients
// differ from HF's for inputs equal to +-limit (and only for those).
#pragma once

#include <cmath>

#include "moeforge/kernels/host_device.h"

namespace moeforge::kernels {

template <typename T>
MOEFORGE_HOST_DEVICE T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
MOEFORGE_HOST_DEVICE T silu_glu(T gate, T up) {
  return gate * sigmoid(gate) * up;
}

// d a / d gate and d a / d up for silu_glu, written into *dg and *du (scaled by grad).
template <typename T>
MOEFORGE_HOST_DEVICE void silu_glu_backward(T grad, T gate, T up, T* dg, T* du) {
  const T s = sigmoid(gate);
  const T silu = gate * s;
  *du = grad * silu;
  *dg = grad * up * (s + silu * (T(1) - s));
}

template <typename T>
MOEFORGE_HOST_DEVICE T gpt_oss_glu(T gate, T up, T alpha, T limit) {
  const T g = gate > limit ? limit : gate;
  const T u = up > limit ? limit : (up < -limit ? -limit : up);
  return (u + T(1)) * g * sigmoid(alpha * g);
}

template <typename T>
MOEFORGE_HOST_DEVICE void gpt_oss_glu_backward(T grad, T gate, T up, T alpha, T limit, T* dg,
                                               T* du) {
  const T g = gate > limit ? limit : gate;
  const T u = up > limit ? limit : (up < -limit ? -limit : up);
  const T s = sigmoid(alpha * g);
  const T glu = g * s;
  *du = (up >= -limit && up <= limit) ? grad * glu : T(0);
  *dg = gate <= limit ? grad * (u + T(1)) * (s + alpha * glu * (T(1) - s)) : T(0);
}

// Both at once for one element of either variant (gpt_oss when `gpt_oss`): returns a, writes
// grad * da/dgate and grad * da/dup. The weighted backward's per-element step, shared by its CPU
// op and both CUDA kernels, so their values agree by construction.
template <typename T>
MOEFORGE_HOST_DEVICE T glu_with_backward(bool gpt_oss, T grad, T gate, T up, T alpha, T limit,
                                         T* dg, T* du) {
  if (gpt_oss) {
    gpt_oss_glu_backward(grad, gate, up, alpha, limit, dg, du);
    return gpt_oss_glu(gate, up, alpha, limit);
  }
  silu_glu_backward(grad, gate, up, dg, du);
  return silu_glu(gate, up);
}

}  // namespace moeforge::kernels
