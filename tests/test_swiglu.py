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
