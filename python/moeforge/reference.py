"""Pure-torch references of every moeforge op: simple, slow, obviously right. Shared by tests and
benchmarks. Each follows the op's documented semantics (``moeforge.ops``) and computes in the
dtype it is given, so tests call them on float64 inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def routing(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(sorted_pairs [S], pair_to_row [T, K], expert_offsets [E+1])``, all int32."""
    ids = topk_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    keys = torch.where(valid, ids, torch.full_like(ids, num_experts))
    sorted_pairs = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys[valid], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    pair_to_row = torch.empty_like(ids)
    pair_to_row[sorted_pairs] = torch.arange(ids.numel(), device=ids.device)
    pair_to_row[~valid] = -1
    return sorted_pairs.int(), pair_to_row.view(topk_ids.shape).int(), offsets.int()


def permute(
    x: Tensor, sorted_pairs: Tensor, pair_to_row: Tensor, weights: Tensor | None = None
) -> Tensor:
    top_k = pair_to_row.shape[1]
    pairs = sorted_pairs.long()
    out = x[pairs // top_k]
    if weights is not None:
        out = out * weights.reshape(-1)[pairs].to(x.dtype)[:, None]
    dropped = pair_to_row.reshape(-1)[pairs] < 0
    return out.masked_fill(dropped[:, None], 0)


def combine(
    y: Tensor, sorted_pairs: Tensor, pair_to_row: Tensor, weights: Tensor | None = None
) -> Tensor:
    rows = pair_to_row.long()
    gathered = y[rows.clamp(min=0)]  # [T, K, H]
    w = torch.ones(rows.shape, dtype=y.dtype, device=y.device) if weights is None else weights
    w = w.to(y.dtype).masked_fill(rows < 0, 0)
    return (gathered * w[..., None]).sum(1)


def grouped_mm(
    x: Tensor,
    weight: Tensor,
    expert_offsets: Tensor,
    bias: Tensor | None = None,
    weight_transposed: bool = False,
) -> Tensor:
    out_features = weight.shape[2 if weight_transposed else 1]
    out = x.new_zeros(x.shape[0], out_features)
    offs = expert_offsets.tolist()
    for e in range(weight.shape[0]):
        rows = slice(offs[e], offs[e + 1])
        w = weight[e] if weight_transposed else weight[e].T
        out[rows] = x[rows] @ w + (0 if bias is None else bias[e])
    return out


def swiglu(h: Tensor, variant: str = "silu", alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    if variant == "silu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    # gpt-oss, exactly as transformers' GptOssExperts._apply_gate
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def peft_expert_delta_weight(lora_A: Tensor, lora_B: Tensor, num_experts: int) -> Tensor:
    """PEFT's materialised per-expert LoRA weight ``B_e A_e``: ``[E, out, in]`` (unscaled)."""
    out_features = lora_B.shape[0]
    rank = lora_A.shape[0] // num_experts
    A = lora_A.view(num_experts, rank, -1)  # [E, r, in]
    B = lora_B.view(out_features, rank, num_experts).permute(2, 0, 1)  # [E, out, r]
    return B @ A


def expert_lora(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, expert_offsets: Tensor, scaling: float
) -> Tensor:
    """Reference through the materialised delta weight (what PEFT does)."""
    num_experts = expert_offsets.numel() - 1
    delta_w = peft_expert_delta_weight(lora_A, lora_B, num_experts) * scaling
    return grouped_mm(x, delta_w, expert_offsets)


def lora_expand_add(
    out: Tensor,
    u: Tensor,
    lora_weight: Tensor,
    expert_offsets: Tensor,
    scaling: float,
    rank_major: bool,
) -> Tensor:
    """``out + scaling * u_e M_e`` per expert in float64 (a new tensor), ``M_e = B_e^T`` from the
    rank-major ``lora_B [n, r*E]`` or ``A_e`` from ``lora_A [E*r, n]``; other rows unchanged."""
    num_experts, rank, n = expert_offsets.numel() - 1, u.shape[1], out.shape[1]
    ref = out.double().cpu().clone()
    w = lora_weight.double().cpu()
    if rank_major:
        M = w.view(n, rank, num_experts).permute(2, 1, 0)  # [E, r, n]
    else:
        M = w.view(num_experts, rank, n)
    offs = expert_offsets.tolist()
    u64 = u.double().cpu()
    for e in range(num_experts):
        ref[offs[e] : offs[e + 1]] += scaling * u64[offs[e] : offs[e + 1]] @ M[e]
    return ref


def moe_experts_loop(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    *,
    layout: str = "hf",
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> Tensor:
    """HF's eager per-expert loop (token-major), the ground truth for the whole pipeline."""
    num_experts = gate_up_proj.shape[0]
    out = torch.zeros_like(hidden_states)
    for e in range(num_experts):
        tok, slot = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        x = hidden_states[tok]
        if layout == "hf":
            a = swiglu(x @ gate_up_proj[e].T)
            y = a @ down_proj[e].T
        else:
            h = x @ gate_up_proj[e] + (0 if gate_up_bias is None else gate_up_bias[e])
            a = swiglu(h, "gpt_oss", alpha, limit)
            y = a @ down_proj[e] + (0 if down_bias is None else down_bias[e])
        out.index_add_(0, tok, y * top_k_weights[tok, slot, None].to(y.dtype))
    return out


def load_balancing_loss(
    gate_logits: Sequence[Tensor], num_experts: int, top_k: int, attention_mask: Tensor | None
) -> Tensor:
    """transformers' ``load_balancing_loss_func``, transcribed."""
    logits = torch.cat(list(gate_logits), dim=0)
    routing_weights = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected, num_experts)
    if attention_mask is None:
        tokens_per_expert = expert_mask.float().mean(0)
        router_prob_per_expert = routing_weights.mean(0)
    else:
        batch, seq = attention_mask.shape
        layers = logits.shape[0] // (batch * seq)
        m = attention_mask[None, :, :, None, None].expand(layers, batch, seq, top_k, num_experts)
        m = m.reshape(-1, top_k, num_experts).to(logits.device)
        tokens_per_expert = (expert_mask.float() * m).sum(0) / m.sum(0)
        mp = attention_mask[None, :, :, None].expand(layers, batch, seq, num_experts)
        mp = mp.reshape(-1, num_experts).to(logits.device)
        router_prob_per_expert = (routing_weights * mp).sum(0) / mp.sum(0)
    return (tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum() * num_experts


def router_z_loss(gate_logits: Sequence[Tensor], row_mask: Tensor | None = None) -> Tensor:
    logits = torch.cat(list(gate_logits), dim=0)
    z = torch.logsumexp(logits.double() if logits.dtype == torch.float64 else logits.float(), -1)
    if row_mask is None:
        return (z**2).mean()
    keep = (row_mask != 0).repeat(len(gate_logits))
    return (z[keep] ** 2).mean()
