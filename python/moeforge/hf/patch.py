"""``patch_model``: run the experts of an HF MoE model (bare or PEFT-wrapped) on moeforge kernels.

What is replaced: the ``forward`` of each HF experts module (``<M>Experts``, the ``experts`` child
of every sparse-MoE block) and, when PEFT wrapped it for expert LoRA, the ``forward`` of the
outermost ``ParamWrapper``, both **on the instance** (an instance attribute shadows the class
method; ``unpatch_model`` deletes it again). Nothing else changes: the block, its router instance
(so ``output_router_logits`` and the aux loss keep working), shared experts and their gates,
parameter names, shapes and dtypes (so ``state_dict``, ``save_pretrained`` and PEFT keys are the
same), and output types. Routing semantics stay each family's own, because only the expert FFN
``(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`` is replaced.

With PEFT expert LoRA the patched wrapper reads the active adapter's ``lora_A``/``lora_B``/
``scaling`` and runs moeforge's split LoRA on the routed rows; PEFT's materialising
``ParamWrapper.forward`` is only used, after a one-time warning saying why, for states moeforge
does not support (see :func:`moeforge.hf.peft_lora.expert_loras`); even then the base experts run
on moeforge kernels.

Order: call ``patch_model`` *after* ``get_peft_model`` / ``PeftModel.from_pretrained``. A model
patched before PEFT wrapped it stays correct (PEFT's path, moeforge kernels) and warns once; call
``patch_model`` again to switch to split LoRA.

When accelerate has hooked a module (``device_map``/offloading), its ``_old_forward`` is the one
replaced, so the hooks keep running.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from moeforge.hf.experts_interface import experts_layout, run_experts, warn_once
from moeforge.hf.losses import causal_lm_forward_with_z_loss, patch_aux_loss, unpatch_aux_loss
from moeforge.hf.peft_lora import expert_loras, is_param_wrapper, unwrap_param_wrappers

__all__ = ["patch_model", "unpatch_model"]

_STATE = "_moeforge_patch"  # instance attribute: (role, attribute replaced, saved value)
_MISSING = object()


def _replaced_attr(module: nn.Module) -> str:
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        return "_old_forward"  # accelerate's hooked forward calls module._old_forward
    return "forward"


def _install(module: nn.Module, role: str, fn) -> None:
    if _STATE in module.__dict__:
        return
    attr = _replaced_attr(module)
    saved = module.__dict__.get(attr, _MISSING)
    module.__dict__[_STATE] = (role, attr, saved)
    # functools.partial (not a bound method) so that the model still pickles and deep-copies.
    object.__setattr__(module, attr, functools.partial(fn, module))


def _restore(module: nn.Module) -> str | None:
    state = module.__dict__.pop(_STATE, None)
    if state is None:
        return None
    role, attr, saved = state
    if saved is _MISSING:
        module.__dict__.pop(attr, None)
    else:
        object.__setattr__(module, attr, saved)
    module.__dict__.pop("_moeforge_layout", None)
    return role


def _original_forward(module: nn.Module, *args, **kwargs):
    saved = module.__dict__[_STATE][2]
    if saved is not _MISSING:
        return saved(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def _experts_forward(
    module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """Patched ``<M>Experts.forward``: moeforge kernels on the module's (maybe PEFT-parametrised)
    weights."""
    if torch.nn.utils.parametrize.is_parametrized(module) and not getattr(
        module, "_moeforge_wrapped", False
    ):
        warn_once(
            "peft-after-patch",
            "moeforge: PEFT wrapped an experts module after moeforge.patch_model, so its expert "
            "LoRA runs through PEFT's materialised weights; call moeforge.patch_model(model) "
            "again after get_peft_model to use moeforge's split LoRA.",
        )
    layout = module.__dict__["_moeforge_layout"]
    return run_experts(module, layout, hidden_states, top_k_index, top_k_weights)


def _peft_experts_forward(
    wrapper: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    *args,
    **kwargs,
) -> Tensor:
    """Patched outermost ``ParamWrapper.forward``: base experts + split expert LoRA."""
    chain, base = unwrap_param_wrappers(wrapper)
    layout = base.__dict__.get("_moeforge_layout")
    if args or kwargs:
        loras, reason = None, "the experts were called with extra arguments"
    elif layout is None:
        loras, reason = None, "the wrapped experts module is not patched"
    else:
        loras, reason = expert_loras(chain, base.gate_up_proj.shape[0])
    if loras is None:
        warn_once(
            f"peft-fallback:{reason}",
            f"moeforge: expert LoRA runs through PEFT's own (materialising) forward because "
            f"{reason}.",
        )
        return _original_forward(
            wrapper, hidden_states, top_k_index, top_k_weights, *args, **kwargs
        )
    return run_experts(
        base,
        layout,
        hidden_states,
        top_k_index,
        top_k_weights,
        gate_up_lora=loras.get("gate_up_proj"),
        down_lora=loras.get("down_proj"),
    )


def _z_loss_forward(module: nn.Module, *args, **kwargs):
    """Patched ``<M>ForCausalLM.forward``: HF's, plus the opt-in z-loss."""
    coef = module.__dict__["_moeforge_z_loss_coef"]
    original = functools.partial(_original_forward, module)
    return causal_lm_forward_with_z_loss(original, coef, *args, **kwargs)


