"""permute / combine / routed_dot: values vs float64 references, gradients, opcheck, errors."""

import pytest
import torch

from conftest import (
    LOW_PRECISION,
    ROUTING_CASES,
    assert_low_precision_close,
    random_topk_ids,
    routing_case_id,
)
from moeforge import ops, reference


def make_case(case, hidden, device, dtype, weight_dtype=None):
    T, K, E, distinct, drop, skip = case
    ids = random_topk_ids(
        T, K, E, device=device, distinct=distinct, drop_fraction=drop, skip_experts=skip
    )
    plan = ops.routing(ids, E)
    x = torch.randn(T, hidden, device=device, dtype=dtype)
    w = torch.rand(T, K, device=device, dtype=weight_dtype or dtype) + 0.1
    return plan, x, w


@pytest.mark.parametrize("case", ROUTING_CASES, ids=routing_case_id)
@pytest.mark.parametrize("weighted", [False, True])
def test_permute_and_combine_match_reference(device, case, weighted):
    plan, x, w = make_case(case, 37, device, torch.float64)
    w = w if weighted else None
    xs = ops.permute(x, plan, w)
    torch.testing.assert_close(xs, reference.permute(x, *plan[:2], w))
    y = torch.randn_like(xs)
    torch.testing.assert_close(ops.combine(y, plan, w), reference.combine(y, *plan[:2], w))


def test_permute_then_combine_sums_the_kept_slots(device):
    # combine(permute(x)) with unit weights counts how many kept slots each token has.
    plan, x, _ = make_case((20, 3, 5, True, 0.3, ()), 8, device, torch.float64)
    kept = (plan.pair_to_row >= 0).sum(1, keepdim=True).double()
    torch.testing.assert_close(ops.combine(ops.permute(x, plan), plan), x * kept)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float32])
def test_combine_low_precision(device, dtype):
    plan, x, w = make_case((64, 4, 8, True, 0.1, ()), 96, device, dtype, torch.float32)
    y = torch.randn(plan.sorted_pairs.numel(), 96, device=device, dtype=dtype)
    out = ops.combine(y, plan, w)
    assert out.dtype == dtype
    ref64 = reference.combine(y.double(), *plan[:2], w.double())
    assert_low_precision_close(out, ref64, reference.combine(y, *plan[:2], w))


def test_non_contiguous_inputs(device):
    plan, x, w = make_case((25, 2, 4, True, 0.0, ()), 16, device, torch.float64)
    x_nc = torch.randn(16, 25, device=device, dtype=torch.float64).T
    w_nc = torch.rand(2, 25, device=device, dtype=torch.float64).T
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    torch.testing.assert_close(
        ops.permute(x_nc, plan, w_nc), reference.permute(x_nc, *plan[:2], w_nc)
    )
    y_nc = torch.randn(16, 50, device=device, dtype=torch.float64).T
    torch.testing.assert_close(
        ops.combine(y_nc, plan, w_nc), reference.combine(y_nc, *plan[:2], w_nc)
    )


def test_inputs_are_not_modified(device):
    plan, x, w = make_case((10, 2, 3, True, 0.2, ()), 8, device, torch.float32)
    x0, w0, plan0 = x.clone(), w.clone(), [t.clone() for t in plan]
    ops.combine(ops.permute(x, plan, w), plan, w)
    assert torch.equal(x, x0) and torch.equal(w, w0)
    assert all(torch.equal(a, b) for a, b in zip(plan, plan0))


@pytest.mark.parametrize(
    "case", [ROUTING_CASES[2], ROUTING_CASES[4], ROUTING_CASES[5]], ids=routing_case_id
)
def test_gradcheck(case):
    plan, x, w = make_case(case, 5, "cpu", torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    torch.autograd.gradcheck(lambda x, w: ops.permute(x, plan, w), (x, w))
    y = torch.randn(plan.sorted_pairs.numel(), 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda y, w: ops.combine(y, plan, w), (y, w))


def test_fp32_weights_with_bf16_data_get_fp32_grads(device):
    plan, x, w = make_case((12, 2, 4, True, 0.0, ()), 8, device, torch.bfloat16, torch.float32)
    y = torch.randn(24, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
    w.requires_grad_()
    ops.combine(y, plan, w).float().sum().backward()
    assert w.grad.dtype == torch.float32 and y.grad.dtype == torch.bfloat16
    # d out / d w[t,k] = sum_h y[row(t,k), h]
    rows = plan.pair_to_row.long()
    expected = y.detach().float().sum(1)[rows]
    torch.testing.assert_close(w.grad, expected, rtol=1e-2, atol=1e-2)


def test_opcheck(device):
    plan, x, w = make_case((9, 3, 4, True, 0.2, ()), 6, device, torch.float32)
    y = torch.randn(27, 6, device=device)
    for args in [
        (x, plan.sorted_pairs, plan.pair_to_row, w),
        (x, plan.sorted_pairs, plan.pair_to_row, None),
    ]:
        torch.library.opcheck(torch.ops.moeforge.permute.default, args)
    for args in [
        (y, plan.sorted_pairs, plan.pair_to_row, w),
        (y, plan.sorted_pairs, plan.pair_to_row, None),
    ]:
        torch.library.opcheck(torch.ops.moeforge.combine.default, args)
    torch.library.opcheck(torch.ops.moeforge.routed_dot.default, (y, x, plan.pair_to_row))
    # With gradients flowing (autograd registration + AOT dispatch).
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.library.opcheck(
        torch.ops.moeforge.permute.default, (xg, plan.sorted_pairs, plan.pair_to_row, wg)
    )
    yg = y.clone().requires_grad_()
    torch.library.opcheck(
        torch.ops.moeforge.combine.default, (yg, plan.sorted_pairs, plan.pair_to_row, wg)
    )


def test_bad_input_errors():
    plan, x, w = make_case((6, 2, 3, True, 0.0, ()), 4, "cpu", torch.float32)
    with pytest.raises(
        ValueError, match=r"moeforge\.permute: x must be 2-D \[num_tokens, hidden\]"
    ):
        ops.permute(x[None], plan)
    with pytest.raises(
        TypeError,
        match=r"moeforge\.permute: x must be float32, float64, bfloat16 or float16, got Long",
    ):
        ops.permute(x.long(), plan)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.permute: pair_to_row\.size\(0\) must equal num_tokens of x \(5\)",
    ):
        ops.permute(x[:5], plan)
    with pytest.raises(
        ValueError, match=r"moeforge\.permute: weights must have the shape of pair_to_row"
    ):
        ops.permute(x, plan, w[:, :1])
    with pytest.raises(
        ValueError, match=r"moeforge\.combine: y\.size\(0\) must equal num_tokens \* top_k"
    ):
        ops.combine(torch.randn(11, 4), plan)
    with pytest.raises(TypeError, match=r"moeforge\.combine: pair_to_row must be Int"):
        torch.ops.moeforge.combine(torch.randn(12, 4), plan.sorted_pairs, plan.pair_to_row.long())
    with pytest.raises(
        ValueError, match=r"moeforge\.permute: sorted_pairs\[0\] must be in \[0, 12\), got 99"
    ):
        bad = plan.sorted_pairs.clone()
        bad[0] = 99
        torch.ops.moeforge.permute(x, bad, plan.pair_to_row)
    with pytest.raises(
        ValueError, match=r"moeforge\.routed_dot: tokens\.size\(1\) must equal hidden of rows"
    ):
        torch.ops.moeforge.routed_dot(torch.randn(12, 4), torch.randn(6, 3), plan.pair_to_row)
