"""``torch.nn`` modules for plain PyTorch training scripts, with HF-compatible parameter names
and layouts (``gate.weight``, ``experts.gate_up_proj``, ``experts.down_proj``) so weights move
between these modules and transformers' MoE blocks unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moeforge import functional as MF
from moeforge.functional import ExpertLoRA


class TopKRouter(nn.Module):
    """Softmax top-k router (Qwen3-MoE / OLMoE / Mixtral semantics).

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: K experts per token.
        norm_topk_prob: renormalise the K selected probabilities to sum to 1.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"moeforge.TopKRouter: top_k must be in [1, num_experts={num_experts}], got {top_k}"
            )
        self.top_k = top_k
        self.num_experts = num_experts
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, device=device, dtype=dtype)
        )
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [T, H] -> (logits [T, E], weights [T, K] in logits dtype, ids [T, K] int64)``."""
        logits = nn.functional.linear(x, self.weight)
        weights, ids = MF.route_topk(logits, self.top_k, self.norm_topk_prob)
        return logits, weights, ids


class _LoRAPair(nn.Module):
    """One projection's expert LoRA: ``lora_A [E*r, in]``, ``lora_B [out, r*E]`` (PEFT layout)."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(
            torch.empty(num_experts * rank, in_features, device=device, dtype=dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(out_features, rank * num_experts, device=device, dtype=dtype)
        )
        # PEFT's init: A ~ kaiming-uniform (a = sqrt(5)) per expert, B = 0 (the adapter starts
        # as the identity update).
        for a in self.lora_A.data.view(num_experts, rank, in_features):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def adapter(self) -> ExpertLoRA:
        return ExpertLoRA(self.lora_A, self.lora_B, self.scaling)


class Experts(nn.Module):
    """Routed expert FFNs, the HF ``<M>Experts`` contract, computed by moeforge kernels.

    Args:
        num_experts: E.
        hidden_size: H.
        intermediate_size: I (per expert).
        layout: ``"hf"`` (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) or ``"gpt_oss"``
            (``[E, H, 2I]`` interleaved, ``[E, I, H]``, with biases and clamped SwiGLU).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        layout: str = "hf",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        MF._check_layout(layout)
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size, self.layout = intermediate_size, layout
        E, H, I = num_experts, hidden_size, intermediate_size
        kw = {"device": device, "dtype": dtype}
        if layout == "hf":
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, **kw))
            self.down_proj = nn.Parameter(torch.empty(E, H, I, **kw))
            self.gate_up_proj_bias = self.down_proj_bias = None
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I, **kw))
            self.down_proj = nn.Parameter(torch.empty(E, I, H, **kw))
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I, **kw))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, H, **kw))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        self.lora = nn.ModuleDict()

    def add_lora(
        self,
        rank: int,
        alpha: float | None = None,
        targets: tuple[str, ...] = ("gate_up_proj", "down_proj"),
    ) -> None:
        """Attach split-LoRA adapters (PEFT layout) to the named projections.

        Args:
            rank: r.
            alpha: LoRA alpha (default ``rank``, i.e. scaling 1).
        """
        if rank < 1:
            raise ValueError(f"moeforge.Experts.add_lora: rank must be >= 1, got {rank}")
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        shapes = {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}
        for name in targets:
            if name not in shapes:
                raise ValueError(
                    "moeforge.Experts.add_lora: targets must be among "
                    f"{tuple(shapes)}, got {name!r}"
                )
            in_f, out_f = shapes[name]
            ref = getattr(self, name)
            self.lora[name] = _LoRAPair(
                E, in_f, out_f, rank, float(alpha or rank), device=ref.device, dtype=ref.dtype
            )

    def _adapter(self, name: str) -> ExpertLoRA | None:
        return self.lora[name].adapter() if name in self.lora else None

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """``hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]``."""
        return MF.moe_experts(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            layout=self.layout,
            gate_up_bias=self.gate_up_proj_bias,
            down_bias=self.down_proj_bias,
            gate_up_lora=self._adapter("gate_up_proj"),
            down_lora=self._adapter("down_proj"),
        )


class MoE(nn.Module):
    """A sparse MoE block: top-k router + routed experts (HF ``<M>SparseMoeBlock`` shape).

    Args:
        hidden_size: H.
        intermediate_size: I per expert.
        num_experts: E.
        top_k: K.
        norm_topk_prob: renormalise the selected routing weights.
        layout: expert weight layout, ``"hf"`` or ``"gpt_oss"``.
        lora_rank: if > 0, attach expert LoRA of this rank to both projections.
        lora_alpha: LoRA alpha (default ``lora_rank``).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
        layout: str = "hf",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.gate = TopKRouter(hidden_size, num_experts, top_k, norm_topk_prob, **kw)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, layout, **kw)
        if lora_rank > 0:
            self.experts.add_lora(lora_rank, lora_alpha)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [..., H] -> (out [..., H], router_logits [T, E])`` with ``T = x[..., 0].numel()``.

        Feed the router logits of all layers to :func:`moeforge.load_balancing_loss`.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, ids = self.gate(flat)
        out = self.experts(flat, ids, weights)
        return out.view(shape), logits