def _install_z_loss(model: nn.Module, z_loss_coef: float) -> list[str]:
    """Wrap the forward of every causal-LM head that adds the router aux loss."""
    heads = []
    for name, module in model.named_modules():
        # The head sets router_aux_loss_coef in __init__ (wrappers such as PeftModel only
        # forward the attribute, and must not be wrapped a second time).
        if "router_aux_loss_coef" in module.__dict__ and hasattr(module, "lm_head"):
            module.__dict__["_moeforge_z_loss_coef"] = float(z_loss_coef)
            _install(module, "z_loss", _z_loss_forward)
            heads.append(name)
    return heads


def _is_experts_like(module: nn.Module) -> bool:
    down = getattr(module, "down_proj", None)
    if isinstance(down, Tensor) and down.dim() == 3:
        return True
    # the attributes transformers' @use_experts_implementation adds
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated"))


def _unknown_moe_reason(module: nn.Module) -> str | None:
    experts = getattr(module, "experts", None)
    if isinstance(experts, nn.ModuleList):
        return "its experts are an nn.ModuleList of per-expert modules (not HF's fused experts)"
    return None


def patch_model(
    model: nn.Module,
    *,
    strict: bool = False,
    fused_aux_loss: bool = True,
    z_loss_coef: float = 0.0,
) -> list[str]:
    """Run every known MoE experts module of ``model`` on moeforge kernels, in place.

    Works on bare transformers models and on PEFT models (``get_peft_model`` /
    ``PeftModel.from_pretrained``), whose expert LoRA (``target_parameters``) then runs as
    moeforge split LoRA. Idempotent; undo with :func:`unpatch_model`.

    Args:
        model: a transformers model, a PEFT model, or any module containing them.
        strict: raise instead of warning when an MoE module cannot be patched.
        fused_aux_loss: compute the family's load-balancing loss (``output_router_logits=True``)
            with moeforge's fused ``router_loss`` op; same value as HF's
            (:mod:`moeforge.hf.losses`).
        z_loss_coef: if > 0, add ``z_loss_coef * z_loss`` (ST-MoE router z-loss, from the same
            fused pass) to the loss whenever HF adds the aux loss (labels given and
            ``output_router_logits=True``); the output gains a ``z_loss`` entry. Needs
            ``fused_aux_loss``.

    Returns:
        The qualified names of the experts modules now running on moeforge (the PEFT wrapper's
        name when wrapped, i.e. the module the MoE block calls), e.g.
        ``["model.layers.0.mlp.experts", ...]``.

    Raises:
        ValueError: with ``strict=True``, naming each MoE module left unpatched and why.
    """
    wrapped_ids = {id(m.base_layer) for m in model.modules() if is_param_wrapper(m)}
    patched: list[str] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if id(module) in wrapped_ids:
            continue  # inside a PEFT chain: handled from the outermost wrapper
        chain, base = unwrap_param_wrappers(module)
        if not _is_experts_like(base):
            reason = _unknown_moe_reason(module)
            if reason is not None:
                skipped.append(f"{name or type(module).__name__} ({reason})")
            continue
        layout, reason = experts_layout(base)
        if layout is None:
            skipped.append(f"{name} ({type(base).__name__}: {reason})")
            continue
        base.__dict__["_moeforge_layout"] = layout
        _install(base, "experts", _experts_forward)
        if chain:
            base.__dict__["_moeforge_wrapped"] = True
            _install(chain[0], "peft", _peft_experts_forward)
        patched.append(name)
    if z_loss_coef < 0:
        raise ValueError(f"moeforge.patch_model: z_loss_coef must be >= 0, got {z_loss_coef}")
    if z_loss_coef > 0 and not fused_aux_loss:
        raise ValueError("moeforge.patch_model: z_loss_coef > 0 needs fused_aux_loss=True")
    if patched and fused_aux_loss:
        patch_aux_loss(model)
        if z_loss_coef > 0:
            _install_z_loss(model, z_loss_coef)
    if skipped:
        message = (
            f"moeforge.patch_model: {len(skipped)} MoE module(s) left to transformers: "
            + "; ".join(skipped)
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    elif not patched:
        warnings.warn(
            f"moeforge.patch_model: found no MoE experts module in {type(model).__name__}",
            UserWarning,
            stacklevel=2,
        )
    return patched


def unpatch_model(model: nn.Module) -> list[str]:
    """Undo :func:`patch_model`: restore every replaced ``forward``.

    Returns:
        The names :func:`patch_model` reported for the modules restored.
    """
    restored: list[str] = []
    wrapped_ids = {id(m.base_layer) for m in model.modules() if is_param_wrapper(m)}
    for name, module in model.named_modules():
        role = _restore(module)
        module.__dict__.pop("_moeforge_wrapped", None)
        module.__dict__.pop("_moeforge_z_loss_coef", None)
        if role in ("experts", "peft") and id(module) not in wrapped_ids:
            restored.append(name)
    unpatch_aux_loss(model)
    return restored
