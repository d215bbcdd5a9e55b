"""``experts_implementation="moeforge"``: transformers' ``<M>Experts`` computed by moeforge kernels.

transformers (>= 5) decorates every fused-experts class with ``@use_experts_implementation``, which
dispatches ``<M>Experts.forward`` to ``ExpertsInterface[config._experts_implementation]`` with the
contract ``fn(experts_module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) ->
[T, H]`` in ``hidden_states.dtype``. Only the expert FFN is replaced: routing, shared experts and
the auxiliary loss stay HF's.

The decorator's layout flags (read with defaults, as older/newer releases may lack some):

* ``is_concatenated=True, is_transposed=False, has_bias=False, has_gate=True`` with the default
  ``_apply_gate`` (``act_fn(gate) * up``, gate rows first) and a SiLU ``act_fn``: moeforge's
  ``"hf"`` layout (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3, Qwen3-Next, Qwen3.5-MoE, ...).
* ``is_concatenated=False, is_transposed=True, has_bias=True`` with ``alpha``/``limit``
  attributes: moeforge's ``"gpt_oss"`` layout (interleaved gate/up, clamped SwiGLU).

Any other experts module (``has_gate=False``, other activations or gates, other flag
combinations) runs transformers' own ``grouped_mm`` implementation after a one-time warning.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moeforge import ops
from moeforge.functional import ExpertLoRA, moe_experts

__all__ = [
    "IMPLEMENTATION_NAME",
    "experts_layout",
    "install_registration_hook",
    "moeforge_experts_forward",
    "register_experts_implementation",
    "run_experts",
]

IMPLEMENTATION_NAME = "moeforge"
_HF_MOE_MODULE = "transformers.integrations.moe"

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a ``UserWarning`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def _is_silu(act_fn: object) -> bool:
    if isinstance(act_fn, nn.SiLU):
        return True
    # transformers' ACT2FN["silu"] is its own SiLUActivation (an nn.Module calling F.silu).
    return type(act_fn).__name__ == "SiLUActivation"


def _uses_default_gate(module: nn.Module) -> bool:
    gate = getattr(type(module), "_apply_gate", None)
    if gate is None:
        return False
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a release without it: trust the name
        return getattr(gate, "__name__", "") == "_default_apply_gate"
    return gate is _default_apply_gate


def experts_layout(module: nn.Module) -> tuple[str | None, str]:
    """Which moeforge layout computes this HF experts module.

    Args:
        module: an HF ``<M>Experts`` module (decorated with ``@use_experts_implementation``).

    Returns:
        ``(layout, reason)``: layout ``"hf"`` or ``"gpt_oss"`` with ``reason == ""``, or
        ``(None, reason)`` saying why moeforge cannot compute it.
    """
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gate_up, Tensor) or not isinstance(down, Tensor):
        return None, "it has no 3-D gate_up_proj/down_proj parameters"
    if gate_up.dim() != 3 or down.dim() != 3:
        return None, (
            f"gate_up_proj/down_proj must be 3-D, got {tuple(gate_up.shape)} and "
            f"{tuple(down.shape)}"
        )
    has_gate = getattr(module, "has_gate", True)
    has_bias = getattr(module, "has_bias", False)
    transposed = getattr(module, "is_transposed", False)
    concatenated = getattr(module, "is_concatenated", True)
    if not has_gate:
        return None, "it has no gate (has_gate=False)"
    E = gate_up.shape[0]
    if not transposed and concatenated and not has_bias:
        act_fn = getattr(module, "act_fn", None)
        if not _is_silu(act_fn):
            return None, f"its activation is {type(act_fn).__name__}, not SiLU"
        if not _uses_default_gate(module):
            return None, "it overrides _apply_gate"
        H = gate_up.shape[2]
        if gate_up.shape[1] % 2 or tuple(down.shape) != (E, H, gate_up.shape[1] // 2):
            return None, (
                f"shapes gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are "
                "not [E, 2I, H] / [E, H, I]"
            )
        return "hf", ""
    if transposed and not concatenated and has_bias:
        if not (hasattr(module, "alpha") and hasattr(module, "limit")):
            return None, "interleaved transposed experts without gpt-oss alpha/limit"
        H = gate_up.shape[1]
        if gate_up.shape[2] % 2 or tuple(down.shape) != (E, gate_up.shape[2] // 2, H):
            return None, (
                f"shapes gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are "
                "not [E, H, 2I] / [E, I, H]"
            )
        return "gpt_oss", ""
    return None, (
        f"unsupported layout flags is_transposed={transposed}, is_concatenated={concatenated}, "
        f"has_bias={has_bias}"
    )


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _cast_lora(lora: ExpertLoRA | None, dtype: torch.dtype) -> ExpertLoRA | None:
    if lora is None or (lora.lora_A.dtype == dtype and lora.lora_B.dtype == dtype):
        return lora
    return ExpertLoRA(lora.lora_A.to(dtype), lora.lora_B.to(dtype), lora.scaling)


def run_experts(
    module: nn.Module,
    layout: str,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    *,
    gate_up_proj: Tensor | None = None,
    down_proj: Tensor | None = None,
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
) -> Tensor:
    """Compute an HF experts module of a known ``layout`` with :func:`moeforge.moe_experts`.

    Args:
        module: the HF experts module (weights, biases, alpha/limit are read from it).
        layout: from :func:`experts_layout`.
        hidden_states: ``[T, H]``.
        top_k_index: ``[T, K]`` int expert ids (ids outside ``[0, E)`` are dropped).
        top_k_weights: ``[T, K]`` routing weights.
        gate_up_proj, down_proj: override the module's weights (e.g. PEFT's un-parametrised
            originals); default ``module.gate_up_proj`` / ``module.down_proj``.
        gate_up_lora, down_lora: split expert LoRA in PEFT's layout (never materialised).

    Returns:
        ``[T, H]`` in ``hidden_states.dtype``.
    """
    gate_up = module.gate_up_proj if gate_up_proj is None else gate_up_proj
    down = module.down_proj if down_proj is None else down_proj
    dtype = gate_up.dtype
    x = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)
    weights = top_k_weights
    if weights.dtype not in (torch.float32, dtype):
        weights = weights.float()
    kwargs = {}
    if layout == "gpt_oss":
        kwargs = {
            "gate_up_bias": _cast(getattr(module, "gate_up_proj_bias", None), dtype),
            "down_bias": _cast(getattr(module, "down_proj_bias", None), dtype),
            "alpha": float(getattr(module, "alpha", ops.GPT_OSS_ALPHA)),
            "limit": float(getattr(module, "limit", ops.GPT_OSS_LIMIT)),
        }
    out = moe_experts(
        x,
        top_k_index,
        weights,
        gate_up,
        down.to(dtype),
        layout=layout,
        gate_up_lora=_cast_lora(gate_up_lora, dtype),
        down_lora=_cast_lora(down_lora, dtype),
        **kwargs,
    )
    return out.to(hidden_states.dtype)


def _hf_fallback(module: nn.Module, *args, **kwargs) -> Tensor:
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(module, *args, **kwargs)


def moeforge_experts_forward(
    module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The ``experts_implementation="moeforge"`` function (HF ``ExpertsInterface`` contract).

    Args:
        module: an HF ``<M>Experts`` module.
        hidden_states: ``[T, H]``.
        top_k_index: ``[T, K]`` int64 expert ids.
        top_k_weights: ``[T, K]`` routing weights (model dtype or fp32).

    Returns:
        ``[T, H]`` in ``hidden_states.dtype``. Layouts moeforge does not know run transformers'
        ``grouped_mm`` implementation instead, after a one-time warning that says why.
    """
    layout, reason = experts_layout(module)
    if layout is None:
        name = type(module).__name__
        warn_once(
            f"layout:{name}",
            f"moeforge: {name} runs transformers' grouped_mm experts instead of moeforge "
            f"because {reason}.",
        )
        return _hf_fallback(module, hidden_states, top_k_index, top_k_weights)
    return run_experts(module, layout, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> bool:
    """Register ``experts_implementation="moeforge"`` with transformers (idempotent).

    After this, ``from_pretrained(..., experts_implementation="moeforge")``,
    ``from_config(cfg, experts_implementation="moeforge")`` and
    ``model.set_experts_implementation("moeforge")`` select :func:`moeforge_experts_forward`.

    Returns:
        True if "moeforge" is registered (now or before); False if transformers (or its
        ``ExpertsInterface``, transformers >= 5) is not installed.
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    mapping = getattr(ExpertsInterface, "_global_mapping", {})
    if mapping.get(IMPLEMENTATION_NAME) is not moeforge_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION_NAME, moeforge_experts_forward)
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after ``transformers.integrations.moe`` is first imported, so that
    ``import moeforge`` never imports transformers itself (it costs seconds)."""

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != _HF_MOE_MODULE:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None) if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        exec_module = loader.exec_module
        callback = self.callback

        def exec_then_register(module):
            exec_module(module)
            try:
                callback()
            except Exception as exc:  # never break importing transformers
                warnings.warn(
                    f"moeforge: could not register experts_implementation='moeforge': {exc}",
                    UserWarning,
                    stacklevel=2,
                )

        loader.exec_module = exec_then_register  # this loader instance serves this module only
        return spec


_hook: _RegisterAfterImport | None = None


def install_registration_hook() -> bool:
    """Make ``experts_implementation="moeforge"`` available without importing transformers.

    Registers at once when ``transformers.integrations.moe`` is already imported; otherwise
    installs a ``sys.meta_path`` finder that registers right after transformers imports it.

    Returns:
        True if registered now, False if deferred (or transformers is absent).
    """
    global _hook
    if _HF_MOE_MODULE in sys.modules:
        return register_experts_implementation()
    if _hook is None:
        _hook = _RegisterAfterImport(register_experts_implementation)
        sys.meta_path.insert(0, _hook)
    return False
