"""grouped_mm / expert_lora reading token-major x through the routing plan (the permute fused into
the GEMM's operand load): same values and gradients as permuting first, in float64 and in the
half types, with dropped ids, empty experts and K = 1; bad plans are rejected by name."""

import pytest
import torch

from conftest import LOW_PRECISION, random_topk_ids
from moeforge import ops

E, H, OUT, R = 5, 24, 20, 3


def make_plan(T, K, device, drop=0.2):
    ids = random_topk_ids(T, K, E, device=device, drop_fraction=drop, skip_experts=(2,))
    return ops.routing(ids, E)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("T,K", [(0, 2), (1, 1), (37, 3), (64, 2)])
def test_grouped_mm_through_plan_matches_permute_first(device, transposed, T, K):
    plan = make_plan(T, K, device)
    f64 = {"device": device, "dtype": torch.float64}
    x = torch.randn(T, H, **f64, requires_grad=True)
    shape = (E, H, OUT) if transposed else (E, OUT, H)
    w = (torch.randn(shape, **f64) / H**0.5).requires_grad_()
    b = torch.randn(E, OUT, **f64, requires_grad=True)
    out = ops.grouped_mm(x, w, plan.expert_offsets, b, transposed, plan=plan)
    ref = ops.grouped_mm(ops.permute(x, plan), w, plan.expert_offsets, b, transposed)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same rows, the same sums
    if T == 0:
        return
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_grouped_mm_through_plan_low_precision(device, dtype):
    plan = make_plan(200, 4, device)
    x = torch.randn(200, 136, device=device, dtype=dtype)  # tile edges on every engine
    w = torch.randn(E, 72, 136, device=device, dtype=dtype) / 136**0.5
    out = ops.grouped_mm(x, w, plan.expert_offsets, plan=plan)
    ref = ops.grouped_mm(ops.permute(x, plan), w, plan.expert_offsets)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    for transposed, weight in ((False, w), (True, w.transpose(1, 2).contiguous())):
        _, gw, _ = torch.ops.moeforge.grouped_mm_backward(
            grad,
            x,
            weight,
            plan.expert_offsets,
            transposed,
            [False, True, False],
            plan.sorted_pairs,
            plan.pair_to_row,
        )
        _, gw_ref, _ = torch.ops.moeforge.grouped_mm_backward(
            grad,
            ops.permute(x, plan),
            weight,
            plan.expert_offsets,
            transposed,
            [False, True, False],
        )
        torch.testing.assert_close(gw, gw_ref, rtol=0, atol=0)


@pytest.mark.parametrize("T,K", [(0, 2), (33, 3)])
def test_expert_lora_through_plan_matches_permute_first(device, T, K):
    plan = make_plan(T, K, device)
    f64 = {"device": device, "dtype": torch.float64}
    x = torch.randn(T, H, **f64, requires_grad=True)
    A = torch.randn(E * R, H, **f64, requires_grad=True)
    B = torch.randn(OUT, R * E, **f64, requires_grad=True)
    out = ops.expert_lora(x, A, B, plan.expert_offsets, 0.5, plan=plan)
    ref = ops.expert_lora(ops.permute(x, plan), A, B, plan.expert_offsets, 0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if T == 0:
        return
    g = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, (x, A, B), g), torch.autograd.grad(ref, (x, A, B), g)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("x_through_plan", [False, True])
