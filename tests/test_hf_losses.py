"""HF router losses through moeforge: the family's aux loss on the fused op (same value and
gradients as HF's load_balancing_loss_func), and the opt-in z-loss of patch_model."""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moeforge.hf as mh  # noqa: E402
from hf_models import batch, make_model, restore_hf_aux_loss, run  # noqa: E402
from moeforge import reference  # noqa: E402
from moeforge.hf import losses as hf_losses  # noqa: E402

QWEN3 = "transformers.models.qwen3_moe.modeling_qwen3_moe"


@pytest.fixture(autouse=True)
def _hf_loss_functions():
    # Other tests may leave a family patched (the swap is process-wide by design).
    restore_hf_aux_loss()
    yield
    restore_hf_aux_loss()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_fused_aux_loss_is_used_and_matches_hf(family):
    model = make_model(family)
    inputs = batch()
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    hf_fn = module.load_balancing_loss_func
    want = run(model, inputs)
    mh.patch_model(model)
    assert module.load_balancing_loss_func is hf_losses.fused_load_balancing_loss_func
    got = run(model, inputs)
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-7)  # aux_loss
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)  # loss incl. coef * aux
    mh.unpatch_model(model)
    assert module.load_balancing_loss_func is hf_fn


def test_fused_aux_loss_function_is_a_drop_in():
    hf_fn = importlib.import_module(QWEN3).load_balancing_loss_func
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    for m in (None, mask):
        torch.testing.assert_close(
            hf_losses.fused_load_balancing_loss_func(logits, 8, 2, m), hf_fn(logits, 8, 2, m)
        )
    assert hf_losses.fused_load_balancing_loss_func(None, 8, 2) == 0
    assert hf_losses.fused_load_balancing_loss_func(logits[0], 8, 2) == 0  # not a tuple: as HF


def test_z_loss_is_added_with_its_coefficient():
    model = make_model("qwen3_moe")
    inputs = batch()
    mh.patch_model(model)
    base = model(**inputs)
    z_ref = reference.router_z_loss(
        [t.detach().double() for t in base.router_logits], inputs["attention_mask"].reshape(-1)
    )
    mh.unpatch_model(model)
    mh.patch_model(model, z_loss_coef=0.01)
    out = model(**inputs)
    torch.testing.assert_close(out.z_loss.double(), z_ref)
    torch.testing.assert_close(out.loss, base.loss + 0.01 * out.z_loss)
    out.loss.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert mh.unpatch_model(model) == [n for n, m in model.named_modules() if n.endswith("experts")]
    assert "forward" not in model.__dict__
    assert "z_loss" not in model(**inputs)


def test_z_loss_arguments_are_checked():
    model = make_model("qwen3_moe")
    with pytest.raises(
        ValueError, match=r"moeforge\.patch_model: z_loss_coef must be >= 0, got -1"
    ):
        mh.patch_model(model, z_loss_coef=-1)
    with pytest.raises(ValueError, match=r"z_loss_coef > 0 needs fused_aux_loss=True"):
        mh.patch_model(model, fused_aux_loss=False, z_loss_coef=0.1)


def test_decoding_mask_longer_than_logits_uses_the_new_tokens():
    # generate() with a KV cache: router logits cover the new token of each row, the attention
    # mask covers past + new tokens.
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    got = hf_losses.fused_load_balancing_loss_func(logits, 8, 2, mask)
    torch.testing.assert_close(
        got, hf_losses.fused_load_balancing_loss_func(logits, 8, 2, mask[:, -1:])
    )


def test_generate_with_router_logits_on_a_patched_model():
    model = make_model("qwen3_moe")
    mh.patch_model(model)
    ids = batch()["input_ids"][:1]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
    )
    assert out.shape == (1, ids.shape[1] + 3)


def test_z_loss_sinks_are_per_thread():
    """Two threads (as nn.DataParallel replicas run) inside causal_lm_forward_with_z_loss at the
    same time each get the z-loss of their own pass."""
    import threading

    losses = hf_losses
    barrier = threading.Barrier(2)
    results = {}

    def forward(name, scale):
        def original():
            logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(scale)) * scale
            barrier.wait()  # both threads inside their forward before either loss is computed
            losses.fused_load_balancing_loss_func((logits,), 4, 2)
            barrier.wait()  # both losses computed before either forward returns
            return {"logits": logits}

        out = losses.causal_lm_forward_with_z_loss(original, 0.1)
        results[name] = (out["z_loss"], reference.router_z_loss((out["logits"],)))

    threads = [threading.Thread(target=forward, args=(n, s)) for n, s in (("a", 1), ("b", 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {"a", "b"}
    for got, want in results.values():
        torch.testing.assert_close(got.double(), want.double())
    assert not losses._z_loss_sinks_for_compile
