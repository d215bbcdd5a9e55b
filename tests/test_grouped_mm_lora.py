"""grouped_mm_lora and grouped_mm_swiglu's LoRA arguments: exactly the GEMM then
lora_expand_add_ (then swiglu) - values, rounding, dropped rows - in both weight layouts and both
adapter layouts, with and without the routing plan; their gradients, opcheck and their errors.
(The one-kernel forms under MOEFORGE_GROUPED_GEMM=sm90 are checked on an H100 by
tests/test_cuda.py.)"""

import pytest
import torch

from conftest import LOW_PRECISION, random_topk_ids
from moeforge import ops, reference

T, K, E, H, N, R = 37, 3, 6, 24, 20, 8
SCALING = 0.37


def make_inputs(device, dtype, transposed=False, rank_major=True, n_out=N):
    ids = random_topk_ids(T, K, E, device=device, drop_fraction=0.1, skip_experts=(2,))
    plan = ops.routing(ids, E)
    x = torch.randn(T, H, device=device, dtype=dtype)
    shape = (E, H, n_out) if transposed else (E, n_out, H)
    w = torch.randn(shape, device=device, dtype=dtype) / H**0.5
    u = torch.randn(T * K, R, device=device, dtype=dtype)
    lora_shape = (n_out, R * E) if rank_major else (E * R, n_out)
    lora_w = torch.randn(lora_shape, device=device, dtype=dtype) / R
    return plan, x, w, u, lora_w


def composed(rows, w, offs, u, lora_w, transposed, rank_major, plan):
    y = ops.grouped_mm(rows, w, offs, None, transposed, plan=plan)
    torch.ops.moeforge.lora_expand_add_(y, u, lora_w, offs, SCALING, rank_major)
    return y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rank_major", [True, False])
@pytest.mark.parametrize("through_plan", [False, True])
def test_equals_grouped_mm_then_lora_expand_add(
    device, dtype, transposed, rank_major, through_plan
):
    plan, x, w, u, lora_w = make_inputs(device, dtype, transposed, rank_major)
    offs = plan.expert_offsets
    rows = x if through_plan else ops.permute(x, plan)
    use_plan = plan if through_plan else None
    inputs = [t.clone() for t in (rows, w, u, lora_w)]
    y = ops.grouped_mm_lora(
        rows, w, offs, u, lora_w, SCALING, lora_rank_major=rank_major,
        weight_transposed=transposed, plan=use_plan,
    )  # fmt: skip
    assert torch.equal(y, composed(rows, w, offs, u, lora_w, transposed, rank_major, use_plan))
    for before, after in zip(inputs, (rows, w, u, lora_w), strict=True):
        assert torch.equal(before, after), "an input was modified"
    kept = int(offs[-1])
    assert kept < T * K and (y[kept:] == 0).all()
    if dtype == torch.float64:
        xs = ops.permute(x, plan)
        want = reference.grouped_mm(xs, w, offs, None, transposed)
        want = reference.lora_expand_add(want, u, lora_w, offs, SCALING, rank_major)
        torch.testing.assert_close(y, want)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rank_major", [True, False])
@pytest.mark.parametrize("through_plan", [False, True])
def test_gradcheck(transposed, rank_major, through_plan):
    plan, x, w, u, lora_w = make_inputs("cpu", torch.float64, transposed, rank_major)
    rows = x if through_plan else ops.permute(x, plan)
    use_plan = plan if through_plan else None
    args = [t.requires_grad_() for t in (rows, w, u, lora_w)]

    def fn(rows, w, u, lora_w):
        return ops.grouped_mm_lora(
            rows, w, plan.expert_offsets, u, lora_w, SCALING, lora_rank_major=rank_major,
            weight_transposed=transposed, plan=use_plan,
        )  # fmt: skip

    torch.autograd.gradcheck(fn, args)


