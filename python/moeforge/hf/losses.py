"""HF router losses on moeforge's fused ``router_loss`` op.

* The auxiliary load-balancing loss: each supported family's modeling module calls its own
  module-level ``load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)``;
  :func:`patch_aux_loss` swaps that function for :func:`fused_load_balancing_loss_func`, the same
  value (HF semantics: all layers together, attention-mask aware) from one fused pass. The swap is
  per modeling module, i.e. for every model of that family in the process — harmless, since the
  function is a drop-in — and :func:`unpatch_aux_loss` restores HF's.
* The opt-in z-loss: :func:`causal_lm_forward_with_z_loss` wraps the ``<M>ForCausalLM.forward``
  of a patched model and adds ``z_loss_coef * z`` to the loss when labels are given, reusing the
  z-loss that the fused pass computed for the aux loss (``output_router_logits=True`` is needed,
  as for the aux loss). The output gains a ``z_loss`` entry.
"""

from __future__ import annotations

import contextvars
import importlib
import sys

import torch
from torch import Tensor, nn

from moeforge.losses import router_losses

__all__ = [
    "causal_lm_forward_with_z_loss",
    "fused_load_balancing_loss_func",
    "patch_aux_loss",
    "restore_all_aux_losses",
    "unpatch_aux_loss",
]

# Families whose modeling module defines the HF load_balancing_loss_func verbatim (checked against
# transformers 5.17's source; DeepSeek-V3 has no aux loss).
AUX_LOSS_FAMILIES = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "qwen3_next",
    "qwen3_5_moe",
    "gpt_oss",
)

_originals: dict[str, object] = {}  # modeling module name -> HF's load_balancing_loss_func
# Set by causal_lm_forward_with_z_loss around the model's forward; the fused aux loss leaves the
# z-loss of the same pass there. A ContextVar, so that threads (nn.DataParallel replicas, which
# HF Trainer uses on several GPUs without torch.distributed) each see their own sink. torch.compile
# before 2.15 cannot trace ContextVar.get (a fullgraph compile fails), so compiled code reads the
# innermost sink from a plain stack pushed alongside instead (one compiled forward at a time).
_z_loss_sink: contextvars.ContextVar[list[Tensor] | None] = contextvars.ContextVar(
    "moeforge_z_loss_sink", default=None
)
_z_loss_sinks_for_compile: list[list[Tensor]] = []


def _current_z_loss_sink() -> list[Tensor] | None:
    """The sink of the forward in progress in this thread (None outside one)."""
    if torch.compiler.is_compiling():
        return _z_loss_sinks_for_compile[-1] if _z_loss_sinks_for_compile else None
    return _z_loss_sink.get()


def fused_load_balancing_loss_func(
    gate_logits: Tensor | tuple[Tensor, ...] | None,
    num_experts: int | None = None,
    top_k: int = 2,
    attention_mask: Tensor | None = None,
) -> Tensor | int:
    """Drop-in for transformers' ``load_balancing_loss_func`` (same arguments, same value).

    Args:
        gate_logits: a tuple of per-layer router logits ``[B*S, E]`` (anything else gives 0, as
            in HF).
        num_experts: E.
        top_k: experts per token.
        attention_mask: optional ``[B, S]``; padding rows are excluded.

    Returns:
        The 0-d float32 aux loss (before ``router_aux_loss_coef``).
    """
    if gate_logits is None or not isinstance(gate_logits, tuple):
        return 0
    device = gate_logits[0].device
    layers = [layer.to(device) for layer in gate_logits]
    if num_experts is not None and layers[0].shape[-1] != num_experts:
        raise ValueError(
            f"moeforge.load_balancing_loss: num_experts ({num_experts}) must equal the last "
            f"dimension of router_logits, got shape {tuple(layers[0].shape)}"
        )
    mask = None if attention_mask is None else attention_mask.to(device)
    rows = layers[0].shape[0]
    if mask is not None and mask.dim() == 2 and mask.numel() != rows and rows % mask.shape[0] == 0:
        # Decoding with a KV cache: the mask covers past + new tokens, the logits only the new.
        mask = mask[:, mask.shape[1] - rows // mask.shape[0] :]
    aux, z = router_losses(layers, top_k, mask)
    sink = _current_z_loss_sink()
    if sink is not None:
        sink.append(z)
    return aux.float()  # HF accumulates in, and returns, float32 whatever the logits dtype


def _modeling_modules(model: nn.Module) -> list[str]:
    names = {type(m).__module__ for m in model.modules()}
    wanted = {f"transformers.models.{f}.modeling_{f}" for f in AUX_LOSS_FAMILIES}
    return sorted(names & wanted)


def patch_aux_loss(model: nn.Module) -> list[str]:
    """Route the aux loss of ``model``'s family through :func:`fused_load_balancing_loss_func`.

    Returns:
        The modeling modules patched, e.g.
        ``["transformers.models.qwen3_moe.modeling_qwen3_moe"]``.
    """
    patched = []
    for name in _modeling_modules(model):
        module = importlib.import_module(name)
        current = getattr(module, "load_balancing_loss_func", None)
        if current is None:
            continue
        if current is not fused_load_balancing_loss_func:
            _originals[name] = current
            module.load_balancing_loss_func = fused_load_balancing_loss_func
        patched.append(name)
    return patched


def _restore(names) -> list[str]:
    restored = []
    for name in names:
        if name in _originals:
            sys.modules[name].load_balancing_loss_func = _originals.pop(name)
            restored.append(name)
    return restored


def unpatch_aux_loss(model: nn.Module) -> list[str]:
    """Restore HF's ``load_balancing_loss_func`` in ``model``'s modeling modules."""
    return _restore(_modeling_modules(model))


def restore_all_aux_losses() -> list[str]:
    """Restore HF's ``load_balancing_loss_func`` in every modeling module moeforge patched."""
    return _restore(list(_originals))


def causal_lm_forward_with_z_loss(original, z_loss_coef: float, *args, **kwargs):
    """``<M>ForCausalLM.forward`` plus ``z_loss_coef * z_loss`` on the loss (labels given).

    Args:
        original: the forward being wrapped.
        z_loss_coef: the z-loss coefficient (ST-MoE uses 1e-3).
    """
    sink: list[Tensor] = []
    token = _z_loss_sink.set(sink)
    _z_loss_sinks_for_compile.append(sink)
    try:
        out = original(*args, **kwargs)
    finally:
        _z_loss_sink.reset(token)
        # by identity: another thread may have pushed after this one
        index = next(i for i, s in enumerate(_z_loss_sinks_for_compile) if s is sink)
        del _z_loss_sinks_for_compile[index]
    if not sink:
        return out  # no router logits were collected (output_router_logits=False)
    z = sink[-1]
    out["z_loss"] = z
    if getattr(out, "loss", None) is not None:
        out["loss"] = out.loss + z_loss_coef * z.to(out.loss.device)
    return out