def test_expert_lora_backward_reads_grad_delta_through_plan(device, x_through_plan):
    """The fused layer's down adapter: grad_delta token-major [T, out] (dO), read through the
    plan; x in expert order or token-major. Same as permuting first."""
    T, K = 41, 3
    plan = make_plan(T, K, device)
    pairs = (plan.sorted_pairs, plan.pair_to_row)
    f64 = {"device": device, "dtype": torch.float64}
    x = torch.randn(T, H, **f64) if x_through_plan else torch.randn(T * K, H, **f64)
    x_rows = ops.permute(x, plan) if x_through_plan else x
    A, B = torch.randn(E * R, H, **f64), torch.randn(OUT, R * E, **f64)
    u = torch.randn(T * K, R, **f64)
    grad_tokens = torch.randn(T, OUT, **f64)
    got = torch.ops.moeforge.expert_lora_backward(
        grad_tokens,
        x,
        u,
        A,
        B,
        plan.expert_offsets,
        0.5,
        [True] * 3,
        *pairs,
        x_through_plan,
        True,
    )
    want = torch.ops.moeforge.expert_lora_backward(
        ops.permute(grad_tokens, plan), x_rows, u, A, B, plan.expert_offsets, 0.5, [True] * 3
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_with_plan(device):
    plan = make_plan(9, 2, device)
    x = torch.randn(9, 8, device=device)
    w = torch.randn(E, 6, 8, device=device)
    pairs = (plan.sorted_pairs, plan.pair_to_row)
    torch.library.opcheck(
        torch.ops.moeforge.grouped_mm.default,
        (x.requires_grad_(), w.requires_grad_(), plan.expert_offsets, None, False, *pairs),
    )
    A, B = torch.randn(E * 2, 8, device=device), torch.randn(6, 2 * E, device=device)
    torch.library.opcheck(
        torch.ops.moeforge.expert_lora.default,
        (x, A.requires_grad_(), B.requires_grad_(), plan.expert_offsets, 0.5, *pairs),
    )
    # the backward ops with the masks and plan uses of the fused layer
    x, w, A, B = x.detach(), w.detach(), A.detach(), B.detach()
    dy, offs = torch.randn(18, 6, device=device), plan.expert_offsets
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        torch.library.opcheck(
            torch.ops.moeforge.grouped_mm_backward.default, (dy, x, w, offs, False, mask, *pairs)
        )
        u = torch.randn(18, 2, device=device)
        torch.library.opcheck(
            torch.ops.moeforge.expert_lora_backward.default,
            (dy, x, u, A, B, offs, 0.5, mask, *pairs, True, False),
        )
        torch.library.opcheck(
            torch.ops.moeforge.expert_lora_backward.default,
            (torch.randn(9, 6, device=device), torch.randn(18, 8, device=device), u, A, B, offs,
             0.5, mask, *pairs, False, True),
        )  # fmt: skip


def test_bad_plans_are_named():
    plan = make_plan(6, 2, "cpu")
    x, w = torch.randn(6, 8), torch.randn(E, 4, 8)
    corrupt = plan.sorted_pairs.clone()
    corrupt[5] = 99
    with pytest.raises(
        ValueError, match=r"moeforge\.grouped_mm: sorted_pairs\[5\] must be in \[0, 12\), got 99"
    ):
        torch.ops.moeforge.grouped_mm(x, w, plan.expert_offsets, None, False, corrupt,
                                      plan.pair_to_row)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"moeforge\.grouped_mm_backward: x must be 2-D \[num_rows, in_features\]"
    ):
        torch.ops.moeforge.grouped_mm_backward(
            torch.randn(12, 4), torch.randn(8), w, plan.expert_offsets, False, [True, True, False]
        )
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm: sorted_pairs and pair_to_row \(the routing plan\) must be "
        r"given together, got only sorted_pairs",
    ):
        torch.ops.moeforge.grouped_mm(x, w, plan.expert_offsets, None, False, plan.sorted_pairs)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm: pair_to_row\.size\(0\) must equal num_tokens of x \(7\)",
    ):
        ops.grouped_mm(torch.randn(7, 8), w, plan.expert_offsets, plan=plan)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm_backward: grad_out\.size\(0\) must equal num_rows \(of x, "
        r"or of the routing plan\) \(12\)",
    ):
        torch.ops.moeforge.grouped_mm_backward(
            torch.randn(6, 4),
            x,
            w,
            plan.expert_offsets,
            False,
            [True, True, False],
            plan.sorted_pairs,
            plan.pair_to_row,
        )
    with pytest.raises(
        ValueError,
        match=r"moeforge\.expert_lora_backward: with the routing plan, x_through_plan or "
        r"grad_delta_through_plan must be True, got both False",
    ):
        torch.ops.moeforge.expert_lora_backward(
            torch.randn(12, 4), torch.randn(12, 8), torch.randn(12, 1), torch.randn(E, 8),
            torch.randn(4, E), plan.expert_offsets, 1.0, [True] * 3, plan.sorted_pairs,
            plan.pair_to_row, False, False,
        )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"moeforge\.expert_lora_backward: grad_delta must be 2-D \[num_tokens, features\]",
    ):
        torch.ops.moeforge.expert_lora_backward(
            torch.randn(24), torch.randn(12, 8), torch.randn(12, 1), torch.randn(E, 8),
            torch.randn(4, E), plan.expert_offsets, 1.0, [True] * 3, plan.sorted_pairs,
            plan.pair_to_row, False, True,
        )  # fmt: skip
    with pytest.raises(
        TypeError, match=r"moeforge\.expert_lora: sorted_pairs must be Int, got Long"
    ):
        torch.ops.moeforge.expert_lora(
            x,
            torch.randn(E, 8),
            torch.randn(4, E),
            plan.expert_offsets,
            1.0,
            plan.sorted_pairs.long(),
            plan.pair_to_row,
        )