def test_frozen_base_gradients_match_the_two_ops(device):
    """The pattern of LoRA fine-tuning - x and the adapter trainable, the weight frozen: each
    gradient equals the composition's (float32)."""
    plan, x, w, u, lora_w = make_inputs(device, torch.float32)
    offs = plan.expert_offsets
    g = torch.randn(T * K, N, device=device)
    grads = []
    for fused in (True, False):
        xr, ur, lr = (t.clone().requires_grad_() for t in (x, u, lora_w))
        if fused:
            y = ops.grouped_mm_lora(xr, w, offs, ur, lr, SCALING, plan=plan)
        else:  # lora_expand_add_ has no autograd: its term written out
            y = ops.grouped_mm(xr, w, offs, plan=plan)
            m = lr.reshape(N, R, E).permute(2, 1, 0)  # [E, r, N]
            y = y + SCALING * ops.grouped_mm(ur, m.transpose(1, 2).contiguous(), offs)
        grads.append(torch.autograd.grad(y, (xr, ur, lr), g))
    for name, got, want in zip(("x", "u", "lora_B"), *grads, strict=True):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, want, msg=name)


def test_opcheck(device):
    plan, x, w, u, lora_w = make_inputs(device, torch.float32)
    offs = plan.expert_offsets
    op = torch.ops.moeforge.grouped_mm_lora.default
    torch.library.opcheck(op, (ops.permute(x, plan), w, offs, False, u, lora_w, SCALING, True))
    torch.library.opcheck(
        op, (x, w, offs, False, u, lora_w, SCALING, True, plan.sorted_pairs, plan.pair_to_row)
    )


def test_bad_input_errors():
    op = torch.ops.moeforge.grouped_mm_lora
    offs = torch.tensor([0, 2, 5], dtype=torch.int32)
    x, w = torch.randn(5, 4), torch.randn(2, 6, 4)
    u, lora_B = torch.randn(5, 3), torch.randn(6, 6)
    op(x, w, offs, False, u, lora_B, 1.0, True)  # valid
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm_lora: lora_u\.size\(0\) must equal num_rows \(of x, or of "
        r"the routing plan\) \(5\), got shape \[4, 3\]",
    ):
        op(x, w, offs, False, torch.randn(4, 3), lora_B, 1.0, True)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm_lora: lora_weight\.size\(1\) must equal rank of lora_u \* "
        r"num_experts of expert_offsets \(6\), got shape \[6, 8\]",
    ):
        op(x, w, offs, False, u, torch.randn(6, 8), 1.0, True)
    with pytest.raises(  # lora_A's layout [E * r, out]
        ValueError,
        match=r"moeforge\.grouped_mm_lora: lora_weight\.size\(0\) must equal num_experts of "
        r"expert_offsets \* rank of lora_u \(6\), got shape \[5, 6\]",
    ):
        op(x, w, offs, False, u, torch.randn(5, 6), 1.0, False)
    with pytest.raises(
        TypeError, match=r"moeforge\.grouped_mm_lora: lora_u must have the dtype of x \(Float\)"
    ):
        op(x, w, offs, False, u.double(), lora_B, 1.0, True)


# ---- grouped_mm_swiglu with the gate_up adapter ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("through_plan", [False, True])
def test_swiglu_with_lora_equals_the_three_ops(device, dtype, through_plan):
    plan, x, w, u, lora_B = make_inputs(device, dtype, n_out=2 * N)
    offs = plan.expert_offsets
    rows = x if through_plan else ops.permute(x, plan)
    use_plan = plan if through_plan else None
    h, a = ops.grouped_mm_swiglu(
        rows, w, offs, use_plan, lora_u=u, lora_B=lora_B, lora_scaling=SCALING
    )
    want_h = composed(rows, w, offs, u, lora_B, False, True, use_plan)
    assert torch.equal(h, want_h)
    assert torch.equal(a, ops.swiglu(want_h))
    kept = int(offs[-1])
    assert (h[kept:] == 0).all() and (a[kept:] == 0).all()


