"""Typed wrappers, fake (meta) kernels and autograd for the ``torch.ops.moeforge`` operators.

Notation: T tokens, K experts per token (top-k), E experts, S = T*K routed rows, H hidden size,
I expert intermediate size, r LoRA rank. Routed rows are in *expert order*: rows
``expert_offsets[e]:expert_offsets[e+1]`` belong to expert e; rows past ``expert_offsets[E]``
belong to dropped pairs (expert id < 0 or >= E) and are zero everywhere.

Every op's kernels (CPU and CUDA) live in C++; this module only registers what torch needs in
Python: fake kernels for ``torch.compile`` and autograd formulas whose backward calls our own
backward ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from moeforge import _library

_library.load()
_ops = torch.ops.moeforge

__all__ = [
    "RoutingPlan",
    "combine",
    "expert_lora",
    "grouped_mm",
    "grouped_mm_lora",
    "grouped_mm_swiglu",
    "permute",
    "router_loss",
    "routing",
    "swiglu",
    "weighted_swiglu_backward",
    "weighted_swiglu_backward_",
]


class RoutingPlan(NamedTuple):
    """Expert-sorted routing metadata made by :func:`routing` (all int32, same device as ids).

    Attributes:
        sorted_pairs: ``[S]`` flat pair index ``t*K + k`` of each routed row, grouped by expert
            (stable), dropped pairs last.
        pair_to_row: ``[T, K]`` routed row of each (token, slot) pair; -1 for dropped pairs.
        expert_offsets: ``[E + 1]`` row offsets; ``expert_offsets[E]`` = number of kept rows.
    """

    sorted_pairs: Tensor
    pair_to_row: Tensor
    expert_offsets: Tensor

    @property
    def tokens_per_expert(self) -> Tensor:
        """``[E]`` number of rows routed to each expert."""
        return self.expert_offsets.diff()


# ------------------------------------------------------------------------------------------
# routing
# ------------------------------------------------------------------------------------------


def routing(topk_ids: Tensor, num_experts: int) -> RoutingPlan:
    """Sort the (token, slot) pairs of ``topk_ids [T, K]`` (int32/int64) by expert.

    Ids outside ``[0, num_experts)`` are dropped rows (HF's expert-parallel sentinels). No host
    synchronisation on CUDA, deterministic.
    """
    return RoutingPlan(*_ops.routing(topk_ids, num_experts))


@torch.library.register_fake("moeforge::routing")
def _routing_fake(topk_ids: Tensor, num_experts: int):
    return (
        topk_ids.new_empty(topk_ids.numel(), dtype=torch.int32),
        topk_ids.new_empty(topk_ids.shape, dtype=torch.int32),
        topk_ids.new_empty(num_experts + 1, dtype=torch.int32),
    )


# ------------------------------------------------------------------------------------------
# permute / combine / routed_dot
# ------------------------------------------------------------------------------------------


def permute(x: Tensor, plan: RoutingPlan, weights: Tensor | None = None) -> Tensor:
    """Gather token rows into expert order: ``out[row(t,k)] = w[t,k] * x[t]``.

    Args:
        x: ``[T, H]`` token activations.
        plan: from :func:`routing`.
        weights: optional ``[T, K]`` per-pair scale (any float dtype).

    Returns:
        ``[S, H]`` in ``x.dtype``; dropped rows are zero.
    """
    return _ops.permute(x, plan.sorted_pairs, plan.pair_to_row, weights)


def combine(y: Tensor, plan: RoutingPlan, weights: Tensor | None = None) -> Tensor:
    """Token-major weighted sum of expert outputs: ``out[t] = sum_k w[t,k] * y[row(t,k)]``.

    Args:
        y: ``[S, H]`` expert outputs in expert order.
        plan: from :func:`routing`.
        weights: optional ``[T, K]`` routing weights (fp32 or the dtype of y).

    Returns:
        ``[T, H]`` in ``y.dtype``; accumulated in fp32, deterministic (no atomics).
    """
    return _ops.combine(y, plan.sorted_pairs, plan.pair_to_row, weights)


@torch.library.register_fake("moeforge::permute")
def _permute_fake(x, sorted_pairs, pair_to_row, weights=None):
    return x.new_empty(sorted_pairs.shape[0], x.shape[1])


@torch.library.register_fake("moeforge::combine")
def _combine_fake(y, sorted_pairs, pair_to_row, weights=None):
    return y.new_empty(pair_to_row.shape[0], y.shape[1])


@torch.library.register_fake("moeforge::routed_dot")
def _routed_dot_fake(rows, tokens, pair_to_row):
    return rows.new_empty(pair_to_row.shape[0], pair_to_row.shape[1])


def _permute_setup(ctx, inputs, output):
    x, sorted_pairs, pair_to_row, weights = inputs
    weights_need_grad = weights is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(sorted_pairs, pair_to_row, weights, x if weights_need_grad else None)


def _permute_backward(ctx, grad):
    sorted_pairs, pair_to_row, weights, x = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.combine(grad, sorted_pairs, pair_to_row, weights)
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = _ops.routed_dot(grad, x, pair_to_row).to(weights.dtype)
    return grad_x, None, None, grad_w


def _combine_setup(ctx, inputs, output):
    y, sorted_pairs, pair_to_row, weights = inputs
    weights_need_grad = weights is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(sorted_pairs, pair_to_row, weights, y if weights_need_grad else None)


def _combine_backward(ctx, grad):
    sorted_pairs, pair_to_row, weights, y = ctx.saved_tensors
    grad_y = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_y = _ops.permute(grad, sorted_pairs, pair_to_row, weights)
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = _ops.routed_dot(y, grad.to(y.dtype), pair_to_row).to(weights.dtype)
    return grad_y, None, None, grad_w


torch.library.register_autograd(
    "moeforge::permute", _permute_backward, setup_context=_permute_setup
)
torch.library.register_autograd(
    "moeforge::combine", _combine_backward, setup_context=_combine_setup
)


# ------------------------------------------------------------------------------------------
# grouped_mm
# ------------------------------------------------------------------------------------------


def grouped_mm(
    x: Tensor,
    weight: Tensor,
    expert_offsets: Tensor,
    bias: Tensor | None = None,
    weight_transposed: bool = False,
    plan: RoutingPlan | None = None,
) -> Tensor:
    """Per-expert GEMM over expert-sorted rows.

    Args:
        x: ``[S, in]`` rows in expert order or, with ``plan``, token-major ``[T, in]``: routed
            row r then reads token ``plan.sorted_pairs[r] // K`` (the permute fused into the
            GEMM's operand load; the ``[S, in]`` copy is never made).
        weight: ``[E, out, in]`` (nn.Linear / HF layout, ``y = x W^T``) or, with
            ``weight_transposed``, ``[E, in, out]`` (gpt-oss layout, ``y = x W``).
        expert_offsets: ``[E + 1]`` int32 from :func:`routing`.
        bias: optional ``[E, out]``.
        plan: optional routing plan (see ``x``); the gradient of ``x`` then sums each token's
            routed rows (:func:`combine`).

    Returns:
        ``[S, out]`` in expert order; rows past ``expert_offsets[E]`` are zero. fp32
        accumulation.
    """
    pairs, rows = (plan.sorted_pairs, plan.pair_to_row) if plan is not None else (None, None)
    return _ops.grouped_mm(x, weight, expert_offsets, bias, weight_transposed, pairs, rows)


@torch.library.register_fake("moeforge::grouped_mm")
def _grouped_mm_fake(
    x,
    weight,
    expert_offsets,
    bias=None,
    weight_transposed=False,
    sorted_pairs=None,
    pair_to_row=None,
):
    num_rows = sorted_pairs.shape[0] if sorted_pairs is not None else x.shape[0]
    return x.new_empty(num_rows, weight.shape[2 if weight_transposed else 1])


@torch.library.register_fake("moeforge::grouped_mm_backward")
def _grouped_mm_backward_fake(
    grad_out,
    x,
    weight,
    expert_offsets,
    weight_transposed,
    output_mask,
    sorted_pairs=None,
    pair_to_row=None,
):
    out_features = weight.shape[2 if weight_transposed else 1]
    return (  # masked-off outputs: distinct empty tensors, as the kernels return
        x.new_empty(grad_out.shape[0], x.shape[1]) if output_mask[0] else x.new_empty(0),
        weight.new_empty(weight.shape) if output_mask[1] else x.new_empty(0),
        x.new_empty(weight.shape[0], out_features) if output_mask[2] else x.new_empty(0),
    )


def _grouped_mm_setup(ctx, inputs, output):
    x, weight, expert_offsets, bias, weight_transposed, sorted_pairs, pair_to_row = inputs
    ctx.weight_transposed = weight_transposed
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, expert_offsets, sorted_pairs, pair_to_row)


def _grouped_mm_backward(ctx, grad):
    x, weight, expert_offsets, sorted_pairs, pair_to_row = ctx.saved_tensors
    mask = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.has_bias and ctx.needs_input_grad[3],
    ]
    if not any(mask):
        return None, None, None, None, None, None, None
    grad_x, grad_w, grad_b = _ops.grouped_mm_backward(
        grad, x, weight, expert_offsets, ctx.weight_transposed, mask, sorted_pairs, pair_to_row
    )
    if mask[0] and sorted_pairs is not None:  # per routed row -> per token
        grad_x = _ops.combine(grad_x, sorted_pairs, pair_to_row, None)
    return (
        grad_x if mask[0] else None,
        grad_w if mask[1] else None,
        None,
        grad_b if mask[2] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "moeforge::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup
)


# ------------------------------------------------------------------------------------------
# grouped_mm_swiglu
# ------------------------------------------------------------------------------------------


def grouped_mm_swiglu(
    x: Tensor,
    gate_up_proj: Tensor,
    expert_offsets: Tensor,
    plan: RoutingPlan | None = None,
    *,
    bias: Tensor | None = None,
    weight_transposed: bool = False,
    variant: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    lora_u: Tensor | None = None,
    lora_B: Tensor | None = None,
    lora_scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """An expert FFN's gate_up GEMM and its gated activation in one op, optionally with the
    gate_up adapter's LoRA up-projection added into ``h`` between them.

    Exactly ``h = grouped_mm(x, gate_up_proj, expert_offsets, bias, weight_transposed, plan)``,
    then (with ``lora_u``) ``lora_expand_add_(h, lora_u, lora_B, expert_offsets, lora_scaling,
    True)``, and ``a = swiglu(h, variant, alpha, limit)``; under ``MOEFORGE_GROUPED_GEMM=sm90``
    (bfloat16, compute capability 9.0) one kernel writes both, the bias, the LoRA add and the
    activation computed in the GEMM's epilogue from the rounded ``h`` (the same rounding rules;
    ``a`` is bitwise ``swiglu(h)``), with the rows gathered through ``plan`` in its loads.

    Args:
        x: ``[S, H]`` rows in expert order or, with ``plan``, token-major ``[T, H]``.
        gate_up_proj: ``[E, 2I, H]`` (HF: gate rows ``[0, I)``, then up rows) or, with
            ``weight_transposed``, ``[E, H, 2I]`` (gpt-oss: gate / up interleaved, ``variant=
            "gpt_oss"``).
        expert_offsets: ``[E + 1]`` int32 from :func:`routing`.
        plan: optional routing plan (as for :func:`grouped_mm`).
        bias: optional ``[E, 2I]``.
        variant, alpha, limit: the activation (as for :func:`swiglu`).
        lora_u: optional ``[S, r]`` adapter intermediate ``x A_e^T`` in expert order.
        lora_B: PEFT's ``[2I, r*E]`` (rank-major), with ``lora_u``.
        lora_scaling: the adapter's scaling.

    Returns:
        ``(h [S, 2I], a [S, I])``; rows past ``expert_offsets[E]`` are zero in both.
    """
    pairs, rows = (plan.sorted_pairs, plan.pair_to_row) if plan is not None else (None, None)
    return _ops.grouped_mm_swiglu(
        x, gate_up_proj, expert_offsets, pairs, rows, lora_u, lora_B, lora_scaling, bias,
        weight_transposed, variant, alpha, limit,
    )  # fmt: skip


@torch.library.register_fake("moeforge::grouped_mm_swiglu")
def _grouped_mm_swiglu_fake(
    x,
    gate_up_proj,
    expert_offsets,
    sorted_pairs=None,
    pair_to_row=None,
    lora_u=None,
    lora_B=None,
    lora_scaling=1.0,
    bias=None,
    weight_transposed=False,
    variant="silu",
    alpha=1.702,
    limit=7.0,
):
    num_rows = sorted_pairs.shape[0] if sorted_pairs is not None else x.shape[0]
    two_inter = gate_up_proj.shape[2 if weight_transposed else 1]
    return x.new_empty(num_rows, two_inter), x.new_empty(num_rows, two_inter // 2)


def _grouped_mm_swiglu_setup(ctx, inputs, output):
    x, gate_up_proj, offsets, pairs, rows, lora_u, lora_B, scaling, bias = inputs[:9]
    ctx.lora_scaling, ctx.has_bias = scaling, bias is not None
    ctx.weight_transposed, ctx.variant, ctx.alpha, ctx.limit = inputs[9:]
    ctx.save_for_backward(x, gate_up_proj, offsets, pairs, rows, output[0], lora_u, lora_B)


def _grouped_mm_swiglu_backward(ctx, grad_h, grad_a):
    x, gate_up_proj, offsets, pairs, rows, h, lora_u, lora_B = ctx.saved_tensors
    nothing = (None,) * 13
    needs = ctx.needs_input_grad
    need_bias = ctx.has_bias and needs[8]
    if not (needs[0] or needs[1] or needs[5] or needs[6] or need_bias):
        return nothing
    if grad_h is None and grad_a is None:
        return nothing
    grad = None
    if grad_a is not None:
        grad = _ops.swiglu_backward(grad_a, h, ctx.variant, ctx.alpha, ctx.limit)
    if grad_h is not None:
        grad = grad_h if grad is None else grad + grad_h
    grad_x, grad_w, grad_b = _grouped_mm_input_grads(
        grad, x, gate_up_proj, offsets, ctx.weight_transposed, (needs[0], needs[1], need_bias),
        pairs, rows,
    )  # fmt: skip
    grad_u = grad_B = None
    if lora_u is not None and (needs[5] or needs[6]):
        grad_u, grad_B = _lora_expand_grads(
            grad, lora_u, lora_B, offsets, ctx.lora_scaling, True, needs[5], needs[6]
        )
    return grad_x, grad_w, None, None, None, grad_u, grad_B, None, grad_b, None, None, None, None


torch.library.register_autograd(
    "moeforge::grouped_mm_swiglu",
    _grouped_mm_swiglu_backward,
    setup_context=_grouped_mm_swiglu_setup,
)


def _grouped_mm_input_grads(
    grad, x, weight, expert_offsets, weight_transposed, needs, sorted_pairs, pair_to_row
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_x, grad_weight, grad_bias) of ``grouped_mm(x, weight, ...)`` for the
    ``needs = (x, weight, bias)`` asked for (None for the rest); grad_x per token where x was read
    through the plan."""
    if not any(needs):
        return None, None, None
    grad_x, grad_w, grad_b = _ops.grouped_mm_backward(
        grad, x, weight, expert_offsets, weight_transposed, list(needs), sorted_pairs, pair_to_row
    )
    if needs[0] and sorted_pairs is not None:  # per routed row -> per token
        grad_x = _ops.combine(grad_x, sorted_pairs, pair_to_row, None)
    return tuple(g if need else None for g, need in zip((grad_x, grad_w, grad_b), needs))


