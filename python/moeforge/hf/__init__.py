"""Hugging Face transformers + PEFT integration (optional dependencies, imported lazily).

* ``experts_implementation="moeforge"``: :func:`register_experts_implementation` (or
  :func:`install_registration_hook`, which waits for transformers to be imported) adds
  :func:`moeforge_experts_forward` to transformers' ``ExpertsInterface``; then
  ``from_pretrained(..., experts_implementation="moeforge")``, ``from_config(cfg,
  experts_implementation="moeforge")`` and ``model.set_experts_implementation("moeforge")`` work.
  It replaces the expert FFN only; PEFT expert LoRA still goes through PEFT's materialised weights.
* :func:`patch_model` / :func:`unpatch_model`: replace the experts of a bare or PEFT-wrapped model
  in place; with PEFT expert LoRA (``target_parameters``) it runs moeforge's split LoRA, never
  materialising ``B @ A``.

Importing this package imports neither transformers nor peft.
"""

from moeforge.hf.experts_interface import (
    IMPLEMENTATION_NAME,
    experts_layout,
    install_registration_hook,
    moeforge_experts_forward,
    register_experts_implementation,
)
from moeforge.hf.patch import patch_model, unpatch_model
from moeforge.hf.peft_lora import expert_loras, unwrap_param_wrappers

__all__ = [
    "IMPLEMENTATION_NAME",
    "expert_loras",
    "experts_layout",
    "install_registration_hook",
    "moeforge_experts_forward",
    "patch_model",
    "register_experts_implementation",
    "unpatch_model",
    "unwrap_param_wrappers",
]
