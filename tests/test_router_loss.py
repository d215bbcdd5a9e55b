"""router_loss: HF load_balancing_loss_func semantics (all layers together, attention mask) and
the z-loss, fused; forward values, gradients, opcheck, errors."""

import pytest
import torch

import moeforge
from conftest import LOW_PRECISION
from moeforge import ops, reference


def make_logits(layers, T, E, device, dtype=torch.float64, scale=2.0):
    return [torch.randn(T, E, device=device, dtype=dtype) * scale for _ in range(layers)]


@pytest.mark.parametrize("layers,B,S,E,K", [(1, 1, 5, 4, 1), (3, 2, 7, 8, 2), (2, 3, 4, 6, 6)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_hf_load_balancing_loss(device, layers, B, S, E, K, masked):
    logits = make_logits(layers, B * S, E, device)
    mask = None
    if masked:
        mask = (torch.rand(B, S, device=device) > 0.3).long()
        mask[0, 0] = 1
    aux = moeforge.load_balancing_loss(logits, E, K, mask)
    expected = reference.load_balancing_loss(logits, E, K, mask)
    torch.testing.assert_close(aux, expected)
    z = moeforge.router_z_loss(logits, mask)
    torch.testing.assert_close(
        z, reference.router_z_loss(logits, None if mask is None else mask.reshape(-1))
    )


def test_uniform_routing_gives_top_k(device):
    logits = [torch.zeros(16, 8, device=device, dtype=torch.float64)]
    # All-equal logits: every token picks experts 0..K-1 (ties to the lower index), psum uniform.
    # aux = E * sum_e (count_e/R)(1/E) = K.
    aux, z = ops.router_loss(logits, 3)
    torch.testing.assert_close(aux, torch.tensor(3.0, dtype=torch.float64, device=device))
    torch.testing.assert_close(z, torch.tensor(8.0, dtype=torch.float64, device=device).log() ** 2)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float32])
def test_low_precision_logits(device, dtype):
    # Distinct values per row, exact in every dtype: the top-k has no ties to break.
    logits = [
        (torch.rand(64, 16, device=device).argsort(-1).to(dtype) - 8) * 0.25 for _ in range(4)
    ]
    aux, z = ops.router_loss(logits, 4)
    assert aux.dtype == torch.float32 and z.dtype == torch.float32
    ref_aux = reference.load_balancing_loss([t.double() for t in logits], 16, 4, None)
    ref_z = reference.router_z_loss([t.double() for t in logits])
    torch.testing.assert_close(aux.double(), ref_aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.double(), ref_z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(masked):
    logits = [t.requires_grad_() for t in make_logits(2, 6, 5, "cpu")]
    mask = torch.tensor([1, 0, 1, 1, 0, 1]) if masked else None

    def losses(*layers):
        aux, z = ops.router_loss(list(layers), 2, mask)
        return aux * 1.3 + z * 0.7

    torch.autograd.gradcheck(losses, tuple(logits))


def test_gradients_match_hf_reference(device):
    logits = make_logits(3, 10, 6, device)
    mask = (torch.rand(2, 5, device=device) > 0.3).long()
    mask[0, 0] = 1
    ours = [t.clone().requires_grad_() for t in logits]
    aux, z = moeforge.router_losses(ours, 2, mask)
    (aux + 0.1 * z).backward()
    ref = [t.clone().requires_grad_() for t in logits]
    (
        reference.load_balancing_loss(ref, 6, 2, mask)
        + 0.1 * reference.router_z_loss(ref, mask.reshape(-1))
    ).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
        assert a.grad.abs().sum() > 0


def test_all_rows_masked_gives_zero_loss():
    logits = make_logits(2, 4, 3, "cpu")
    aux, z = ops.router_loss(logits, 1, torch.zeros(4))
    assert aux.item() == 0 and z.item() == 0


def test_opcheck(device):
    logits = make_logits(2, 9, 5, device, torch.float32)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], device=device)
    torch.library.opcheck(torch.ops.moeforge.router_loss.default, (logits, mask, 2))
    torch.library.opcheck(
        torch.ops.moeforge.router_loss.default,
        ([t.clone().requires_grad_() for t in logits], None, 2),
    )
    _, _, counts = torch.ops.moeforge.router_loss(logits, mask, 2)
    one = torch.ones((), device=device)
    torch.library.opcheck(
        torch.ops.moeforge.router_loss_backward.default, (one, one, logits, mask, counts, 2)
    )


def test_bad_input_errors():
    logits = make_logits(2, 4, 3, "cpu", torch.float32)
    with pytest.raises(
        ValueError, match=r"moeforge\.router_loss: top_k must be in \[1, num_experts=3\], got 4"
    ):
        ops.router_loss(logits, 4)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.router_loss: logits\[1\]\.size\(1\) must equal num_experts of logits\[0\] \(3\)",
    ):
        ops.router_loss([logits[0], torch.randn(4, 5)], 1)
    with pytest.raises(
        ValueError,
        match=r"moeforge\.router_loss: logits\[0\]\.size\(0\) must equal num_tokens of row_mask \(5\)",
    ):
        ops.router_loss(logits, 1, torch.ones(5))
    with pytest.raises(
        ValueError, match=r"moeforge\.router_loss: logits must hold at least one layer"
    ):
        ops.router_loss([], 1)
    with pytest.raises(
        ValueError, match=r"moeforge\.load_balancing_loss: num_experts \(4\) must equal"
    ):
        moeforge.load_balancing_loss(logits, 4, 1)


def test_nan_logits_still_select_exactly_top_k(device):
    # Diverged training can produce NaN router logits: the selection must stay well defined (NaN
    # ranks lowest, ties to the lower index) and every kept row must count exactly top_k picks.
    for E in (8, 64):
        logits = torch.randn(5, E, device=device)
        logits[1] = float("nan")
        logits[3, ::2] = float("nan")
        _, _, counts = torch.ops.moeforge.router_loss([logits], None, 3)
        assert counts.sum().item() == 5 * 3
        assert (counts[:3] >= 1).all()  # the all-NaN row picks experts 0, 1, 2


def test_float64_top_k_is_not_rounded_to_float32():
    logits = torch.tensor([[1.0, 1.0 + 1e-12, -1.0]], dtype=torch.float64)
    _, _, counts = torch.ops.moeforge.router_loss([logits], None, 1)
    assert counts.tolist() == [0, 1, 0]