def test_swiglu_with_lora_and_bias_against_float64(device):
    """gpt-oss's layout with its bias and the adapter: h = x W_e + b_e + s u B_e^T and a its
    clamped interleaved activation, against float64 references of each step."""
    plan, x, w, u, lora_B = make_inputs(device, torch.float64, transposed=True, n_out=2 * N)
    offs = plan.expert_offsets
    bias = torch.randn(E, 2 * N, device=device, dtype=torch.float64)
    h, a = ops.grouped_mm_swiglu(
        x, w, offs, plan, bias=bias, weight_transposed=True, variant="gpt_oss", limit=1.5,
        lora_u=u, lora_B=lora_B, lora_scaling=SCALING,
    )  # fmt: skip
    want_h = reference.grouped_mm(ops.permute(x, plan), w, offs, bias, True)
    want_h = reference.lora_expand_add(want_h, u, lora_B, offs, SCALING, True)
    torch.testing.assert_close(h, want_h.to(h.device))
    torch.testing.assert_close(a, reference.swiglu(want_h, "gpt_oss", limit=1.5).to(a.device))


@pytest.mark.parametrize("transposed", [False, True])
def test_bias_equals_the_composition_and_has_gradients(device, transposed):
    """grouped_mm_lora's bias is grouped_mm's, added before the LoRA term."""
    plan, x, w, u, lora_w = make_inputs(device, torch.float64, transposed)
    offs = plan.expert_offsets
    bias = torch.randn(E, N, device=device, dtype=torch.float64)
    y = ops.grouped_mm_lora(
        x, w, offs, u, lora_w, SCALING, weight_transposed=transposed, bias=bias, plan=plan
    )
    want = ops.grouped_mm(x, w, offs, bias, transposed, plan=plan)
    torch.ops.moeforge.lora_expand_add_(want, u, lora_w, offs, SCALING, True)
    assert torch.equal(y, want)
    if device == "cpu":
        args = [t.requires_grad_() for t in (x, w, u, lora_w, bias)]

        def fn(x, w, u, lora_w, bias):
            return ops.grouped_mm_lora(
                x, w, offs, u, lora_w, SCALING, weight_transposed=transposed, bias=bias,
                plan=plan,
            )  # fmt: skip

        torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("through_plan", [False, True])
def test_swiglu_with_lora_gradcheck(through_plan):
    plan, x, w, u, lora_B = make_inputs("cpu", torch.float64, n_out=2 * N)
    rows = x if through_plan else ops.permute(x, plan)
    use_plan = plan if through_plan else None
    args = [t.requires_grad_() for t in (rows, w, u, lora_B)]

    def fn(rows, w, u, lora_B):
        return ops.grouped_mm_swiglu(
            rows, w, plan.expert_offsets, use_plan, lora_u=u, lora_B=lora_B, lora_scaling=SCALING
        )

    torch.autograd.gradcheck(fn, args)


def test_swiglu_with_lora_opcheck(device):
    plan, x, w, u, lora_B = make_inputs(device, torch.float32, n_out=2 * N)
    torch.library.opcheck(
        torch.ops.moeforge.grouped_mm_swiglu.default,
        (x, w, plan.expert_offsets, plan.sorted_pairs, plan.pair_to_row, u, lora_B, SCALING),
    )


def test_swiglu_lora_errors():
    op = torch.ops.moeforge.grouped_mm_swiglu
    offs = torch.tensor([0, 2, 5], dtype=torch.int32)
    x, w, u = torch.randn(5, 4), torch.randn(2, 8, 4), torch.randn(5, 3)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm_swiglu: lora_u and lora_B must be given together .*got "
        r"lora_u given and lora_B None",
    ):
        op(x, w, offs, None, None, u, None)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm_swiglu: lora_B\.size\(0\) must equal 2 \* intermediate of "
        r"gate_up_proj \(8\), got shape \[6, 6\]",
    ):
        op(x, w, offs, None, None, u, torch.randn(6, 6))
