"""The composed pipeline and the nn modules: values and every gradient vs HF's eager loop in
float64, LoRA vs PEFT's materialised delta, torch.compile(fullgraph=True) forward+backward."""

import pytest
import torch

import moeforge
from conftest import random_topk_ids
from moeforge import reference
from moeforge.functional import ExpertLoRA, moe_experts


def make_weights(E, H, I, layout, device, dtype=torch.float64):
    if layout == "hf":
        gu = torch.randn(E, 2 * I, H, device=device, dtype=dtype) / H**0.5
        dn = torch.randn(E, H, I, device=device, dtype=dtype) / I**0.5
        return gu, dn, None, None
    gu = torch.randn(E, H, 2 * I, device=device, dtype=dtype) / H**0.5
    dn = torch.randn(E, I, H, device=device, dtype=dtype) / I**0.5
    return (
        gu,
        dn,
        torch.randn(E, 2 * I, device=device, dtype=dtype),
        torch.randn(E, H, device=device, dtype=dtype),
    )


@pytest.mark.parametrize("layout", ["hf", "gpt_oss"])
@pytest.mark.parametrize(
    "T,K,E,drop", [(0, 2, 4, 0.0), (23, 1, 5, 0.0), (31, 3, 6, 0.2), (16, 4, 4, 0.0)]
)
def test_pipeline_matches_eager_loop_values_and_gradients(device, layout, T, K, E, drop):
    H, I = 12, 10
    ids = random_topk_ids(
        T, K, E, device=device, drop_fraction=drop, skip_experts=(1,) if E > 4 else ()
    )
    x = torch.randn(T, H, device=device, dtype=torch.float64)
    w = torch.rand(T, K, device=device, dtype=torch.float64)
    gu, dn, gub, dnb = make_weights(E, H, I, layout, device)
    leaves = [t.clone().requires_grad_() for t in (x, w, gu, dn)] + (
        [gub.clone().requires_grad_(), dnb.clone().requires_grad_()] if layout == "gpt_oss" else []
    )

    def run(fn, ls):
        biases = {} if layout == "hf" else {"gate_up_bias": ls[4], "down_bias": ls[5]}
        return fn(ls[0], ids, ls[1], ls[2], ls[3], layout=layout, **biases)

    out = run(moe_experts, leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    # HF's eager loop never sees sentinel ids (they match no expert), as intended.
    ref = run(reference.moe_experts_loop, ref_leaves)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    if T == 0:  # the eager loop builds no graph at all; every gradient must be zero
        assert all(gr is None or not gr.any() for gr in grads)
        return
    ref_grads = torch.autograd.grad(ref, ref_leaves, g, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want if want is not None else torch.zeros_like(got))


def test_pipeline_lora_matches_peft_materialisation(device):
    T, K, E, H, I, r = 40, 2, 4, 16, 8, 3
    ids = random_topk_ids(T, K, E, device=device)
    x = torch.randn(T, H, device=device, dtype=torch.float64)
    w = torch.rand(T, K, device=device, dtype=torch.float64)
    gu, dn, _, _ = make_weights(E, H, I, "hf", device)
    lora = {
        "gu": (
            torch.randn(E * r, H, device=device, dtype=torch.float64),
            torch.randn(2 * I, r * E, device=device, dtype=torch.float64),
        ),
        "dn": (
            torch.randn(E * r, I, device=device, dtype=torch.float64),
            torch.randn(H, r * E, device=device, dtype=torch.float64),
        ),
    }
    s = 0.5
    A_gu, B_gu = (t.requires_grad_() for t in lora["gu"])
    A_dn, B_dn = (t.requires_grad_() for t in lora["dn"])
    out = moe_experts(
        x,
        ids,
        w,
        gu,
        dn,
        gate_up_lora=ExpertLoRA(A_gu, B_gu, s),
        down_lora=ExpertLoRA(A_dn, B_dn, s),
    )
    # PEFT: W_eff = W + s * B_e A_e, materialised for every expert.
    gu_eff = gu + s * reference.peft_expert_delta_weight(A_gu, B_gu, E)
    dn_eff = dn + s * reference.peft_expert_delta_weight(A_dn, B_dn, E)
    ref = reference.moe_experts_loop(x, ids, w, gu_eff, dn_eff)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [A_gu, B_gu, A_dn, B_dn], g)
    want = torch.autograd.grad(ref, [A_gu, B_gu, A_dn, B_dn], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


def make_moe(device, dtype=torch.float64, **kw):
    args = {"hidden_size": 16, "intermediate_size": 12, "num_experts": 6, "top_k": 2}
    args.update(kw)
    return moeforge.MoE(**args, device=device, dtype=dtype)


def test_moe_module_forward_backward(device):
    moe = make_moe(device, lora_rank=4)
    for p in moe.experts.lora.parameters():  # B starts at zero (PEFT init); make it non-trivial
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 7, 16, device=device, dtype=torch.float64)
    out, logits = moe(x)
    assert out.shape == x.shape and logits.shape == (21, 6)
    # Same numbers through the eager loop with the router's own routing.
    _, weights, ids = moe.gate(x.reshape(-1, 16))
    s = moe.experts.lora["gate_up_proj"].scaling
    gu = moe.experts.gate_up_proj + s * reference.peft_expert_delta_weight(
        moe.experts.lora["gate_up_proj"].lora_A, moe.experts.lora["gate_up_proj"].lora_B, 6
    )
    dn = moe.experts.down_proj + s * reference.peft_expert_delta_weight(
        moe.experts.lora["down_proj"].lora_A, moe.experts.lora["down_proj"].lora_B, 6
    )
    ref = reference.moe_experts_loop(x.reshape(-1, 16), ids, weights, gu, dn).view_as(x)
    torch.testing.assert_close(out, ref)
    (out.square().mean() + moeforge.load_balancing_loss([logits], 6, 2)).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_names_match_hf():
    moe = make_moe("cpu")
    assert set(moe.state_dict()) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    assert moe.experts.gate_up_proj.shape == (6, 24, 16)
    assert moe.experts.down_proj.shape == (6, 16, 12)
    oss = moeforge.Experts(4, 8, 6, layout="gpt_oss")
    assert {n: tuple(p.shape) for n, p in oss.named_parameters()} == {
        "gate_up_proj": (4, 8, 12),
        "down_proj": (4, 6, 8),
        "gate_up_proj_bias": (4, 12),
        "down_proj_bias": (4, 8),
    }


