"""grouped_mm_swiglu: exactly grouped_mm then swiglu (values, rounding, dropped rows), with and
without the routing plan, its gradients, opcheck and its errors. (The one-kernel form under
MOEFORGE_GROUPED_GEMM=sm90 is checked on an H100 by tests/test_cuda.py.)"""

import pytest
import torch

from conftest import LOW_PRECISION, random_topk_ids
from moeforge import ops, reference

T, K, E, H, I = 37, 3, 6, 24, 10


def make_inputs(device, dtype, drop_fraction=0.1):
    ids = random_topk_ids(T, K, E, device=device, drop_fraction=drop_fraction, skip_experts=(2,))
    plan = ops.routing(ids, E)
    x = torch.randn(T, H, device=device, dtype=dtype)
    w = torch.randn(E, 2 * I, H, device=device, dtype=dtype) / H**0.5
    return plan, x, w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("through_plan", [False, True])
def test_equals_grouped_mm_then_swiglu(device, dtype, through_plan):
    plan, x, w = make_inputs(device, dtype)
    offs = plan.expert_offsets
    rows = x if through_plan else ops.permute(x, plan)
    h, a = ops.grouped_mm_swiglu(rows, w, offs, plan if through_plan else None)
    want_h = ops.grouped_mm(rows, w, offs, plan=plan if through_plan else None)
    assert torch.equal(h, want_h)
    assert torch.equal(a, ops.swiglu(want_h))
    kept = int(offs[-1])
    assert kept < T * K and (h[kept:] == 0).all() and (a[kept:] == 0).all()
    if dtype == torch.float64:
        xs = ops.permute(x, plan)
        ref_h = reference.grouped_mm(xs, w, offs)
        torch.testing.assert_close(h, ref_h)
        torch.testing.assert_close(a, reference.swiglu(ref_h))


@pytest.mark.parametrize("through_plan", [False, True])
def test_gradcheck(through_plan):
    """Gradients of x and the weight through both outputs (h feeds the loss directly and through
    the activation), float64."""
    plan, x, w = make_inputs("cpu", torch.float64)
    rows = x if through_plan else ops.permute(x, plan)
    rows.requires_grad_()
    w.requires_grad_()
    use_plan = plan if through_plan else None

    def both(rows, w):
        h, a = ops.grouped_mm_swiglu(rows, w, plan.expert_offsets, use_plan)
        return h, a

    torch.autograd.gradcheck(both, (rows, w))

    def only_a(rows, w):
        return ops.grouped_mm_swiglu(rows, w, plan.expert_offsets, use_plan)[1]

    torch.autograd.gradcheck(only_a, (rows, w))


