"""swiglu: HF silu layout and gpt-oss interleaved clamped variant, forward and backward."""

import pytest
import torch

from conftest import LOW_PRECISION, assert_low_precision_close
from moeforge import ops, reference

VARIANTS = ["silu", "gpt_oss"]


def make_h(rows, inter, device, dtype, scale=3.0):
    # scale 4 puts a share of the values past gpt-oss's clamp at +-7
    return torch.randn(rows, 2 * inter, device=device, dtype=dtype) * scale


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (17, 33), (64, 96)])
def test_matches_reference(device, variant, shape):
    h = make_h(*shape, device, torch.float64, scale=4.0)
    torch.testing.assert_close(ops.swiglu(h, variant), reference.swiglu(h, variant))


def test_gpt_oss_clamps_are_exercised():
    h = make_h(64, 96, "cpu", torch.float64, scale=4.0)
    assert (h[:, ::2] > 7).any() and (h[:, 1::2].abs() > 7).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_alpha_limit(device, variant):
    h = make_h(9, 10, device, torch.float64)
    torch.testing.assert_close(
        ops.swiglu(h, variant, 1.3, 2.5), reference.swiglu(h, variant, 1.3, 2.5)
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(device, variant, dtype):
    h = make_h(128, 64, device, dtype)
    out = ops.swiglu(h, variant)
    assert out.dtype == dtype
    assert_low_precision_close(
        out, reference.swiglu(h.double(), variant), reference.swiglu(h, variant)
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_matches_autograd_of_reference(device, variant):
    h = make_h(31, 24, device, torch.float64, scale=4.0).requires_grad_()
    g = torch.randn(31, 24, device=device, dtype=torch.float64)
    (ours,) = torch.autograd.grad(ops.swiglu(h, variant), h, g)
    (ref,) = torch.autograd.grad(reference.swiglu(h, variant), h, g)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant):
    h = make_h(6, 5, "cpu", torch.float64, scale=4.0)
    # keep finite differences away from the clamp kinks at +-7
    h = torch.where((h.abs() - 7).abs() < 1e-3, h + 0.01, h).requires_grad_()
    torch.autograd.gradcheck(lambda h: ops.swiglu(h, variant), (h,))


def test_non_contiguous(device):
    h = make_h(20, 8, device, torch.float64).T.contiguous().T  # column-major
    assert not h.is_contiguous()
    torch.testing.assert_close(ops.swiglu(h), reference.swiglu(h))


def test_opcheck(device):
    h = make_h(7, 6, device, torch.float32)
    for variant in VARIANTS:
        torch.library.opcheck(torch.ops.moeforge.swiglu.default, (h, variant, 1.702, 7.0))
        torch.library.opcheck(
            torch.ops.moeforge.swiglu.default, (h.clone().requires_grad_(), variant, 1.702, 7.0)
        )
        torch.library.opcheck(
            torch.ops.moeforge.swiglu_backward.default,
            (torch.randn(7, 6, device=device), h, variant, 1.702, 7.0),
        )


def test_bad_input_errors():
    with pytest.raises(
        ValueError,
        match=r"moeforge\.swiglu: h\.size\(1\) must be even \(gate and up halves\), got 5",
    ):
        ops.swiglu(torch.randn(3, 5))
    with pytest.raises(
        ValueError, match=r"moeforge\.swiglu: variant must be \"silu\" or \"gpt_oss\", got \"gelu\""
    ):
        ops.swiglu(torch.randn(3, 4), "gelu")
    with pytest.raises(ValueError, match=r"moeforge\.swiglu: h must be 2-D"):
        ops.swiglu(torch.randn(4))
    with pytest.raises(ValueError, match=r"moeforge\.swiglu: limit must be > 0, got -1"):
        ops.swiglu(torch.randn(3, 4), "gpt_oss", 1.0, -1.0)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.swiglu_backward: grad_a\.size\(1\) must equal h\.size\(1\) / 2 \(2\)",
    ):
        torch.ops.moeforge.swiglu_backward(torch.randn(3, 3), torch.randn(3, 4))


# ---- weighted_swiglu_backward: the fused layer's backward of a_w = w[:, None] * swiglu(h) ----


def weighted_reference(grad_aw, h, w, variant, alpha=1.702, limit=7.0):
    """float64 autograd of a_w = w * swiglu(h): (grad_h, a_w, dL/dw)."""
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    a_w = w64[:, None] * reference.swiglu(h64, variant, alpha, limit)
    grad_h, grad_w = torch.autograd.grad(a_w, (h64, w64), grad_aw.double())
    return grad_h, a_w.detach(), grad_w


