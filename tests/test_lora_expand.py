"""lora_expand_add_: LoRA's up-projection added in place (the fused layer's helper), vs a float64
reference built from PEFT's layouts; rows of no expert untouched; named input errors."""

import pytest
import torch

from moeforge import reference

_ops = torch.ops.moeforge


def make_case(counts, n, rank, device, dtype, *, dropped=0, rank_major=True, out_pad=0):
    E = len(counts)
    offs = torch.zeros(E + 1, dtype=torch.int32)
    offs[1:] = torch.tensor(counts).cumsum(0)
    rows = int(offs[-1]) + dropped
    out = torch.randn(rows, n + out_pad, device=device, dtype=dtype)[:, :n]  # row stride n + pad
    u = torch.randn(rows, rank, device=device, dtype=dtype)
    shape = (n, rank * E) if rank_major else (E * rank, n)
    weight = torch.randn(shape, device=device, dtype=dtype) / rank**0.5
    return out, u, weight, offs.to(device)


@pytest.mark.parametrize("rank_major", [True, False])
@pytest.mark.parametrize(
    "counts,dropped,n,rank,out_pad",
    [
        ([5, 0, 7], 3, 24, 8, 0),  # an empty expert, dropped rows
        ([1, 2, 3, 4], 0, 13, 3, 5),  # odd widths, strided out rows
        ([40], 2, 64, 20, 0),  # a long rank loop
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_float64_reference(device, dtype, counts, dropped, n, rank, out_pad, rank_major):
    out, u, weight, offs = make_case(
        counts, n, rank, device, dtype, dropped=dropped, rank_major=rank_major, out_pad=out_pad
    )
    before = out.clone()
    ref = reference.lora_expand_add(out, u, weight, offs.cpu(), 0.5, rank_major)
    _ops.lora_expand_add_(out, u, weight, offs, 0.5, rank_major)
    routed = int(offs[-1])
    assert torch.equal(out[routed:], before[routed:]), "rows of no expert were written"
    # One rounding into dtype of an fp32 (fp64) sum of `rank` products.
    eps = torch.finfo(dtype).eps
    tol = eps * ref.abs() + 4 * rank * torch.finfo(torch.float32).eps * (ref.abs() + 1)
    assert ((out.double().cpu() - ref).abs() <= tol).all()


def test_the_layouts_pick_the_expert_and_rank_entries():
    # Perturbing column j*E + e of lora_B (rank j of expert e) changes only expert e's rows; the
    # same for row e*r + j of lora_A.
    out, u, weight, offs = make_case([3, 3, 3], 4, 2, "cpu", torch.float64)
    base = out.clone()
    _ops.lora_expand_add_(base, u, weight, offs, 1.0, True)
    w2 = weight.clone()
    w2[:, 1 * 3 + 2] += 1.0
    changed = out.clone()
    _ops.lora_expand_add_(changed, u, w2, offs, 1.0, True)
    diff = (changed - base).abs().sum(1)
    assert (diff[:6] == 0).all() and (diff[6:] > 0).all()
    out, u, weight, offs = make_case([3, 3, 3], 4, 2, "cpu", torch.float64, rank_major=False)
    base = out.clone()
    _ops.lora_expand_add_(base, u, weight, offs, 1.0, False)
    w2 = weight.clone()
    w2[1 * 2 + 0] += 1.0  # rank 0 of expert 1
    changed = out.clone()
    _ops.lora_expand_add_(changed, u, w2, offs, 1.0, False)
    diff = (changed - base).abs().sum(1)
    assert (diff[3:6] > 0).all() and (diff[:3] == 0).all() and (diff[6:] == 0).all()


def test_bad_inputs_are_named(device):
    out, u, weight, offs = make_case([2, 2], 8, 2, device, torch.float32)  # lora_B [8, 4]
    with pytest.raises(TypeError, match=r"lora_expand_add_: u must have the dtype of out"):
        _ops.lora_expand_add_(out, u.double(), weight, offs, 1.0, True)
    with pytest.raises(ValueError, match=r"lora_expand_add_: lora_weight.*rank of u"):
        _ops.lora_expand_add_(out, u, weight[:, :3], offs, 1.0, True)
    with pytest.raises(ValueError, match=r"lora_expand_add_: lora_weight.*out_features of out"):
        lora_A = torch.randn(4, 9, device=device)  # [E * r, n + 1]
        _ops.lora_expand_add_(out, u, lora_A, offs, 1.0, False)
    with pytest.raises(ValueError, match=r"lora_expand_add_: out must have unit stride"):
        _ops.lora_expand_add_(out.t().contiguous().t(), u, weight, offs, 1.0, True)
    with pytest.raises(ValueError, match=r"lora_expand_add_: out's rows must not overlap"):
        _ops.lora_expand_add_(out.as_strided((4, 8), (2, 1)), u, weight, offs, 1.0, True)
    with pytest.raises(ValueError, match=r"lora_expand_add_: u.*num_rows of out"):
        _ops.lora_expand_add_(out, u[:3], weight, offs, 1.0, True)
    with pytest.raises(TypeError, match=r"lora_expand_add_: expert_offsets must be Int"):
        _ops.lora_expand_add_(out, u, weight, offs.long(), 1.0, True)


def test_corrupt_offsets_are_named_on_cpu():
    out, u, weight, offs = make_case([2, 2], 8, 4, "cpu", torch.float32)
    with pytest.raises(
        ValueError, match=r"lora_expand_add_: expert_offsets must be non-decreasing"
    ):
        _ops.lora_expand_add_(out, u, weight, torch.tensor([0, 3, 2], dtype=torch.int32), 1.0, True)


def test_one_row_with_any_row_stride(device):
    # A single row's stride(0) is arbitrary ([n, 1] transposed has strides (1, 1)).
    n, rank = 16, 8
    out = torch.randn(n, 1, device=device, dtype=torch.float32).t()
    u = torch.randn(1, rank, device=device)
    weight = torch.randn(n, rank, device=device)
    offs = torch.tensor([0, 1], dtype=torch.int32, device=device)
    ref = reference.lora_expand_add(out, u, weight, offs.cpu(), 0.5, True)
    _ops.lora_expand_add_(out, u, weight, offs, 0.5, True)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    # Schema (out mutated in place, nothing returned), fake kernel and dispatch, on the SIMT and
    # (bf16 with n % 8 == 0 on a GPU) the tensor-core path.
    for rank_major in (True, False):
        out, u, weight, offs = make_case(
            [5, 0, 7], 16, 8, device, dtype, dropped=2, rank_major=rank_major
        )
        torch.library.opcheck(
            torch.ops.moeforge.lora_expand_add_.default, (out, u, weight, offs, 0.5, rank_major)
        )
