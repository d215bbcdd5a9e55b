"""moeforge: C++/CUDA operators for Mixture-of-Experts training and LoRA fine-tuning.

Ops live in ``torch.ops.moeforge`` (typed wrappers in :mod:`moeforge.ops`); modules for plain
PyTorch in :mod:`moeforge.nn`; pure-torch references in :mod:`moeforge.reference`.
"""

from moeforge import hf, ops
from moeforge._library import built_with_cuda
from moeforge.functional import ExpertLoRA, expert_ffn, moe_experts, route_topk
from moeforge.hf import patch_model, unpatch_model
from moeforge.losses import load_balancing_loss, router_losses, router_z_loss
from moeforge.nn import Experts, MoE, TopKRouter

# experts_implementation="moeforge" as soon as transformers loads its MoE integration (never
# imports transformers itself: that costs seconds, and transformers is optional).
hf.install_registration_hook()

__version__ = "0.1.0"

__all__ = [
    "ExpertLoRA",
    "Experts",
    "MoE",
    "TopKRouter",
    "built_with_cuda",
    "expert_ffn",
    "hf",
    "load_balancing_loss",
    "moe_experts",
    "ops",
    "patch_model",
    "route_topk",
    "router_losses",
    "router_z_loss",
    "unpatch_model",
]
