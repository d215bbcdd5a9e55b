"""Shared fixtures: devices (cuda only when a GPU is present), seeded generators, routed inputs."""

from __future__ import annotations

import pytest
import torch

import moeforge  # noqa: F401  (loads the op library)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_topk_ids(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    *,
    device="cpu",
    dtype=torch.int64,
    distinct: bool = True,
    drop_fraction: float = 0.0,
    skip_experts: tuple[int, ...] = (),
) -> torch.Tensor:
    """``[T, K]`` expert ids: distinct per token like a real top-k router (or with repeats),
    never choosing ``skip_experts`` (so they get no rows), with ``drop_fraction`` of the pairs
    replaced by sentinels (half negative, half >= E)."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip_experts])
    if distinct:
        scores = torch.rand(num_tokens, allowed.numel())
        ids = allowed[scores.topk(top_k, dim=-1).indices]
    else:
        ids = allowed[torch.randint(0, allowed.numel(), (num_tokens, top_k))]
    if drop_fraction > 0:
        drop = torch.rand(ids.shape) < drop_fraction
        sentinel = torch.where(
            torch.rand(ids.shape) < 0.5, torch.full_like(ids, -1), torch.full_like(ids, num_experts)
        )
        ids = torch.where(drop, sentinel, ids)
    return ids.to(device=device, dtype=dtype)


# (T, K, E, distinct, drop_fraction, skip_experts): zero tokens, experts without tokens, K=1,
# K=E, dropped ids, odd sizes, repeated experts within a token.
ROUTING_CASES = [
    (0, 2, 4, True, 0.0, ()),
    (1, 1, 1, True, 0.0, ()),
    (7, 1, 5, True, 0.0, (2,)),
    (13, 4, 4, True, 0.0, ()),
    (33, 2, 8, True, 0.25, (0, 7)),
    (50, 3, 6, False, 0.1, ()),
    (129, 8, 16, True, 0.0, (3, 4, 5)),
]


def routing_case_id(case) -> str:
    t, k, e, distinct, drop, skip = case
    return f"T{t}-K{k}-E{e}{'' if distinct else '-rep'}{'-drop' if drop else ''}{'-skip' if skip else ''}"


def assert_low_precision_close(out, ref64, ref_lowp, *, factor: float = 2.0, atol: float = 1e-5):
    """The kernel's error vs float64 may be at most ``factor`` times the error of the torch
    reference computed in the same low precision, plus a tiny ``atol``."""
    assert torch.isfinite(out).all(), "non-finite values in the output"
    err = (out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_lowp.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    assert err <= factor * ref_err + atol, (
        f"error {err:.3e} > {factor} x reference error {ref_err:.3e} + {atol}"
    )
