"""The routed-experts computation of an MoE layer as one autograd node, with a lean backward.

Forward (same values and rounding as composing the ops one by one): routing ->
``h = x_rows W_gu^T`` (+ split LoRA) -> ``a = swiglu(h)`` -> ``y = a W_d^T`` (+ split LoRA) ->
``out[t] = sum_k w[t,k] y[row(t,k)]``, with ``x_rows`` the tokens in expert order. ``h`` and
``a`` come from one op, :func:`moeforge.ops.grouped_mm_swiglu`: one kernel under the
experimental ``MOEFORGE_GROUPED_GEMM=sm90`` (the bias, the gate_up adapter's up-projection and
the activation in the GEMM's epilogue, the rows gathered in its loads; the down projection's
bias and adapter likewise through :func:`moeforge.ops.grouped_mm_lora`), else the same ops one
by one.

The permute is fused into the gate_up GEMMs: they read the token-major ``x`` through the routing
plan (``grouped_mm`` / ``expert_lora`` with ``sorted_pairs``), in the forward and in the weight
gradients, so the permuted input ``[S, H]`` is never written. Under torch's grouped GEMM engine
(the default for bfloat16 on Hopper/Blackwell), whose kernels need dense rows, each op would
gather its own copy instead: there the layer gathers ``x`` (LoRA's forward) and ``dO`` (the
backward's down projection) once and hands the copy to every op that reads it, and adds LoRA's
up-projections into ``h``, ``y``, ``grad_aw`` and ``grad_x`` in place (``lora_expand_add_``)
instead of writing each ``[S, out]`` delta and adding it (see :func:`_add_lora`); each adapter's
rank-r ``du = grad_delta B_e`` is formed once, for the input's gradient and its weight gradients
(:func:`_lora_weight_grads`).

Saved for backward: the layer input ``x [T, H]``, the pre-activation ``h [S, 2I]``, the routing
plan and weights, LoRA's rank-r intermediates ``[S, r]`` (and the parameters, which autograd holds
anyway). Not saved: the activation ``[S, I]`` (recomputed from ``h``) and the expert outputs
``[S, H]`` (never needed). At Qwen3-30B-A3B's shapes (T=16384, K=8, H=2048, I=768, bf16) a
layer keeps 0.47 GB (``h`` and ``x``) instead of the 1.7 GB that op-by-op autograd keeps
(``x_rows``, ``h``, ``a``, ``y``). The activation's backward, ``h``'s last reader, writes
``grad_h`` over ``h`` (unless the graph is retained): the backward never holds two ``[S, 2I]``
buffers (:func:`_read_for_the_last_time`).

The routing-weight gradient without the expert outputs: read each row's weight as a factor of its
activation, ``a_w = w a``, so that ``out[t] = sum_k (a_w W_d^T + w b_d)[row(t,k)]``. Then, with
``dO_rows`` the *unweighted* output gradient gathered to the routed rows,

* ``g = dO_rows W_d`` (+ LoRA's ``s (dO_rows B) A``) is the gradient of ``a_w``;
* ``grad_h = swiglu'(h)^T (w g)``, ``dw = <g, a>`` (+ ``<dO, b_d>``) and ``a_w`` itself come
  from one pass over ``h`` (:func:`moeforge.ops.weighted_swiglu_backward_`, in place);
* ``dW_d = dO_rows^T a_w`` and the down adapter's gradients read ``a_w`` and ``w u``.

``dO_rows`` is read through the plan too (by the GEMMs for ``g``, ``dW_d`` and the down
adapter); it is materialised only for a trainable down bias (or once, as above).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor

from moeforge import ops

_ops = torch.ops.moeforge


def _torch_engine(x: Tensor, num_experts: int) -> bool:
    """Whether the grouped GEMMs take torch's engine here (``MOEFORGE_GROUPED_GEMM`` auto/torch,
    bfloat16 on sm90/sm100: ``torch_engine_applies`` in csrc/cuda/grouped_mm.cpp). Also under
    the experimental "sm90", whose decisions here (LoRA's in-place adds, gathering once) are
    torch's: our sm_90a kernels take grouped_mm's GEMMs, torch's engine split LoRA's."""
    if not x.is_cuda or x.dtype != torch.bfloat16 or not 1 <= num_experts <= 1023:
        return False
    if os.environ.get("MOEFORGE_GROUPED_GEMM", "") not in ("", "auto", "torch", "sm90"):
        return False
    return torch.cuda.get_device_capability(x.device)[0] in (9, 10)


def _gathers_to_a_copy(x: Tensor, num_experts: int, row_grouped_only: bool = False) -> bool:
    """Whether an op given the routing plan would gather its own dense copy of x: under torch's
    engine, whose kernels read dense rows (except, under "sm90", where every reader of x is a
    grouped GEMM - ``row_grouped_only``: our kernels gather in their loads). The layer then
    gathers once and hands the rows to every op that reads them. Only speed depends on the
    answer: an op computes the same values from the plan or from the gathered rows."""
    if row_grouped_only and os.environ.get("MOEFORGE_GROUPED_GEMM") == "sm90":
        return False
    return _torch_engine(x, num_experts)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (``torch.autograd.graph.saved_tensors_hooks``:
    offloading, checkpointing, user stashes). A hook may keep the very tensor the forward saves
    and read it after the backward, so such a tensor is never written over. True where torch
    does not say (the private query is missing) and under torch.compile."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the query; no in-place use there
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _read_for_the_last_time(t: Tensor, saved: weakref.ref | None) -> bool:
    """Whether the backward may overwrite a saved tensor that it is reading for the last time.

    Autograd holds a node's saved tensors until its backward returns. The fused backward is done
    with ``h [S, 2I]`` once the activation's backward has read it, so that op writes ``grad_h``
    over ``h`` (:func:`moeforge.ops.weighted_swiglu_backward_`) instead of allocating a second
    ``[S, 2I]`` buffer beside ``grad_aw``, where the layer's backward peaks. Only when nothing can
    read ``h`` again: no saved-tensor hook was active in the forward (``saved`` is None then: a
    hook may keep the tensor it was given, or hand back another one that its owner still reads),
    ``t`` must be the very tensor the forward saved (``saved``, a weak reference to it), the graph
    must not be kept for another backward
    (``retain_graph``, which ``create_graph`` implies by default), torch.compile must not be
    tracing the backward (its graphs own their buffers), and ``t`` must be contiguous."""
    if torch.compiler.is_compiling() or saved is None or saved() is not t:
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or keep_graph():
        return False
    return t.is_contiguous()


def _shape_only(rows: int, cols: int, like: Tensor) -> Tensor:
    """A ``[rows, cols]`` stand-in (one row of storage, broadcast) for an op argument that only
    fixes an output's shape: the backward ops read their ``x`` only for weight gradients, and
    ours are called with those outputs masked off."""
    return like.new_empty(cols).expand(rows, cols)


# lora_expand_add_'s CUDA kernels hold the experts' row bounds in shared memory: up to
# kLoraExpandMaxExperts (kernels/include/moeforge/kernels/lora_expand.h) experts.
_LORA_EXPAND_MAX_EXPERTS = 1024


def _lora_expand_applies(
    lora_A: Tensor, num_experts: int, dtype: torch.dtype, torch_engine: bool
) -> bool:
    """Where LoRA's up-projection is added in place (:func:`_add_lora`): under torch's engine,
    ranks a multiple of 8 and adapters in the rows' dtype, i.e. where ``expert_lora`` would run
    torch's GEMMs and round its rank-r intermediate to bfloat16 between them (and no more
    experts than lora_expand_add_'s CUDA kernels take; ``expert_lora`` has no such limit)."""
    rank = lora_A.shape[0] // num_experts
    return (
        torch_engine
        and lora_A.dtype == dtype
        and rank % 8 == 0
        and rank * num_experts == lora_A.shape[0]
        and num_experts <= _LORA_EXPAND_MAX_EXPERTS
    )


def _lora_in_epilogue(
    lora_A: Tensor, num_experts: int, dtype: torch.dtype, torch_engine: bool
) -> bool:
    """Where LoRA's up-projection goes into the base GEMM's epilogue (:func:`moeforge.ops.
    grouped_mm_lora`, :func:`moeforge.ops.grouped_mm_swiglu`'s LoRA arguments) instead of
    ``lora_expand_add_`` after it: under the experimental ``MOEFORGE_GROUPED_GEMM=sm90``, where
    those ops are one kernel, for the adapters :func:`_add_lora` adds in place, up to rank 64
    (one k block of the epilogue's MMAs). The same rounding rule either way; elsewhere the ops
    would run the same two kernels, so the layer keeps its measured path."""
    rank = lora_A.shape[0] // num_experts
    return (
        os.environ.get("MOEFORGE_GROUPED_GEMM") == "sm90"
        and rank <= 64
        and _lora_expand_applies(lora_A, num_experts, dtype, torch_engine)
    )


def _lora_u(x: Tensor, x_plan: tuple, lora_A: Tensor, offsets: Tensor) -> Tensor:
    """``u = x A_e^T`` [S, r] through the grouped GEMM (x in expert order or read through its
    plan), in x's dtype."""
    num_experts = offsets.shape[0] - 1
    a = lora_A.reshape(num_experts, lora_A.shape[0] // num_experts, lora_A.shape[1])  # [E, r, in]
    return _ops.grouped_mm(x, a, offsets, None, False, *x_plan)


def _plan_args(plan: tuple) -> tuple:
    """A plan as the ops' (sorted_pairs, pair_to_row) arguments, (None, None) for none."""
    return plan if plan else (None, None)


def _add_lora(
    out: Tensor,
    x: Tensor,
    x_plan: tuple,
    lora_A: Tensor,
    lora_B: Tensor,
    offsets: Tensor,
    scaling: float,
    torch_engine: bool,
) -> Tensor:
    """``out += scaling * (x A_e^T) B_e^T`` on the routed rows; returns ``u = x A_e^T`` [S, r].

    Under torch's engine (:func:`_lora_expand_applies`) ``u`` comes from the grouped GEMM (in
    x's dtype, as ``expert_lora`` rounds it there) and ``lora_expand_add_`` adds its
    up-projection into ``out`` in place: the ``[S, out]`` delta is never written and read back
    (at Qwen3's T=16384 that was ~0.5 ms per projection). Elsewhere ``expert_lora`` + an add."""
    num_experts = offsets.shape[0] - 1
    if _lora_expand_applies(lora_A, num_experts, out.dtype, torch_engine):
        u = _lora_u(x, x_plan, lora_A, offsets)
        _ops.lora_expand_add_(out, u, lora_B, offsets, scaling, True)
        return u
    delta, u = _ops.expert_lora(x, lora_A, lora_B, offsets, scaling, *x_plan)
    out.add_(delta)
    return u


def _lora_du(grad_delta: Tensor, lora_B: Tensor, offsets: Tensor, plan: tuple = ()) -> Tensor:
    """``du = grad_delta B_e`` [S, r] (scaling not applied) through the grouped GEMM; grad_delta
    in expert order or, with the plan, token-major and read through it."""
    num_experts = offsets.shape[0] - 1
    rank = lora_B.shape[1] // num_experts
    b_t = lora_B.reshape(lora_B.shape[0], rank, num_experts).permute(2, 1, 0).contiguous()
    return _ops.grouped_mm(grad_delta, b_t, offsets, None, False, *plan)


def _add_lora_grad_x(
    grad_x: Tensor,
    grad_delta: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    offsets: Tensor,
    scaling: float,
    grad_delta_plan: tuple = (),
) -> Tensor:
    """``grad_x += scaling * (grad_delta B_e) A_e`` on the routed rows, in place (the backward
    of :func:`_add_lora` for its input; grad_delta in expert order or, with the plan, token-major
    and read through it). Returns ``du = grad_delta B_e`` for :func:`_lora_weight_grads`."""
    du = _lora_du(grad_delta, lora_B, offsets, grad_delta_plan)
    _ops.lora_expand_add_(grad_x, du, lora_A, offsets, scaling, False)
    return du


def _lora_weight_grads(
    du: Tensor,
    grad_delta: Tensor,
    grad_delta_plan: tuple,
    x: Tensor,
    x_plan: tuple,
    u: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    offsets: Tensor,
    scaling: float,
    need_A: bool,
    need_B: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The adapter's weight gradients in PEFT's layouts (lora_A [E*r, in], lora_B [out, r*E])
    from ``du = grad_delta B_e`` (:func:`_lora_du`), already formed for the input's gradient:

        grad_A_e = (s du_e)^T x_e,   grad_B_e = grad_delta_e^T (s u_e)

    with ``s du`` and ``s u`` rounded to the rows' dtype, as ``expert_lora_backward`` computes
    them under torch's engine, where it would form du (one more read of grad_delta) itself.
    x and grad_delta in expert order or read through their plans."""
    num_experts = offsets.shape[0] - 1
    rank = lora_A.shape[0] // num_experts
    grad_A = grad_B = None
    if need_A:
        a = lora_A.reshape(num_experts, rank, lora_A.shape[1])  # [E, r, in]: only its shape is read
        mask = [False, True, False]
        _, grad_A, _ = _ops.grouped_mm_backward(du * scaling, x, a, offsets, False, mask, *x_plan)
        grad_A = grad_A.reshape(lora_A.shape)
    if need_B:
        # [E, out, r] as the weight gradient of a weight in the transposed layout, grad_delta in
        # x's place (so that it may be read through its plan) and s u as the output gradient.
        out = lora_B.shape[0]
        like = grad_delta.new_empty(()).expand(num_experts, out, rank)  # shape only
        u_s = u.to(grad_delta.dtype) * scaling
        mask = [False, True, False]
        _, g, _ = _ops.grouped_mm_backward(
            u_s, grad_delta, like, offsets, True, mask, *grad_delta_plan
        )
        grad_B = g.permute(1, 2, 0).reshape(out, rank * num_experts)  # B[o, j*E + e]
    return grad_A, grad_B


class FusedMoEExperts(torch.autograd.Function):
    """Autograd node of :func:`fused_moe_experts` (argument order as there)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        top_k_index: Tensor,
        top_k_weights: Tensor,
        gate_up_proj: Tensor,
        down_proj: Tensor,
        gate_up_bias: Tensor | None,
        down_bias: Tensor | None,
        gate_up_lora_A: Tensor | None,
        gate_up_lora_B: Tensor | None,
        down_lora_A: Tensor | None,
        down_lora_B: Tensor | None,
        layout: str,
        alpha: float,
        limit: float,
        gate_up_scaling: float,
        down_scaling: float,
    ) -> Tensor:
        transposed = layout == "gpt_oss"
        variant = "gpt_oss" if transposed else "silu"
        num_experts = gate_up_proj.shape[0]
        sorted_pairs, pair_to_row, offsets = _ops.routing(top_k_index, num_experts)
        plan = (sorted_pairs, pair_to_row)  # x is read through it: no permuted copy
        x_in, x_plan = x, plan
        torch_engine = _torch_engine(x, num_experts)
        # The forward's readers of x are row-grouped GEMMs (gate_up_proj's and lora_A's).
        if gate_up_lora_A is not None and _gathers_to_a_copy(x, num_experts, True):
            x_in, x_plan = _ops.permute(x, *plan, None), ()  # one copy for both GEMMs
        gate_up_u = None
        in_place = gate_up_lora_A is not None and not _lora_in_epilogue(
            gate_up_lora_A, num_experts, x.dtype, torch_engine
        )
        if in_place:  # LoRA's up-projection added into h after the GEMM
            h = _ops.grouped_mm(x_in, gate_up_proj, offsets, gate_up_bias, transposed, *x_plan)
            gate_up_u = _add_lora(
                h, x_in, x_plan, gate_up_lora_A, gate_up_lora_B, offsets, gate_up_scaling,
                torch_engine,
            )  # fmt: skip
            a = _ops.swiglu(h, variant, alpha, limit)
        else:  # h and a from one op (one kernel under MOEFORGE_GROUPED_GEMM=sm90)
            lora = (None, None, 1.0)
            if gate_up_lora_A is not None:  # the adapter's up-projection in the GEMM's epilogue
                gate_up_u = _lora_u(x_in, x_plan, gate_up_lora_A, offsets)
                lora = (gate_up_u, gate_up_lora_B, gate_up_scaling)
            h, a = _ops.grouped_mm_swiglu(
                x_in, gate_up_proj, offsets, *_plan_args(x_plan), *lora, gate_up_bias, transposed,
                variant, alpha, limit,
            )  # fmt: skip
        del x_in
        down_u = None
        if down_lora_A is not None and _lora_in_epilogue(
            down_lora_A, num_experts, a.dtype, torch_engine
        ):  # the bias and the adapter's up-projection in the GEMM's epilogue
            down_u = _lora_u(a, (), down_lora_A, offsets)
            y = _ops.grouped_mm_lora(
                a, down_proj, offsets, transposed, down_u, down_lora_B, down_scaling, True,
                None, None, down_bias,
            )  # fmt: skip
        else:
            y = _ops.grouped_mm(a, down_proj, offsets, down_bias, transposed)
            if down_lora_A is not None:
                down_u = _add_lora(
                    y, a, (), down_lora_A, down_lora_B, offsets, down_scaling, torch_engine
                )
        del a
        out = _ops.combine(y, sorted_pairs, pair_to_row, top_k_weights)

        # see _read_for_the_last_time
        ctx.saved_h = None if _saved_tensor_hooks_active() else weakref.ref(h)
        ctx.layout, ctx.alpha, ctx.limit = layout, alpha, limit
        ctx.torch_engine = torch_engine
        ctx.gate_up_scaling, ctx.down_scaling = gate_up_scaling, down_scaling
        ctx.save_for_backward(
            x,
            top_k_index,
            top_k_weights,
            gate_up_proj,
            down_proj,
            down_bias,
            gate_up_lora_A,
            gate_up_lora_B,
            down_lora_A,
            down_lora_B,
            sorted_pairs,
            pair_to_row,
            offsets,
            h,
            gate_up_u,
            down_u,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (
            x,
            top_k_index,
            top_k_weights,
            gate_up_proj,
            down_proj,
            down_bias,
            gate_up_lora_A,
            gate_up_lora_B,
            down_lora_A,
            down_lora_B,
            sorted_pairs,
            pair_to_row,
            offsets,
            h,
            gate_up_u,
            down_u,
        ) = ctx.saved_tensors
        (
            need_x,
            _,
            need_w,
            need_gu,
            need_dn,
            need_gu_bias,
            need_dn_bias,
            need_gu_A,
            need_gu_B,
            need_dn_A,
            need_dn_B,
        ) = ctx.needs_input_grad[:11]
        transposed = ctx.layout == "gpt_oss"
        variant = "gpt_oss" if transposed else "silu"
        num_rows, inter = h.shape[0], h.shape[1] // 2

        # ---- down projection and the weighted activation ----
        # dO is read through the plan by every GEMM (grad of a_w, dW_d, the down adapter); only a
        # trainable down bias needs its rows materialised (unless they are gathered once, below).
        grad_out = grad_out.to(h.dtype)
        plan = (sorted_pairs, pair_to_row)
        row_weights = top_k_weights.reshape(-1).index_select(0, sorted_pairs)
        # dO's readers: grad_aw's GEMM, then (after the activation's backward) dW_d, the down
        # adapter (its du, and grad_B; grad_A reuses du where lora_expand_add_ applies) and a
        # down bias. Where each would gather its own copy, gather once.
        dO, dO_plan, dO_lora_plan = grad_out, plan, (*plan, False, True)
        dO_readers = 1 + (down_lora_A is not None) + need_dn + (need_dn_A or need_dn_B)
        dO_readers += need_dn_bias
        # Under "sm90" every GEMM reader gathers in its own loads; the down adapter's readers are
        # GEMMs where its up-projection goes into the epilogue (else expert_lora_backward's).
        gemms_only = down_lora_A is None or _lora_in_epilogue(
            down_lora_A, gate_up_proj.shape[0], grad_out.dtype, ctx.torch_engine
        )
        if dO_readers > 1 and _gathers_to_a_copy(grad_out, gate_up_proj.shape[0], gemms_only):
            dO, dO_plan, dO_lora_plan = _ops.permute(grad_out, *plan, None), (), ()
        num_experts = offsets.shape[0] - 1
        down_du = None  # dO B_e of the down adapter, kept for its weight gradients
        if down_lora_A is not None and _lora_in_epilogue(
            down_lora_A, num_experts, dO.dtype, ctx.torch_engine
        ):  # the adapter's share s (dO B_e) A_e added in the GEMM's epilogue
            down_du = _lora_du(dO, down_lora_B, offsets, dO_plan)
            grad_aw = _ops.grouped_mm_lora(
                dO, down_proj, offsets, not transposed, down_du, down_lora_A, ctx.down_scaling,
                False, *_plan_args(dO_plan),
            )  # fmt: skip
        else:
            grad_aw = _ops.grouped_mm(dO, down_proj, offsets, None, not transposed, *dO_plan)
            if down_lora_A is not None and _lora_expand_applies(
                down_lora_A, num_experts, dO.dtype, ctx.torch_engine
            ):  # the adapter's share s (dO B_e) A_e added into grad_aw in place
                down_du = _add_lora_grad_x(
                    grad_aw, dO, down_lora_A, down_lora_B, offsets, ctx.down_scaling, dO_plan
                )
            elif down_lora_A is not None:
                lora_grad, _, _ = _ops.expert_lora_backward(
                    dO,
                    _shape_only(num_rows, inter, h),
                    down_u,
                    down_lora_A,
                    down_lora_B,
                    offsets,
                    ctx.down_scaling,
                    [True, False, False],
                    *dO_lora_plan,
                )
                grad_aw.add_(lora_grad)
        want_act_w = need_dn or need_dn_A or need_dn_B
        act_args = (variant, ctx.alpha, ctx.limit, want_act_w)
        if _read_for_the_last_time(h, ctx.saved_h):  # grad_h takes h's memory
            act_w, grad_row_weights = _ops.weighted_swiglu_backward_(
                h, grad_aw, row_weights, *act_args
            )
            grad_h = h
        else:
            grad_h, act_w, grad_row_weights = _ops.weighted_swiglu_backward(
                grad_aw, h, row_weights, *act_args
            )
        del grad_aw, h
        row_weights = row_weights.to(grad_row_weights.dtype)

        grad_dn = grad_dn_bias = grad_dn_A = grad_dn_B = None
        if need_dn:
            # dW_d = dO_rows^T a_w, as the weight gradient of grad_aw = dO W_d (the GEMM above:
            # weight orientation flipped, a_w in the place of its output gradient), so that dO
            # is again read through the plan.
            _, grad_dn, _ = _ops.grouped_mm_backward(
                act_w, dO, down_proj, offsets, not transposed, [False, True, False], *dO_plan
            )
        if need_dn_bias:  # sum over expert e's rows of w * dO
            if dO_plan:
                weighted_rows = _ops.permute(grad_out, *plan, None)
                weighted_rows *= row_weights.to(weighted_rows.dtype)[:, None]
            else:
                weighted_rows = dO * row_weights.to(dO.dtype)[:, None]
            _, _, grad_dn_bias = _ops.grouped_mm_backward(
                weighted_rows,
                _shape_only(num_rows, inter, grad_h),
                down_proj,
                offsets,
                transposed,
                [False, False, True],
            )
            del weighted_rows
        if need_dn_A or need_dn_B:  # the adapter saw a_w, whose rank-r intermediate is w u
            down_u_w = down_u.to(row_weights.dtype) * row_weights[:, None]
        if (need_dn_A or need_dn_B) and down_du is not None:
            grad_dn_A, grad_dn_B = _lora_weight_grads(
                down_du, dO, dO_plan, act_w, (), down_u_w, down_lora_A, down_lora_B, offsets,
                ctx.down_scaling, need_dn_A, need_dn_B,
            )  # fmt: skip
        elif need_dn_A or need_dn_B:
            _, grad_dn_A, grad_dn_B = _ops.expert_lora_backward(
                dO,
                act_w,
                down_u_w,
                down_lora_A,
                down_lora_B,
                offsets,
                ctx.down_scaling,
                [False, need_dn_A, need_dn_B],
                *dO_lora_plan,
            )
        del act_w, dO

        # ---- routing weights: dw[t, k] = <g, a>[row(t, k)] (+ <dO[t], b_d[e]>) ----
        grad_w = None
        if need_w:
            kept = pair_to_row >= 0
            grad_w = grad_row_weights.index_select(0, pair_to_row.clamp(min=0).reshape(-1))
            grad_w = grad_w.view(pair_to_row.shape)
            if down_bias is not None:
                num_experts = down_bias.shape[0]
                dots = grad_out.to(grad_w.dtype) @ down_bias.to(grad_w.dtype).t()  # [T, E]
                grad_w = grad_w + dots.gather(1, top_k_index.long().clamp(0, num_experts - 1))
            grad_w = torch.where(kept, grad_w, 0).to(top_k_weights.dtype)

        # ---- gate_up projection (x read through the plan; grad_x per routed row, then summed
        # over each token's rows) ----
        grad_x = grad_gu = grad_gu_bias = grad_gu_A = grad_gu_B = None
        if need_x or need_gu or need_gu_bias or need_gu_A or need_gu_B:
            mask = [need_x, need_gu, need_gu_bias]
            grad_x_rows = gu_du = None
            if (
                need_x
                and gate_up_lora_A is not None
                and _lora_in_epilogue(gate_up_lora_A, num_experts, grad_h.dtype, ctx.torch_engine)
            ):  # grad_x's LoRA share s (grad_h B_e) A_e added in the GEMM's epilogue
                gu_du = _lora_du(grad_h, gate_up_lora_B, offsets)
                grad_x_rows = _ops.grouped_mm_lora(
                    grad_h, gate_up_proj, offsets, not transposed, gu_du, gate_up_lora_A,
                    ctx.gate_up_scaling, False,
                )  # fmt: skip
                mask[0] = False
            if any(mask):
                rows_grad, grad_gu, grad_gu_bias = _ops.grouped_mm_backward(
                    grad_h, x, gate_up_proj, offsets, transposed, mask, *plan
                )
                grad_x_rows = rows_grad if mask[0] else grad_x_rows
            if gu_du is not None:  # the adapter's weight gradients from the same du
                grad_gu_A, grad_gu_B = _lora_weight_grads(
                    gu_du, grad_h, (), x, plan, gate_up_u, gate_up_lora_A, gate_up_lora_B,
                    offsets, ctx.gate_up_scaling, need_gu_A, need_gu_B,
                )  # fmt: skip
            elif gate_up_lora_A is not None and (need_x or need_gu_A or need_gu_B):
                lora_mask = [need_x, need_gu_A, need_gu_B]
                if _lora_expand_applies(
                    gate_up_lora_A, num_experts, grad_h.dtype, ctx.torch_engine
                ):
                    # du = grad_h B_e once: grad_x's share s du A_e added into grad_x_rows in
                    # place, then the adapter's weight gradients from the same du.
                    if need_x:
                        du = _add_lora_grad_x(
                            grad_x_rows, grad_h, gate_up_lora_A, gate_up_lora_B, offsets,
                            ctx.gate_up_scaling,
                        )  # fmt: skip
                    else:
                        du = _lora_du(grad_h, gate_up_lora_B, offsets) if need_gu_A else None
                    grad_gu_A, grad_gu_B = _lora_weight_grads(
                        du, grad_h, (), x, plan, gate_up_u, gate_up_lora_A, gate_up_lora_B,
                        offsets, ctx.gate_up_scaling, need_gu_A, need_gu_B,
                    )  # fmt: skip
                    lora_mask = [False, False, False]
                if any(lora_mask):
                    lora_grad_x, grad_gu_A, grad_gu_B = _ops.expert_lora_backward(
                        grad_h,
                        x,
                        gate_up_u,
                        gate_up_lora_A,
                        gate_up_lora_B,
                        offsets,
                        ctx.gate_up_scaling,
                        lora_mask,
                        *plan,
                    )
                    if lora_mask[0]:
                        grad_x_rows.add_(lora_grad_x)
            if need_x:
                grad_x = _ops.combine(grad_x_rows, sorted_pairs, pair_to_row, None)

        return (
            grad_x,
            None,
            grad_w,
            grad_gu if need_gu else None,
            grad_dn,
            grad_gu_bias if need_gu_bias else None,
            grad_dn_bias,
            grad_gu_A if need_gu_A else None,
            grad_gu_B if need_gu_B else None,
            grad_dn_A if need_dn_A else None,
            grad_dn_B if need_dn_B else None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_moe_experts(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    *,
    layout: str = "hf",
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    gate_up_lora: tuple[Tensor, Tensor, float] | None = None,
    down_lora: tuple[Tensor, Tensor, float] | None = None,
    alpha: float = ops.GPT_OSS_ALPHA,
    limit: float = ops.GPT_OSS_LIMIT,
) -> Tensor:
    """``sum_k w[t,k] * FFN_{e(t,k)}(x[t])`` as one autograd node (see the module docstring).

    Args:
        hidden_states: ``[T, H]``.
        top_k_index: ``[T, K]`` int32/int64 expert ids; ids outside ``[0, E)`` are dropped.
        top_k_weights: ``[T, K]`` routing weights (fp32 or the model dtype).
        gate_up_proj, down_proj: expert weights in ``layout`` (see :mod:`moeforge.functional`).
        gate_up_lora, down_lora: ``(lora_A [E*r, in], lora_B [out, r*E], scaling)`` or None.

    Returns:
        ``[T, H]`` in ``hidden_states.dtype``.
    """
    if layout not in ("hf", "gpt_oss"):
        raise ValueError(
            f"moeforge.fused_moe_experts: layout must be one of ('hf', 'gpt_oss'), got {layout!r}"
        )
    gu_A, gu_B, gu_s = gate_up_lora if gate_up_lora is not None else (None, None, 0.0)
    dn_A, dn_B, dn_s = down_lora if down_lora is not None else (None, None, 0.0)
    return FusedMoEExperts.apply(
        hidden_states,
        top_k_index,
        top_k_weights,
        gate_up_proj,
        down_proj,
        gate_up_bias,
        down_bias,
        gu_A,
        gu_B,
        dn_A,
        dn_B,
        layout,
        float(alpha),
        float(limit),
        float(gu_s),
        float(dn_s),
    )
