"""expert_lora: split LoRA in PEFT's layout vs the materialised delta PEFT builds."""

import pytest
import torch

from conftest import LOW_PRECISION, assert_low_precision_close
from moeforge import ops, reference


def make_case(counts, n_in, n_out, rank, device, dtype, dropped=0):
    offs = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offs[1:] = torch.tensor(counts).cumsum(0)
    rows = int(offs[-1]) + dropped
    E = len(counts)
    x = torch.randn(rows, n_in, device=device, dtype=dtype)
    A = torch.randn(E * rank, n_in, device=device, dtype=dtype) / n_in**0.5
    B = torch.randn(n_out, rank * E, device=device, dtype=dtype) / rank**0.5
    return x, A, B, offs.to(device)


@pytest.mark.parametrize("counts,dropped", [([4, 0, 6], 0), ([1, 2, 3, 4, 5], 3), ([0, 0], 1)])
@pytest.mark.parametrize("rank", [1, 4])
def test_matches_peft_materialised_delta(device, counts, dropped, rank):
    x, A, B, offs = make_case(counts, 11, 7, rank, device, torch.float64, dropped)
    out = ops.expert_lora(x, A, B, offs, 0.5)
    torch.testing.assert_close(out, reference.expert_lora(x, A, B, offs, 0.5))
    assert (out[int(offs[-1]) :] == 0).all()


def test_peft_layout_is_rank_major_in_B():
    # Column j*E + e of B is rank j of expert e: perturbing it changes only expert e's rows.
    x, A, B, offs = make_case([3, 3, 3], 5, 4, 2, "cpu", torch.float64)
    base = ops.expert_lora(x, A, B, offs, 1.0)
    B2 = B.clone()
    B2[:, 1 * 3 + 2] += 1.0  # rank 1 of expert 2
    diff = (ops.expert_lora(x, A, B2, offs, 1.0) - base).abs().sum(1)
    assert (diff[:6] == 0).all() and (diff[6:] > 0).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(device, dtype):
    x, A, B, offs = make_case([50, 0, 30], 64, 48, 8, device, dtype)
    out = ops.expert_lora(x, A, B, offs, 2.0)
    ref64 = reference.expert_lora(x.double(), A.double(), B.double(), offs, 2.0)
    assert_low_precision_close(out, ref64, reference.expert_lora(x, A, B, offs, 2.0))


def test_gradcheck():
    x, A, B, offs = make_case([2, 0, 3], 4, 3, 2, "cpu", torch.float64, dropped=1)
    args = tuple(t.requires_grad_() for t in (x, A, B))
    torch.autograd.gradcheck(lambda x, A, B: ops.expert_lora(x, A, B, offs, 0.7), args)


def test_gradients_match_peft_reference(device):
    x, A, B, offs = make_case([5, 2, 7], 9, 6, 3, device, torch.float64)
    g = torch.randn(14, 6, device=device, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    ours = torch.autograd.grad(ops.expert_lora(*leaves, offs, 0.25), leaves, g)
    leaves_ref = [t.clone().requires_grad_() for t in (x, A, B)]
    ref = torch.autograd.grad(reference.expert_lora(*leaves_ref, offs, 0.25), leaves_ref, g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_opcheck(device):
    x, A, B, offs = make_case([3, 0, 2], 6, 5, 2, device, torch.float32, dropped=1)
    torch.library.opcheck(torch.ops.moeforge.expert_lora.default, (x, A, B, offs, 0.5))
    grads = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.library.opcheck(torch.ops.moeforge.expert_lora.default, (*grads, offs, 0.5))
    _, u = torch.ops.moeforge.expert_lora(x, A, B, offs, 0.5)
    torch.library.opcheck(
        torch.ops.moeforge.expert_lora_backward.default,
        (torch.randn(6, 5, device=device), x, u, A, B, offs, 0.5, [True, True, True]),
    )


def test_bad_input_errors():
    x, A, B, offs = make_case([2, 2, 2], 4, 3, 2, "cpu", torch.float32)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.expert_lora: LoRA rank mismatch: lora_A\.size\(0\) must be num_experts \* rank = 3 \* r, got 5",
    ):
        ops.expert_lora(x, A[:5], B, offs, 1.0)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.expert_lora: LoRA rank mismatch: lora_B\.size\(1\) must equal lora_A\.size\(0\) \(rank \* num_experts = 6\), got 9",
    ):
        ops.expert_lora(x, A, torch.randn(3, 9), offs, 1.0)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.expert_lora: lora_A\.size\(1\) must equal in_features of x \(4\)",
    ):
        ops.expert_lora(x, torch.randn(6, 5), B, offs, 1.0)
    with pytest.raises(TypeError, match=r"moeforge\.expert_lora: lora_B must have the dtype of x"):
        ops.expert_lora(x, A, B.double(), offs, 1.0)