def off_the_kinks(h, limit=7.0):
    """h with values exactly at gpt-oss's clamp bounds moved inside. At +-limit the derivative
    is a choice of subgradient: ours passes the gradient (closed interval, swiglu_math.h),
    torch 2.15's clamp backward does not; low-precision random data hits the bounds exactly."""
    return torch.where(h.abs() == limit, h * 0.99, h)


def make_row_weights(rows, device):
    # zero, negative and ordinary weights: the gradient must not divide by w
    w = torch.rand(rows, device=device) * 2 - 0.5
    if rows > 2:
        w[::3] = 0.0
    return w


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (17, 33), (40, 300)])
def test_weighted_backward_matches_autograd_float64(device, variant, shape):
    rows, inter = shape
    h = make_h(rows, inter, device, torch.float64, scale=4.0)
    g = torch.randn(rows, inter, device=device, dtype=torch.float64)
    w = make_row_weights(rows, device).double()
    grad_h, a_w, grad_w = ops.weighted_swiglu_backward(g, h, w, variant)
    ref_h, ref_aw, ref_w = weighted_reference(g, h, w, variant)
    assert grad_w.dtype == torch.float64
    torch.testing.assert_close(grad_h, ref_h)
    torch.testing.assert_close(a_w, ref_aw)
    torch.testing.assert_close(grad_w, ref_w)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_weighted_backward_low_precision(device, variant, dtype):
    rows, inter = 96, 200
    h = off_the_kinks(make_h(rows, inter, device, dtype))
    g = torch.randn(rows, inter, device=device, dtype=dtype)
    w = make_row_weights(rows, device)  # float32 routing weights, as HF routers make them
    grad_h, a_w, grad_w = ops.weighted_swiglu_backward(g, h, w, variant)
    assert grad_h.dtype == dtype and a_w.dtype == dtype and grad_w.dtype == torch.float32
    ref_h, ref_aw, ref_w = weighted_reference(g, h, w, variant)
    # the same computation in the low precision, op by op, as the yardstick
    a_low = reference.swiglu(h, variant)
    low_aw = (w[:, None] * a_low.float()).to(dtype)
    low_w = (g.float() * a_low.float()).sum(-1)
    h_req = h.clone().requires_grad_()
    (low_h,) = torch.autograd.grad(
        reference.swiglu(h_req, variant), h_req, (g * w[:, None].to(dtype))
    )
    assert_low_precision_close(grad_h, ref_h, low_h)
    assert_low_precision_close(a_w, ref_aw, low_aw)
    assert_low_precision_close(grad_w, ref_w, low_w, atol=1e-4)


def test_weighted_backward_without_weighted_act(device):
    h = make_h(5, 6, device, torch.float64)
    g = torch.randn(5, 6, device=device, dtype=torch.float64)
    w = make_row_weights(5, device)
    grad_h, a_w, grad_w = ops.weighted_swiglu_backward(g, h, w, "silu", weighted_act=False)
    assert a_w.numel() == 0
    ref_h, _, ref_w = weighted_reference(g, h, w, "silu")
    torch.testing.assert_close(grad_h, ref_h)
    torch.testing.assert_close(grad_w, ref_w)


def test_weighted_backward_leaves_inputs_alone(device):
    h = make_h(9, 8, device, torch.float32).T.contiguous().T  # non-contiguous
    g = torch.randn(9, 8, device=device)
    w = make_row_weights(9, device).double()  # any float dtype is accepted
    before = [t.clone() for t in (h, g, w)]
    grad_h, _, grad_w = ops.weighted_swiglu_backward(g, h, w, "gpt_oss")
    for t, b in zip((h, g, w), before):
        assert torch.equal(t, b)
    ref_h, _, ref_w = weighted_reference(g, h, w, "gpt_oss")
    torch.testing.assert_close(grad_h.double(), ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-5)


def test_weighted_backward_opcheck(device):
    h = make_h(7, 6, device, torch.float32)
    g = torch.randn(7, 6, device=device)
    w = make_row_weights(7, device)
    for variant in VARIANTS:
        for want in (True, False):
            torch.library.opcheck(
                torch.ops.moeforge.weighted_swiglu_backward.default,
                (g, h, w, variant, 1.702, 7.0, want),
            )


