"""Every op is registered with a CPU kernel, a fake kernel, autograd where it is differentiable,
and the CUDA key (a real kernel, or a clear error in builds without CUDA)."""

import os

import pytest
import torch

import moeforge

FORWARD_OPS = [
    "permute",
    "combine",
    "grouped_mm",
    "grouped_mm_swiglu",
    "grouped_mm_lora",
    "swiglu",
    "expert_lora",
    "router_loss",
]
# Backward helpers (called by the registered backward formulas; no double backward), routing
# (integer in, integer out) and the fused layer's helpers (called inside its autograd node).
OTHER_OPS = [
    "routing",
    "routed_dot",
    "grouped_mm_backward",
    "swiglu_backward",
    "weighted_swiglu_backward",
    "weighted_swiglu_backward_",
    "expert_lora_backward",
    "lora_expand_add_",
    "router_loss_backward",
]


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"moeforge::{op}", key)


@pytest.mark.parametrize("op", FORWARD_OPS + OTHER_OPS)
def test_cpu_fake_and_cuda_registrations(op):
    assert hasattr(torch.ops.moeforge, op)
    assert has_kernel(op, "CPU")
    assert has_kernel(op, "Meta"), "fake kernel missing"
    assert has_kernel(op, "CUDA")


@pytest.mark.parametrize("op", FORWARD_OPS)
def test_autograd_registration(op):
    assert has_kernel(op, "Autograd")  # the alias key covers CPU and CUDA


@pytest.mark.skipif(
    os.environ.get("MOEFORGE_EXPECT_CUDA") != "1",
    reason="set MOEFORGE_EXPECT_CUDA=1 where the CUDA kernels must be built",
)
def test_cuda_kernels_were_built():
    assert moeforge.built_with_cuda()


@pytest.mark.skipif(
    moeforge.built_with_cuda() or not torch.cuda.is_available(),
    reason="needs a GPU and a build without CUDA kernels",
)
def test_cpu_only_build_names_the_problem_on_cuda_tensors():
    with pytest.raises(
        RuntimeError, match=r"moeforge\.routing: this build of moeforge has no CUDA kernels"
    ):
        moeforge.ops.routing(torch.zeros(2, 1, dtype=torch.long, device="cuda"), 2)
