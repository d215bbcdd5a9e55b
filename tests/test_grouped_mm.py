"""grouped_mm: both weight layouts, bias, empty experts, dropped rows, gradients, frozen weights."""

import pytest
import torch

from conftest import LOW_PRECISION, assert_low_precision_close, random_topk_ids
from moeforge import ops, reference


def make_offsets(counts, device, dropped=0):
    offs = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offs[1:] = torch.tensor(counts).cumsum(0)
    return offs.to(device), int(offs[-1]) + dropped


def make_weight(E, n_in, n_out, transposed, device, dtype):
    shape = (E, n_in, n_out) if transposed else (E, n_out, n_in)
    return torch.randn(shape, device=device, dtype=dtype) / n_in**0.5


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    "counts,dropped", [([3, 0, 5, 1], 0), ([0, 0, 7], 4), ([0, 0], 0), ([1], 2)]
)
def test_matches_reference(device, transposed, with_bias, counts, dropped):
    offs, rows = make_offsets(counts, device, dropped)
    E, n_in, n_out = len(counts), 13, 9
    x = torch.randn(rows, n_in, device=device, dtype=torch.float64)
    w = make_weight(E, n_in, n_out, transposed, device, torch.float64)
    b = torch.randn(E, n_out, device=device, dtype=torch.float64) if with_bias else None
    out = ops.grouped_mm(x, w, offs, b, transposed)
    torch.testing.assert_close(out, reference.grouped_mm(x, w, offs, b, transposed))
    assert (out[int(offs[-1]) :] == 0).all()  # dropped rows


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(device, dtype):
    offs, rows = make_offsets([40, 0, 17, 64], device)
    x = torch.randn(rows, 96, device=device, dtype=dtype)
    w = make_weight(4, 96, 48, False, device, dtype)
    out = ops.grouped_mm(x, w, offs)
    ref64 = reference.grouped_mm(x.double(), w.double(), offs)
    assert_low_precision_close(out, ref64, reference.grouped_mm(x, w, offs))


@pytest.mark.parametrize("transposed", [False, True])
def test_gradcheck(transposed):
    offs, rows = make_offsets([2, 0, 3], "cpu", dropped=1)
    x = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)
    w = make_weight(3, 4, 5, transposed, "cpu", torch.float64).requires_grad_()
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, b: ops.grouped_mm(x, w, offs, b, transposed), (x, w, b))


def test_frozen_weight_gets_no_gradient(device):
    offs, rows = make_offsets([3, 4], device)
    x = torch.randn(rows, 8, device=device, requires_grad=True)
    w = make_weight(2, 8, 6, False, device, torch.float32)  # frozen
    ops.grouped_mm(x, w, offs).sum().backward()
    assert w.grad is None and x.grad is not None
    grads = torch.ops.moeforge.grouped_mm_backward(
        torch.ones(rows, 6, device=device), x.detach(), w, offs, False, [True, False, False]
    )
    assert grads[1].numel() == 0 and grads[2].numel() == 0  # no dW / db work done


def test_non_contiguous_x(device):
    offs, rows = make_offsets([5, 6], device)
    x = torch.randn(12, rows, device=device, dtype=torch.float64).T
    w = make_weight(2, 12, 7, False, device, torch.float64)
    torch.testing.assert_close(ops.grouped_mm(x, w, offs), reference.grouped_mm(x, w, offs))


def test_opcheck(device):
    offs, rows = make_offsets([3, 0, 2], device, dropped=1)
    x = torch.randn(rows, 6, device=device, requires_grad=True)
    w = make_weight(3, 6, 4, False, device, torch.float32).requires_grad_()
    b = torch.randn(3, 4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.moeforge.grouped_mm.default, (x, w, offs, b, False))
    wt = make_weight(3, 6, 4, True, device, torch.float32)
    torch.library.opcheck(torch.ops.moeforge.grouped_mm.default, (x.detach(), wt, offs, None, True))
    torch.library.opcheck(
        torch.ops.moeforge.grouped_mm_backward.default,
        (
            torch.randn(rows, 4, device=device),
            x.detach(),
            w.detach(),
            offs,
            False,
            [True, True, False],
        ),
    )


def test_bad_input_errors():
    offs, rows = make_offsets([2, 3], "cpu")
    x = torch.randn(rows, 4)
    w = torch.randn(2, 6, 4)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm: weight must be 3-D \[num_experts, out_features, in_features\], got shape \[6, 4\]",
    ):
        ops.grouped_mm(x, w[0], offs)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm: weight\.size\(2\) must equal in_features of x \(4\), got shape \[2, 4, 6\]",
    ):
        ops.grouped_mm(x, w.transpose(1, 2), offs)
    with pytest.raises(
        TypeError,
        match=r"moeforge\.grouped_mm: weight must have the dtype of x \(Float\), got Double",
    ):
        ops.grouped_mm(x, w.double(), offs)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm: expert_offsets\.size\(0\) must equal num_experts of weight \+ 1 \(3\)",
    ):
        ops.grouped_mm(x, w, offs[:2])
    with pytest.raises(
        TypeError, match=r"moeforge\.grouped_mm: expert_offsets must be Int, got Long"
    ):
        ops.grouped_mm(x, w, offs.long())
    with pytest.raises(
        ValueError, match=r"moeforge\.grouped_mm: expert_offsets must be non-decreasing"
    ):
        ops.grouped_mm(x, w, torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm: expert_offsets\[-1\] must be <= num_rows \(5\), got 9",
    ):
        ops.grouped_mm(x, w, torch.tensor([0, 3, 9], dtype=torch.int32))
    with pytest.raises(
        ValueError,
        match=r"moeforge\.grouped_mm: bias\.size\(1\) must equal out_features of weight \(6\)",
    ):
        ops.grouped_mm(x, w, offs, torch.randn(2, 5))


def test_pipeline_offsets_from_routing(device):
    # The offsets made by routing drive grouped_mm over permuted rows.
    ids = random_topk_ids(30, 2, 4, device=device, drop_fraction=0.2)
    plan = ops.routing(ids, 4)
    x = torch.randn(30, 8, device=device, dtype=torch.float64)
    xs = ops.permute(x, plan)
    w = make_weight(4, 8, 3, False, device, torch.float64)
    torch.testing.assert_close(
        ops.grouped_mm(xs, w, plan.expert_offsets), reference.grouped_mm(xs, w, plan.expert_offsets)
    )