def test_frozen_experts_with_lora_train_only_adapters():
    moe = make_moe("cpu", dtype=torch.float32, lora_rank=2)
    moe.experts.gate_up_proj.requires_grad_(False)
    moe.experts.down_proj.requires_grad_(False)
    for pair in moe.experts.lora.values():  # B starts at zero (PEFT init): A would get no grad
        torch.nn.init.normal_(pair.lora_B, std=0.1)
    out, _ = moe(torch.randn(10, 16))
    out.sum().backward()
    assert moe.experts.gate_up_proj.grad is None and moe.experts.down_proj.grad is None
    for p in moe.experts.lora.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph_forward_backward(device, dtype):
    torch._dynamo.reset()
    moe = make_moe(device, dtype=dtype, lora_rank=2)
    torch.nn.init.normal_(moe.experts.lora["down_proj"].lora_B, std=0.1)
    x = torch.randn(2, 9, 16, device=device, dtype=dtype)

    def step(x):
        out, logits = moe(x)
        aux, z = moeforge.router_losses([logits], 2)
        return out.float().square().mean() + 0.01 * aux + 0.001 * z

    eager_loss = step(x)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], msg=n)


def test_module_rejects_bad_arguments():
    with pytest.raises(
        ValueError, match=r"moeforge\.TopKRouter: top_k must be in \[1, num_experts=4\], got 5"
    ):
        moeforge.MoE(8, 4, 4, 5)
    with pytest.raises(ValueError, match=r"moeforge\.expert_ffn: layout must be one of"):
        moeforge.Experts(4, 8, 4, layout="mixtral")
    with pytest.raises(ValueError, match=r"moeforge\.Experts\.add_lora: rank must be >= 1, got 0"):
        moeforge.Experts(4, 8, 4).add_lora(0)
