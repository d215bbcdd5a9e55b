// Every moeforge op schema, in one place. Notation: T tokens, K experts per token, E experts,
// S = T*K routed rows, H hidden, I expert intermediate size, r LoRA rank.
// Kernels are registered per backend in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp; fake (meta)
// kernels and autograd live in python/moeforge/ops.py.
#include <torch/library.h>

namespace {
// Whether this binary was compiled with the CUDA kernels (not whether a GPU is present).
bool built_with_cuda() {
#ifdef MOEFORGE_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(moeforge, m) {
  m.set_python_module("moeforge.ops");

  m.def("built_with_cuda() -> bool", &built_with_cuda);

  // Expert-sorted routing plan from topk_ids [T,K]: sorted_pairs [S] (flat pair t*K+k of each
  // row, stable, grouped by expert, dropped pairs last), pair_to_row [T,K] (-1 = dropped),
  // expert_offsets [E+1]. Ids < 0 or >= num_experts are dropped. All int32.
  m.def(
      "routing(Tensor topk_ids, int num_experts) -> (Tensor sorted_pairs, Tensor pair_to_row, "
      "Tensor expert_offsets)");

  // Gather tokens into expert order: out[row(t,k)] = w[t,k] * x[t]; dropped rows are zero.
  m.def(
      "permute(Tensor x, Tensor sorted_pairs, Tensor pair_to_row, Tensor? weights=None) -> Tensor");

  // Token-major weighted combine: out[t] = sum_k w[t,k] * y[row(t,k)]; no atomics.
  m.def(
      "combine(Tensor y, Tensor sorted_pairs, Tensor pair_to_row, Tensor? weights=None) -> Tensor");

  // Per-pair dot product: out[t,k] = <rows[row(t,k)], tokens[t]> (routing-weight gradients).
  m.def("routed_dot(Tensor rows, Tensor tokens, Tensor pair_to_row) -> Tensor");

  // Grouped GEMM: rows [offsets[e], offsets[e+1]) of x times expert e's weight (+ bias).
  // weight [E,out,in] (nn.Linear, y = x W^T) or, with weight_transposed, [E,in,out] (y = x W).
  // Rows >= offsets[E] (dropped) are zero. With the routing plan (sorted_pairs, pair_to_row),
  // x is token-major [T,in] and routed row r reads token sorted_pairs[r] / K: the permute fused
  // into the operand load (the output is still [S,out] in expert order).
  m.def(
      "grouped_mm(Tensor x, Tensor weight, Tensor expert_offsets, Tensor? bias=None, "
      "bool weight_transposed=False, Tensor? sorted_pairs=None, Tensor? pair_to_row=None) -> "
      "Tensor");

  // Backward of grouped_mm: (grad_x, grad_weight, grad_bias); an entry of output_mask that is
  // False skips that work and returns an empty tensor (frozen weights cost no dW GEMM). With the
  // plan, grad_weight reads x through it and grad_x is per routed row [S,in] (combine sums a
  // token's rows).
  m.def(
      "grouped_mm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor expert_offsets, "
      "bool weight_transposed, bool[3] output_mask, Tensor? sorted_pairs=None, "
      "Tensor? pair_to_row=None) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // An expert FFN's gate_up GEMM and its gated activation in one op: h = grouped_mm(x,
  // gate_up_proj, expert_offsets, bias, weight_transposed, plan) [S, 2I], with lora_u [S, r] and
  // lora_B [2I, r*E] then lora_expand_add_(h, lora_u, lora_B, expert_offsets, lora_scaling, True),
  // and a = swiglu(h, variant, alpha, limit) [S, I], exactly; under MOEFORGE_GROUPED_GEMM=sm90
  // (bfloat16) one kernel writes both.
  m.def(
      "grouped_mm_swiglu(Tensor x, Tensor gate_up_proj, Tensor expert_offsets, "
      "Tensor? sorted_pairs=None, Tensor? pair_to_row=None, Tensor? lora_u=None, "
      "Tensor? lora_B=None, float lora_scaling=1.0, Tensor? bias=None, "
      "bool weight_transposed=False, str variant=\"silu\", float alpha=1.702, float limit=7.0) "
      "-> (Tensor h, Tensor a)");
  // A grouped GEMM with LoRA's up-projection added into its output: y = grouped_mm(x, weight,
  // expert_offsets, bias, weight_transposed, plan), then lora_expand_add_(y, lora_u, lora_weight,
  // expert_offsets, lora_scaling, lora_rank_major), exactly; under MOEFORGE_GROUPED_GEMM=sm90
  // (bfloat16) one kernel, the bias and the add in the GEMM's epilogue. lora_u [S, r] is in
  // expert order (row i of y) also when x is read through the plan.
  m.def(
      "grouped_mm_lora(Tensor x, Tensor weight, Tensor expert_offsets, bool weight_transposed, "
      "Tensor lora_u, Tensor lora_weight, float lora_scaling, bool lora_rank_major, "
      "Tensor? sorted_pairs=None, Tensor? pair_to_row=None, Tensor? bias=None) -> Tensor");
  // Gated activation h [rows, 2I] -> a [rows, I]. variant "silu": HF layout, gate = h[:, :I],
  // up = h[:, I:], a = silu(gate) * up. "gpt_oss": gate = h[:, 0::2], up = h[:, 1::2],
  // gate = min(gate, limit), up = clamp(up, -limit, limit), a = (up + 1) * gate *
  // sigmoid(alpha*gate).
  m.def("swiglu(Tensor h, str variant=\"silu\", float alpha=1.702, float limit=7.0) -> Tensor");
  m.def(
      "swiglu_backward(Tensor grad_a, Tensor h, str variant=\"silu\", float alpha=1.702, "
      "float limit=7.0) -> Tensor");

  // Backward of the routing-weighted activation a_w = row_weights[:, None] * swiglu(h) (the fused
  // MoE layer folds each row's routing weight into its activation, so its backward needs neither
  // the expert outputs nor the activation itself): grad_h = dL/dh, grad_row_weights [rows] =
  // <grad_aw[r], swiglu(h[r])> in float32 (float64 for float64 h) and, when weighted_act is True,
  // the recomputed a_w for the down projection's weight gradient (else an empty tensor).
  m.def(
      "weighted_swiglu_backward(Tensor grad_aw, Tensor h, Tensor row_weights, "
      "str variant=\"silu\", float alpha=1.702, float limit=7.0, bool weighted_act=True) -> "
      "(Tensor grad_h, Tensor weighted_act, Tensor grad_row_weights)");

  // The same, with grad_h written over h (each element read before it is overwritten): the fused
  // layer's backward, where h is read for the last time, needs no second [rows, 2I] buffer. h
  // must be contiguous and share no memory with grad_aw or row_weights.
  m.def(
      "weighted_swiglu_backward_(Tensor(a!) h, Tensor grad_aw, Tensor row_weights, "
      "str variant=\"silu\", float alpha=1.702, float limit=7.0, bool weighted_act=True) -> "
      "(Tensor weighted_act, Tensor grad_row_weights)");
  // Split LoRA on routed rows, PEFT layout: lora_A [E*r, in] expert-major, lora_B [out, r*E]
  // rank-major. lora_u = x A_e^T [rows, r]; delta = scaling * lora_u B_e^T [rows, out].
  // Never forms B_e A_e. With the routing plan, x is token-major as for grouped_mm (and
  // grad_x per routed row); in the backward op, x_through_plan / grad_delta_through_plan say which
  // of x and grad_delta are token-major and read through it (at least one).
  m.def(
      "expert_lora(Tensor x, Tensor lora_A, Tensor lora_B, Tensor expert_offsets, float scaling, "
      "Tensor? sorted_pairs=None, Tensor? pair_to_row=None) -> (Tensor delta, Tensor lora_u)");
  m.def(
      "expert_lora_backward(Tensor grad_delta, Tensor x, Tensor lora_u, Tensor lora_A, "
      "Tensor lora_B, Tensor expert_offsets, float scaling, bool[3] output_mask, "
      "Tensor? sorted_pairs=None, Tensor? pair_to_row=None, bool x_through_plan=True, "
      "bool grad_delta_through_plan=False) -> (Tensor grad_x, Tensor grad_A, Tensor grad_B)");

  // LoRA's up-projection added in place: out[i] += scaling * u[i] M_e for the rows i of expert e
  // (rows of no expert untouched), M_e [r, n] from lora_weight: rank_major, PEFT's lora_B
  // [n, r*E] (M_e = B_e^T); else PEFT's lora_A [E*r, n] (M_e = A_e). The fused layer adds LoRA's
  // delta into the GEMM output (forward) or grad_x (backward) this way instead of writing it.
  m.def(
      "lora_expand_add_(Tensor(a!) out, Tensor u, Tensor lora_weight, Tensor expert_offsets, "
      "float scaling, bool rank_major) -> ()");

  // Fused router losses over all layers' logits [T,E] together (HF semantics): the load-balancing
  // loss E * sum_e (count_e / R) * (psum_e / R) and the z-loss mean(logsumexp^2), one pass.
  // row_mask [T] (flattened attention mask) excludes padding rows. expert_counts [E] int64.
  m.def(
      "router_loss(Tensor[] logits, Tensor? row_mask, int top_k) -> (Tensor aux_loss, "
      "Tensor z_loss, Tensor expert_counts)");
  m.def(
      "router_loss_backward(Tensor grad_aux, Tensor grad_z, Tensor[] logits, Tensor? row_mask, "
      "Tensor expert_counts, int top_k) -> Tensor[]");
}
