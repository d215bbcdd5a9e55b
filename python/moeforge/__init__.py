"""moeforge: C++/CUDA operators for Mixture-of-Experts training and LoRA fine-tuning.

Ops live in ``torch.ops.moeforge`` (typed wrappers in :mod:`moeforge.ops`); modules for plain
PyTorch in :mod:`moeforge.nn`; pure-torch references in :mod:`moeforge.reference`.
"""

from moeforge import ops
from moeforge._library import built_with_cuda
from moeforge.functional import ExpertLoRA, expert_ffn, moe_experts, route_topk
from moeforge.losses import load_balancing_loss, router_losses, router_z_loss
from moeforge.nn import Experts, MoE, TopKRouter

__version__ = "0.1.0"

__all__ = [
    "ExpertLoRA",
    "Experts",
    "MoE",
    "TopKRouter",
    "built_with_cuda",
    "expert_ffn",
    "load_balancing_loss",
    "moe_experts",
    "ops",
    "route_topk",
    "router_losses",
    "router_z_loss",
]