def test_weighted_backward_bad_input_errors():
    op = torch.ops.moeforge.weighted_swiglu_backward
    with pytest.raises(
        ValueError,
        match=r"moeforge\.weighted_swiglu_backward: row_weights\.size\(0\) must equal num_rows "
        r"of h \(3\), got shape \[4\]",
    ):
        op(torch.randn(3, 2), torch.randn(3, 4), torch.randn(4))
    with pytest.raises(
        ValueError, match=r"moeforge\.weighted_swiglu_backward: row_weights must be 1-D"
    ):
        op(torch.randn(3, 2), torch.randn(3, 4), torch.randn(3, 1))
    with pytest.raises(
        TypeError,
        match=r"moeforge\.weighted_swiglu_backward: row_weights must be float32, float64, bfloat16 or float16, got Long",
    ):
        op(torch.randn(3, 2), torch.randn(3, 4), torch.ones(3, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=r"moeforge\.weighted_swiglu_backward: grad_aw\.size\(1\) must equal"
    ):
        op(torch.randn(3, 3), torch.randn(3, 4), torch.randn(3))
    with pytest.raises(
        ValueError, match=r"moeforge\.weighted_swiglu_backward: variant must be \"silu\" or"
    ):
        op(torch.randn(3, 2), torch.randn(3, 4), torch.randn(3), "relu")


# ---- weighted_swiglu_backward_: the same, grad_h written over h ----


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (17, 33), (40, 304)])
def test_weighted_backward_in_place_equals_out_of_place(device, variant, dtype, shape):
    """grad_h written over h is bitwise the out-of-place op's grad_h (each element is read before
    it is overwritten), in h's memory; a_w and the row dot products are the same too."""
    rows, inter = shape
    h = off_the_kinks(make_h(rows, inter, device, dtype))
    g = torch.randn(rows, inter, device=device, dtype=dtype)
    w = make_row_weights(rows, device)
    want = ops.weighted_swiglu_backward(g, h, w, variant)
    g_before, w_before = g.clone(), w.clone()
    for weighted_act in (True, False):
        h_work = h.clone()
        address = h_work.data_ptr()
        a_w, grad_w = ops.weighted_swiglu_backward_(
            h_work, g, w, variant, weighted_act=weighted_act
        )
        assert h_work.data_ptr() == address
        assert torch.equal(h_work, want[0])
        assert torch.equal(a_w, want[1]) if weighted_act else a_w.numel() == 0
        assert torch.equal(grad_w, want[2])
    assert torch.equal(g, g_before) and torch.equal(w, w_before)


def test_weighted_backward_in_place_opcheck(device):
    h = make_h(7, 6, device, torch.float32)
    g = torch.randn(7, 6, device=device)
    w = make_row_weights(7, device)
    for variant in VARIANTS:
        torch.library.opcheck(
            torch.ops.moeforge.weighted_swiglu_backward_.default,
            (h.clone(), g, w, variant, 1.702, 7.0, True),
        )


def test_weighted_backward_in_place_bad_input_errors():
    op = torch.ops.moeforge.weighted_swiglu_backward_
    h = torch.randn(3, 8)
    before = h.clone()
    with pytest.raises(
        ValueError,
        match=r"moeforge\.weighted_swiglu_backward_: h is overwritten with grad_h and must be "
        r"contiguous, got shape \[3, 4\] and strides \[8, 1\]",
    ):
        op(h[:, :4], torch.randn(3, 2), torch.randn(3))
    with pytest.raises(
        ValueError,
        match=r"moeforge\.weighted_swiglu_backward_: h is overwritten with grad_h and must not "
        r"share memory with grad_aw",
    ):
        op(h, h[:, :4], torch.randn(3))
    with pytest.raises(
        ValueError,
        match=r"moeforge\.weighted_swiglu_backward_: row_weights\.size\(0\) must equal num_rows "
        r"of h \(3\), got shape \[4\]",
    ):
        op(h, torch.randn(3, 4), torch.randn(4))
    assert torch.equal(h, before)  # refused before anything was written


def test_weighted_backward_in_place_takes_strided_inputs_of_their_own():
    """grad_aw and row_weights may be strided views, as long as they are not h's memory."""
    h = make_h(4, 4, "cpu", torch.float32)
    g = torch.randn(4, 8)[:, ::2]
    w = torch.randn(4, 2)[:, 0]
    want = ops.weighted_swiglu_backward(g, h, w)
    a_w, grad_w = ops.weighted_swiglu_backward_(h, g, w)
    assert torch.equal(h, want[0]) and torch.equal(a_w, want[1]) and torch.equal(grad_w, want[2])