def _lora_expand_grads(
    grad: Tensor,
    u: Tensor,
    lora_weight: Tensor,
    expert_offsets: Tensor,
    scaling: float,
    rank_major: bool,
    need_u: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the term ``out += scaling * u M_e`` (``lora_expand_add_``) from the output
    gradient ``grad [S, n]``: ``grad_u = scaling * grad M_e^T`` ``[S, r]`` and ``grad_M_e =
    scaling * u_e^T grad_e`` in lora_weight's layout (M_e = B_e^T of a rank-major lora_B
    ``[n, r*E]``, or A_e of lora_A ``[E*r, n]``)."""
    num_experts, rank, n = expert_offsets.shape[0] - 1, u.shape[1], grad.shape[1]
    m = (  # M_e stacked: [E, r, n]
        lora_weight.reshape(n, rank, num_experts).permute(2, 1, 0)
        if rank_major
        else lora_weight.reshape(num_experts, rank, n)
    )
    grad_u = grad_weight = None
    if need_u:  # grad M_e^T: a grouped GEMM with M as the [E, out=r, in=n] weight
        grad_u = _ops.grouped_mm(grad, m.contiguous(), expert_offsets, None, False) * scaling
    if need_weight:  # M_e's gradient as the weight gradient of that GEMM, s u in grad's place
        mask = [False, True, False]
        _, g, _ = _ops.grouped_mm_backward(u * scaling, grad, m, expert_offsets, False, mask)
        grad_weight = (
            g.permute(2, 1, 0).reshape(n, rank * num_experts)
            if rank_major
            else g.reshape(num_experts * rank, n)
        )
    return grad_u, grad_weight


# ------------------------------------------------------------------------------------------
# grouped_mm_lora
# ------------------------------------------------------------------------------------------


def grouped_mm_lora(
    x: Tensor,
    weight: Tensor,
    expert_offsets: Tensor,
    lora_u: Tensor,
    lora_weight: Tensor,
    lora_scaling: float,
    *,
    lora_rank_major: bool = True,
    weight_transposed: bool = False,
    bias: Tensor | None = None,
    plan: RoutingPlan | None = None,
) -> Tensor:
    """A grouped GEMM with LoRA's up-projection added into its output, in one op.

    Exactly ``y = grouped_mm(x, weight, expert_offsets, bias, weight_transposed, plan)`` then
    ``lora_expand_add_(y, lora_u, lora_weight, expert_offsets, lora_scaling,
    lora_rank_major)``: ``y[i] += lora_scaling * lora_u[i] M_e`` on the rows of expert e. Under
    ``MOEFORGE_GROUPED_GEMM=sm90`` (bfloat16, compute capability 9.0, rank a multiple of 8 up to
    64) one kernel: the bias and the add in the GEMM's epilogue on the rounded output (the same
    rounding rules), so ``y`` is written once.

    Args:
        x: ``[S, in]`` rows in expert order or, with ``plan``, token-major ``[T, in]``.
        weight: ``[E, out, in]`` or, with ``weight_transposed``, ``[E, in, out]``.
        expert_offsets: ``[E + 1]`` int32 from :func:`routing`.
        lora_u: ``[S, r]`` in expert order (also when x is read through ``plan``).
        lora_weight: ``lora_rank_major``: PEFT's lora_B ``[out, r*E]`` (M_e = B_e^T, the
            forward); else PEFT's lora_A ``[E*r, out]`` (M_e = A_e, an input's gradient).
        lora_scaling: the adapter's scaling.
        bias: optional ``[E, out]``, added before LoRA's up-projection.

    Returns:
        ``[S, out]`` in expert order; rows past ``expert_offsets[E]`` are zero.
    """
    pairs, rows = (plan.sorted_pairs, plan.pair_to_row) if plan is not None else (None, None)
    return _ops.grouped_mm_lora(
        x, weight, expert_offsets, weight_transposed, lora_u, lora_weight, lora_scaling,
        lora_rank_major, pairs, rows, bias,
    )  # fmt: skip


@torch.library.register_fake("moeforge::grouped_mm_lora")
def _grouped_mm_lora_fake(
    x,
    weight,
    expert_offsets,
    weight_transposed,
    lora_u,
    lora_weight,
    lora_scaling,
    lora_rank_major,
    sorted_pairs=None,
    pair_to_row=None,
    bias=None,
):
    num_rows = sorted_pairs.shape[0] if sorted_pairs is not None else x.shape[0]
    return x.new_empty(num_rows, weight.shape[2 if weight_transposed else 1])


def _grouped_mm_lora_setup(ctx, inputs, output):
    x, weight, offsets, transposed, lora_u, lora_weight, scaling, rank_major, pairs, rows = inputs[
        :10
    ]
    ctx.weight_transposed, ctx.lora_scaling, ctx.lora_rank_major = transposed, scaling, rank_major
    ctx.has_bias = inputs[10] is not None
    ctx.save_for_backward(x, weight, offsets, lora_u, lora_weight, pairs, rows)


def _grouped_mm_lora_backward(ctx, grad):
    x, weight, offsets, lora_u, lora_weight, pairs, rows = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_w, grad_b = _grouped_mm_input_grads(
        grad, x, weight, offsets, ctx.weight_transposed,
        (needs[0], needs[1], ctx.has_bias and needs[10]), pairs, rows,
    )  # fmt: skip
    grad_u, grad_lora = _lora_expand_grads(
        grad, lora_u, lora_weight, offsets, ctx.lora_scaling, ctx.lora_rank_major, needs[4],
        needs[5],
    )  # fmt: skip
    return grad_x, grad_w, None, None, grad_u, grad_lora, None, None, None, None, grad_b


torch.library.register_autograd(
    "moeforge::grouped_mm_lora", _grouped_mm_lora_backward, setup_context=_grouped_mm_lora_setup
)


# ------------------------------------------------------------------------------------------
# swiglu
# ------------------------------------------------------------------------------------------

GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


def swiglu(
    h: Tensor, variant: str = "silu", alpha: float = GPT_OSS_ALPHA, limit: float = GPT_OSS_LIMIT
) -> Tensor:
    """Gated activation of the expert FFN: ``h [S, 2I] -> a [S, I]``.

    ``variant="silu"``: HF layout, gate = ``h[:, :I]``, up = ``h[:, I:]``, ``a = silu(gate) * up``.
    ``variant="gpt_oss"``: interleaved gate = ``h[:, 0::2]``, up = ``h[:, 1::2]``, clamped:
    ``a = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
    """
    return _ops.swiglu(h, variant, alpha, limit)


@torch.library.register_fake("moeforge::swiglu")
def _swiglu_fake(h, variant="silu", alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.register_fake("moeforge::swiglu_backward")
def _swiglu_backward_fake(grad_a, h, variant="silu", alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT):
    return h.new_empty(h.shape)


def _swiglu_setup(ctx, inputs, output):
    h, variant, alpha, limit = inputs
    ctx.args = (variant, alpha, limit)
    ctx.save_for_backward(h)


def _swiglu_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return _ops.swiglu_backward(grad, h, *ctx.args), None, None, None


torch.library.register_autograd("moeforge::swiglu", _swiglu_backward, setup_context=_swiglu_setup)


def weighted_swiglu_backward(
    grad_aw: Tensor,
    h: Tensor,
    row_weights: Tensor,
    variant: str = "silu",
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
    weighted_act: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of the routing-weighted activation ``a_w = row_weights[:, None] * swiglu(h)``.

    The fused MoE layer folds each routed row's weight into its activation, so its backward needs
    neither the expert outputs nor the activation: this op recomputes ``swiglu(h)`` from the
    pre-activation and returns everything the rest of the backward needs, in one pass.

    Args:
        grad_aw: ``[S, I]`` gradient of ``a_w`` (h's dtype).
        h: ``[S, 2I]`` pre-activation.
        row_weights: ``[S]`` routing weight of each routed row (any float dtype).
        weighted_act: also return the recomputed ``a_w`` (for the down projection's weight
            gradient); else an empty tensor is returned in its place.

    Returns:
        ``(grad_h [S, 2I], a_w [S, I] or empty, grad_row_weights [S])``, the last in float32
        (float64 for float64 ``h``): ``<grad_aw[r], swiglu(h[r])>``.
    """
    return _ops.weighted_swiglu_backward(
        grad_aw, h, row_weights, variant, alpha, limit, weighted_act
    )