def test_gradients_match_the_two_ops(device):
    """float32: the op's backward gives the gradients of grouped_mm then swiglu."""
    plan, x, w = make_inputs(device, torch.float32)
    g_h = torch.randn(T * K, 2 * I, device=device)
    g_a = torch.randn(T * K, I, device=device)
    grads = []
    for fused in (True, False):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            h, a = ops.grouped_mm_swiglu(xr, wr, plan.expert_offsets, plan)
        else:
            h = ops.grouped_mm(xr, wr, plan.expert_offsets, plan=plan)
            a = ops.swiglu(h)
        grads.append(torch.autograd.grad((h, a), (xr, wr), (g_h, g_a)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


def test_frozen_weight_and_input(device):
    """Only the input's gradient (frozen weight), or only the weight's: each equals the same
    gradient of the two ops."""
    plan, x, w = make_inputs(device, torch.float32)
    offs = plan.expert_offsets

    def grad(fused, wrt_x):
        xr = x.clone().requires_grad_(wrt_x)
        wr = w.clone().requires_grad_(not wrt_x)
        if fused:
            a = ops.grouped_mm_swiglu(xr, wr, offs, plan)[1]
        else:
            a = ops.swiglu(ops.grouped_mm(xr, wr, offs, plan=plan))
        (g,) = torch.autograd.grad(a.square().sum(), xr if wrt_x else wr)
        return g

    for wrt_x in (True, False):
        got, want = grad(True, wrt_x), grad(False, wrt_x)
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want)


def test_opcheck(device):
    plan, x, w = make_inputs(device, torch.float32)
    offs = plan.expert_offsets
    xs = ops.permute(x, plan)
    torch.library.opcheck(torch.ops.moeforge.grouped_mm_swiglu.default, (xs, w, offs))
    torch.library.opcheck(
        torch.ops.moeforge.grouped_mm_swiglu.default,
        (x, w, offs, plan.sorted_pairs, plan.pair_to_row),
    )


def test_bad_input_errors():
    op = torch.ops.moeforge.grouped_mm_swiglu
    offs = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm_swiglu: gate_up_proj must have an even number of output "
        r"columns \(gate and up halves, or interleaved pairs\), got shape \[2, 7, 4\]",
    ):
        op(torch.randn(5, 4), torch.randn(2, 7, 4), offs)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm_swiglu: .*\[2, 4, 7\] "
        r"\(weight_transposed\)",
    ):
        op(torch.randn(5, 4), torch.randn(2, 4, 7), offs, weight_transposed=True)
    with pytest.raises(ValueError, match=r"moeforge\.grouped_mm_swiglu: variant must be"):
        op(torch.randn(5, 4), torch.randn(2, 8, 4), offs, variant="relu")
    with pytest.raises(ValueError, match=r"moeforge\.grouped_mm_swiglu: limit must be > 0, got -1"):
        op(torch.randn(5, 4), torch.randn(2, 8, 4), offs, variant="gpt_oss", limit=-1.0)
    with pytest.raises(ValueError, match=r"moeforge\.grouped_mm_swiglu: .*weight"):
        op(torch.randn(5, 4), torch.randn(2, 8, 3), offs)
    with pytest.raises(
        ValueError, match=r"moeforge\.grouped_mm_swiglu: sorted_pairs and pair_to_row"
    ):
        op(torch.randn(5, 4), torch.randn(2, 8, 4), offs, torch.zeros(5, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("through_plan", [False, True])
def test_gpt_oss_layout_with_bias_equals_the_two_ops(device, dtype, through_plan):
    """gpt-oss's gate_up ([E, H, 2I], bias, interleaved clamped activation): exactly grouped_mm
    with the bias, then swiglu's gpt_oss variant."""
    plan, x, _ = make_inputs(device, dtype)
    offs = plan.expert_offsets
    w = torch.randn(E, H, 2 * I, device=device, dtype=dtype) / H**0.5
    bias = torch.randn(E, 2 * I, device=device, dtype=dtype)
    rows = x if through_plan else ops.permute(x, plan)
    use_plan = plan if through_plan else None
    kw = {"variant": "gpt_oss", "alpha": 1.5, "limit": 1.25}  # a tight limit clamps some values
    h, a = ops.grouped_mm_swiglu(rows, w, offs, use_plan, bias=bias, weight_transposed=True, **kw)
    want_h = ops.grouped_mm(rows, w, offs, bias, True, plan=use_plan)
    assert torch.equal(h, want_h)
    assert torch.equal(a, ops.swiglu(want_h, **kw))
    kept = int(offs[-1])
    assert (h[kept:] == 0).all() and (a[kept:] == 0).all()
    if dtype == torch.float64:
        ref_h = reference.grouped_mm(ops.permute(x, plan), w, offs, bias, True)
        torch.testing.assert_close(h, ref_h)
        torch.testing.assert_close(a, reference.swiglu(ref_h, **kw))


@pytest.mark.parametrize("through_plan", [False, True])
def test_gpt_oss_layout_with_bias_gradcheck(through_plan):
    plan, x, _ = make_inputs("cpu", torch.float64)
    w = torch.randn(E, H, 2 * I, dtype=torch.float64) / H**0.5
    bias = torch.randn(E, 2 * I, dtype=torch.float64)
    rows = (x if through_plan else ops.permute(x, plan)).requires_grad_()
    use_plan = plan if through_plan else None

    def fn(rows, w, bias):
        return ops.grouped_mm_swiglu(
            rows, w, plan.expert_offsets, use_plan, bias=bias, weight_transposed=True,
            variant="gpt_oss", limit=1.25,
        )  # fmt: skip

    torch.autograd.gradcheck(fn, (rows, w.requires_grad_(), bias.requires_grad_()))


def test_gpt_oss_layout_opcheck(device):
    plan, x, _ = make_inputs(device, torch.float32)
    w = torch.randn(E, H, 2 * I, device=device) / H**0.5
    bias = torch.randn(E, 2 * I, device=device)
    args = (x, w, plan.expert_offsets, plan.sorted_pairs, plan.pair_to_row, None, None, 1.0, bias)
    torch.library.opcheck(
        torch.ops.moeforge.grouped_mm_swiglu.default, (*args, True, "gpt_oss", 1.702, 1.25)
    )
