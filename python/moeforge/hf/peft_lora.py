"""Read PEFT's expert LoRA adapters (``LoraConfig(target_parameters=[...])``) without materialising.

PEFT wraps an HF experts module targeted by ``target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]`` as a chain of ``ParamWrapper``\\ s, outermost first::

    ParamWrapper(down_proj) -> ParamWrapper(gate_up_proj) -> <M>Experts

(the order follows ``target_parameters``). Each wrapper holds, per adapter ``a``,
``lora_A[a].weight [E*r, in]`` (expert-major), ``lora_B[a].weight [out, r*E]`` (rank-major) and
``scaling[a]``, with in/out the features the projection consumes/produces whatever the weight
storage: PEFT swaps the ``[E, d1, d2]`` dims of a 3-D parameter into (in, out) = (d2, d1) unless
the experts module says ``is_transposed`` (gpt-oss ``[E, in, out]``). That is exactly
:class:`moeforge.ExpertLoRA`'s layout, so the tensors are passed as they are.

PEFT's own forward (``ParamWrapper.forward``) parametrises the expert weight as ``W + delta`` for
the whole ``[E, out, in]`` stack every step; moeforge never calls it for supported states.
"""

from __future__ import annotations

import functools

from torch import nn

from moeforge.functional import ExpertLoRA

__all__ = ["expert_loras", "is_param_wrapper", "unwrap_param_wrappers"]

_PROJECTIONS = ("gate_up_proj", "down_proj")


@functools.cache
def _param_wrapper_class() -> type | None:
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return None
    return ParamWrapper


def is_param_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA ``ParamWrapper`` (imports peft only if ``module`` comes
    from it)."""
    if not type(module).__module__.startswith("peft"):
        return False
    cls = _param_wrapper_class()
    return cls is not None and isinstance(module, cls)


def unwrap_param_wrappers(module: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """Split a ``ParamWrapper`` chain into ``(wrappers outermost first, base module)``.

    A module that is not a ``ParamWrapper`` gives ``([], module)``.
    """
    chain = []
    while is_param_wrapper(module):
        chain.append(module)
        module = module.base_layer
    return chain, module


def expert_loras(
    wrappers: list[nn.Module], num_experts: int
) -> tuple[dict[str, ExpertLoRA] | None, str]:
    """The active adapter of each wrapper as :class:`ExpertLoRA`, keyed by parameter name.

    Args:
        wrappers: from :func:`unwrap_param_wrappers`.
        num_experts: E of the wrapped experts module.

    Returns:
        ``(loras, "")`` (a projection without an active adapter is absent), or
        ``(None, reason)`` when the state is one moeforge leaves to PEFT: several active
        adapters, dropout, merged or disabled adapters, LoRA variants or bias, or a wrapped
        parameter other than gate_up_proj/down_proj.
    """
    loras: dict[str, ExpertLoRA] = {}
    for wrapper in wrappers:
        name = wrapper.parameter_name
        if name not in _PROJECTIONS:
            return None, f"PEFT wraps the parameter {name!r} (moeforge handles {_PROJECTIONS})"
        if name in loras:
            return None, f"PEFT wraps {name!r} twice"
        if getattr(wrapper, "disable_adapters", False):
            return None, "the adapters are disabled"
        if getattr(wrapper, "merged", False):
            return None, "the adapters are merged into the base weights"
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if len(active) > 1:
            return None, f"several adapters are active ({', '.join(active)})"
        if not active:
            continue
        a = active[0]
        if not isinstance(wrapper.lora_dropout[a], nn.Identity):
            return None, f"adapter {a!r} uses lora_dropout > 0"
        if wrapper.use_dora.get(a, False) or a in getattr(wrapper, "lora_variant", {}):
            return None, f"adapter {a!r} uses a LoRA variant (DoRA, ...)"
        if wrapper.lora_bias.get(a, False) or wrapper.lora_B[a].bias is not None:
            return None, f"adapter {a!r} has a LoRA bias"
        A, B = wrapper.lora_A[a].weight, wrapper.lora_B[a].weight
        if getattr(wrapper, "num_experts", None) != num_experts or A.shape[0] % num_experts:
            return None, (
                f"adapter {a!r} on {name} has lora_A {tuple(A.shape)} for "
                f"{getattr(wrapper, 'num_experts', None)} experts, the module has {num_experts}"
            )
        loras[name] = ExpertLoRA(A, B, float(wrapper.scaling[a]))
    return loras, ""