@torch.library.register_fake("moeforge::weighted_swiglu_backward")
def _weighted_swiglu_backward_fake(
    grad_aw,
    h,
    row_weights,
    variant="silu",
    alpha=GPT_OSS_ALPHA,
    limit=GPT_OSS_LIMIT,
    weighted_act=True,
):
    return (
        h.new_empty(h.shape),
        *_weighted_swiglu_backward_inplace_fake(h, weighted_act=weighted_act),
    )


def weighted_swiglu_backward_(
    h: Tensor,
    grad_aw: Tensor,
    row_weights: Tensor,
    variant: str = "silu",
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
    weighted_act: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`weighted_swiglu_backward` with ``grad_h`` written over ``h`` (in place).

    For a backward that reads the pre-activation for the last time (the fused MoE layer's): no
    second ``[S, 2I]`` buffer. ``h`` must be contiguous and share no memory with ``grad_aw`` or
    ``row_weights``; after the call it holds ``grad_h``, bitwise what the out-of-place op returns.

    Returns:
        ``(a_w [S, I] or empty, grad_row_weights [S])`` as :func:`weighted_swiglu_backward`.
    """
    return _ops.weighted_swiglu_backward_(
        h, grad_aw, row_weights, variant, alpha, limit, weighted_act
    )


@torch.library.register_fake("moeforge::weighted_swiglu_backward_")
def _weighted_swiglu_backward_inplace_fake(
    h,
    grad_aw=None,
    row_weights=None,
    variant="silu",
    alpha=GPT_OSS_ALPHA,
    limit=GPT_OSS_LIMIT,
    weighted_act=True,
):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    rows, inter = h.shape[0], h.shape[1] // 2
    return (
        h.new_empty(rows, inter) if weighted_act else h.new_empty(0),
        h.new_empty(rows, dtype=acc),
    )


# ------------------------------------------------------------------------------------------
# expert_lora
# ------------------------------------------------------------------------------------------


def expert_lora(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    expert_offsets: Tensor,
    scaling: float,
    plan: RoutingPlan | None = None,
) -> Tensor:
    """Split LoRA delta on routed rows, in PEFT's expert layout.

    Args:
        x: ``[S, in]`` rows in expert order or, with ``plan``, token-major ``[T, in]`` (as for
            :func:`grouped_mm`).
        lora_A: ``[E*r, in]``, expert-major (rows ``e*r:(e+1)*r`` are expert e's A).
        lora_B: ``[out, r*E]``, rank-major (column ``j*E + e`` is rank j of expert e).
        expert_offsets: ``[E + 1]`` int32.
        scaling: LoRA scale (``alpha / r``).
        plan: optional routing plan (see ``x``).

    Returns:
        ``[S, out]`` = ``scaling * (x A_e^T) B_e^T`` per expert; ``B_e A_e`` is never formed.
    """
    pairs, rows = (plan.sorted_pairs, plan.pair_to_row) if plan is not None else (None, None)
    delta, _ = _ops.expert_lora(x, lora_A, lora_B, expert_offsets, scaling, pairs, rows)
    return delta


@torch.library.register_fake("moeforge::expert_lora")
def _expert_lora_fake(
    x, lora_A, lora_B, expert_offsets, scaling, sorted_pairs=None, pair_to_row=None
):
    rank = lora_A.shape[0] // (expert_offsets.shape[0] - 1)
    num_rows = sorted_pairs.shape[0] if sorted_pairs is not None else x.shape[0]
    return x.new_empty(num_rows, lora_B.shape[0]), x.new_empty(num_rows, rank)


@torch.library.register_fake("moeforge::expert_lora_backward")
def _expert_lora_backward_fake(
    grad_delta,
    x,
    lora_u,
    lora_A,
    lora_B,
    expert_offsets,
    scaling,
    output_mask,
    sorted_pairs=None,
    pair_to_row=None,
    x_through_plan=True,
    grad_delta_through_plan=False,
):
    return (  # masked-off outputs: distinct empty tensors, as the kernels return
        x.new_empty(lora_u.shape[0], x.shape[1]) if output_mask[0] else x.new_empty(0),
        lora_A.new_empty(lora_A.shape) if output_mask[1] else x.new_empty(0),
        lora_B.new_empty(lora_B.shape) if output_mask[2] else x.new_empty(0),
    )


@torch.library.register_fake("moeforge::lora_expand_add_")
def _lora_expand_add_fake(out, u, lora_weight, expert_offsets, scaling, rank_major):
    return None


def _expert_lora_setup(ctx, inputs, output):
    x, lora_A, lora_B, expert_offsets, scaling, sorted_pairs, pair_to_row = inputs
    _, lora_u = output
    ctx.scaling = scaling
    ctx.mark_non_differentiable(lora_u)
    ctx.save_for_backward(x, lora_u, lora_A, lora_B, expert_offsets, sorted_pairs, pair_to_row)


def _expert_lora_backward(ctx, grad_delta, _grad_u):
    x, lora_u, lora_A, lora_B, expert_offsets, sorted_pairs, pair_to_row = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if not any(mask):
        return None, None, None, None, None, None, None
    grad_x, grad_A, grad_B = _ops.expert_lora_backward(
        grad_delta,
        x,
        lora_u,
        lora_A,
        lora_B,
        expert_offsets,
        ctx.scaling,
        mask,
        sorted_pairs,
        pair_to_row,
    )
    if mask[0] and sorted_pairs is not None:  # per routed row -> per token
        grad_x = _ops.combine(grad_x, sorted_pairs, pair_to_row, None)
    return (
        grad_x if mask[0] else None,
        grad_A if mask[1] else None,
        grad_B if mask[2] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "moeforge::expert_lora", _expert_lora_backward, setup_context=_expert_lora_setup
)


# ------------------------------------------------------------------------------------------
# router_loss
# ------------------------------------------------------------------------------------------


def router_loss(
    logits: Tensor | Sequence[Tensor], top_k: int, row_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fused load-balancing loss and z-loss over all layers' router logits, in one pass.

    Args:
        logits: one ``[T, E]`` tensor, or a sequence of them (one per MoE layer).
        top_k: experts per token.
        row_mask: optional ``[T]`` (e.g. ``attention_mask.flatten()``); zero rows are excluded.

    Returns:
        ``(aux_loss, z_loss)``, 0-d fp32 (fp64 for fp64 logits). ``aux_loss`` has HF's semantics
        (``load_balancing_loss_func``: statistics of all layers together, uniform routing gives
        ``top_k``); ``z_loss`` is the mean over kept rows of all layers of ``logsumexp^2``.
    """
    layers = [logits] if isinstance(logits, Tensor) else list(logits)
    if not layers:  # the dispatcher cannot route an op whose only tensors are an empty list
        raise ValueError(
            "moeforge.router_loss: logits must hold at least one layer's router logits"
        )
    aux, z, _ = _ops.router_loss(layers, row_mask, top_k)
    return aux, z


@torch.library.register_fake("moeforge::router_loss")
def _router_loss_fake(logits, row_mask, top_k):
    first = logits[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    return (
        first.new_empty((), dtype=dtype),
        first.new_empty((), dtype=dtype),
        first.new_empty(first.shape[1], dtype=torch.int64),
    )


@torch.library.register_fake("moeforge::router_loss_backward")
def _router_loss_backward_fake(grad_aux, grad_z, logits, row_mask, expert_counts, top_k):
    return [layer.new_empty(layer.shape) for layer in logits]


def _router_loss_setup(ctx, inputs, output):
    logits, row_mask, top_k = inputs
    _, _, counts = output
    ctx.top_k = top_k
    ctx.num_layers = len(logits)
    ctx.mark_non_differentiable(counts)
    ctx.save_for_backward(row_mask, counts, *logits)


def _router_loss_backward(ctx, grad_aux, grad_z, _grad_counts):
    row_mask, counts, *logits = ctx.saved_tensors
    grads = _ops.router_loss_backward(grad_aux, grad_z, logits, row_mask, counts, ctx.top_k)
    return grads, None, None


torch.library.register_autograd(
    "moeforge::router_loss", _router_loss_backward, setup_context=_router_loss_setup
)
