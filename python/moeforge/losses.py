"""Router losses with Hugging Face semantics, computed by the fused ``router_loss`` op."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from moeforge import ops


def _as_layers(router_logits: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [router_logits] if isinstance(router_logits, Tensor) else list(router_logits)


def _row_mask(attention_mask: Tensor | None) -> Tensor | None:
    return None if attention_mask is None else attention_mask.reshape(-1)


def router_losses(
    router_logits: Tensor | Sequence[Tensor],
    top_k: int,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Load-balancing loss and z-loss together, from one pass over the logits.

    Args:
        router_logits: ``[T, E]`` or one such tensor per MoE layer (``T = B*S``).
        top_k: experts per token.
        attention_mask: optional ``[B, S]``; padding (0) tokens are excluded.

    Returns:
        ``(aux_loss, z_loss)`` 0-d tensors (see :func:`load_balancing_loss`, :func:`router_z_loss`).
    """
    return ops.router_loss(_as_layers(router_logits), top_k, _row_mask(attention_mask))


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor],
    num_experts: int | None = None,
    top_k: int = 2,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Drop-in for transformers' ``load_balancing_loss_func`` (same arguments and value).

    ``E * sum_e (count_e / R) * (psum_e / R)`` over all layers' rows together, where count_e is
    how many kept rows chose expert e among their top-k and psum_e the summed softmax probability.
    Uniform routing gives ``top_k``. Multiply by ``router_aux_loss_coef`` as HF does.

    Args:
        router_logits: ``[T, E]`` or a sequence of per-layer ``[T, E]`` (``T = B*S``).
        num_experts: optional; checked against ``E`` when given.
        top_k: experts per token.
        attention_mask: optional ``[B, S]``.
    """
    layers = _as_layers(router_logits)
    if num_experts is not None and layers and layers[0].shape[-1] != num_experts:
        raise ValueError(
            f"moeforge.load_balancing_loss: num_experts ({num_experts}) must equal the last "
            f"dimension of router_logits, got shape {tuple(layers[0].shape)}"
        )
    return router_losses(layers, top_k, attention_mask)[0]


def router_z_loss(
    router_logits: Tensor | Sequence[Tensor], attention_mask: Tensor | None = None
) -> Tensor:
    """ST-MoE z-loss: mean over (kept) rows of all layers of ``logsumexp(logits)^2``.

    Opt-in (no HF decoder-only MoE uses it); the usual coefficient is 1e-3.
    """
    return router_losses(router_logits, 1, attention_mask)[1]
