"""The MoE expert pipeline composed from moeforge ops: route, permute, grouped SwiGLU FFN with
optional split LoRA, weighted combine. Autograd flows through each op's registered backward.

Layouts (see ``reference/hf-models.md``):

* ``"hf"`` (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3): ``gate_up_proj [E, 2I, H]`` with
  gate rows first, ``down_proj [E, H, I]``, ``y = x W^T``, silu gating, no biases.
* ``"gpt_oss"``: ``gate_up_proj [E, H, 2I]`` interleaved (gate even, up odd columns),
  ``down_proj [E, I, H]``, ``y = x W``, biases ``[E, 2I]`` and ``[E, H]``, clamped SwiGLU.

LoRA deltas are in the math orientation of each projection, whatever the weight storage:
``lora_A [E*r, in]`` and ``lora_B [out, r*E]`` (PEFT's expert layout), with in/out the features
the projection consumes and produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moeforge import ops
from moeforge.fused import fused_moe_experts

LAYOUTS = ("hf", "gpt_oss")


@dataclass(frozen=True)
class ExpertLoRA:
    """One projection's expert LoRA adapter in PEFT's layout.

    Attributes:
        lora_A: ``[E*r, in]`` expert-major.
        lora_B: ``[out, r*E]`` rank-major.
        scaling: the LoRA scale ``alpha / r``.
    """

    lora_A: Tensor
    lora_B: Tensor
    scaling: float


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"moeforge.expert_ffn: layout must be one of {LAYOUTS}, got {layout!r}")


def _project(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    bias: Tensor | None,
    transposed: bool,
    lora: ExpertLoRA | None,
) -> Tensor:
    out = ops.grouped_mm(x, weight, offsets, bias, transposed)
    if lora is not None:
        out = out + ops.expert_lora(x, lora.lora_A, lora.lora_B, offsets, lora.scaling)
    return out


def expert_ffn(
    x: Tensor,
    expert_offsets: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    *,
    layout: str = "hf",
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
    alpha: float = ops.GPT_OSS_ALPHA,
    limit: float = ops.GPT_OSS_LIMIT,
) -> Tensor:
    """Grouped SwiGLU expert FFN on expert-sorted rows.

    Args:
        x: ``[S, H]`` rows in expert order (from :func:`moeforge.ops.permute`).
        expert_offsets: ``[E + 1]`` int32.
        gate_up_proj, down_proj: expert weights in ``layout`` (module docstring).

    Returns:
        ``[S, H]`` expert outputs in expert order; dropped rows are zero.
    """
    _check_layout(layout)
    transposed = layout == "gpt_oss"
    variant = "gpt_oss" if transposed else "silu"
    h = _project(x, gate_up_proj, expert_offsets, gate_up_bias, transposed, gate_up_lora)
    a = ops.swiglu(h, variant, alpha, limit)
    return _project(a, down_proj, expert_offsets, down_bias, transposed, down_lora)


def moe_experts(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    **ffn_kwargs,
) -> Tensor:
    """The whole routed-experts computation of an MoE layer (HF ``<M>Experts.forward`` contract).

    Args:
        hidden_states: ``[T, H]``.
        top_k_index: ``[T, K]`` int expert ids; ids outside ``[0, E)`` are dropped.
        top_k_weights: ``[T, K]`` routing weights (fp32 or model dtype).
        gate_up_proj, down_proj: expert weights; ``**ffn_kwargs`` as in :func:`expert_ffn`.

    Returns:
        ``[T, H]`` in ``hidden_states.dtype``: ``sum_k w[t,k] * FFN_{e(t,k)}(x[t])``.

    One autograd node (:mod:`moeforge.fused`): its backward keeps only ``hidden_states``, the
    pre-activation and the routing plan, and computes the routing-weight gradient without the
    expert outputs. Same forward values as :func:`expert_ffn` between :func:`ops.permute` and
    :func:`ops.combine`.
    """
    _check_layout(ffn_kwargs.get("layout", "hf"))
    gate_up_lora = ffn_kwargs.pop("gate_up_lora", None)
    down_lora = ffn_kwargs.pop("down_lora", None)
    return fused_moe_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        gate_up_proj,
        down_proj,
        gate_up_lora=_lora_tuple(gate_up_lora),
        down_lora=_lora_tuple(down_lora),
        **ffn_kwargs,
    )


def _lora_tuple(lora: ExpertLoRA | None) -> tuple[Tensor, Tensor, float] | None:
    return None if lora is None else (lora.lora_A, lora.lora_B, lora.scaling)


def route_topk(logits: Tensor, top_k: int, norm_topk_prob: bool = True) -> tuple[Tensor, Tensor]:
    """Qwen3-MoE / OLMoE / Mixtral routing: fp32 softmax, top-k, optional renormalisation.

    Args:
        logits: ``[T, E]`` router logits.

    Returns:
        ``(weights [T, K] in logits.dtype, ids [T, K] int64)``.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids
