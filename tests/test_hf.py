"""transformers + PEFT integration on tiny random models (float32, CPU, no downloads).

``experts_implementation="moeforge"`` and ``patch_model`` against HF eager: logits, loss, aux loss
and every parameter gradient. PEFT expert LoRA (target_parameters) against PEFT's own forward:
outputs and every LoRA gradient, non-zero expert LoRA gradients, PEFT's materialising path never
taken, fallbacks with their warnings, save_pretrained -> PeftModel.from_pretrained round trip.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import moeforge.hf as mh
from hf_models import (
    EXPERT_TARGETS,
    FAMILIES,
    LORA_TOL,
    TOL,
    assert_same_run,
    batch,
    experts_modules,
    forbid_peft_materialisation,
    fresh_hf_state,  # noqa: F401  (autouse fixture)
    lora_params,
    make_model,
    make_peft_model,
    run,
)
from moeforge.hf import experts_interface

# ------------------------------------------------------------------------------------------
# experts_implementation="moeforge"
# ------------------------------------------------------------------------------------------


def test_registration_is_lazy_and_from_config_accepts_moeforge():
    code = textwrap.dedent(
        """
        import sys, torch
        import moeforge.hf as mh
        assert "transformers" not in sys.modules
        assert mh.install_registration_hook() is False  # deferred until transformers loads
        assert "transformers" not in sys.modules
        import transformers
        cfg = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
            moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2)
        m = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="moeforge")
        assert m.config._experts_implementation == "moeforge"
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_register_is_idempotent():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert mh.register_experts_implementation() is True
    assert mh.register_experts_implementation() is True
    assert ALL_EXPERTS_FUNCTIONS["moeforge"] is mh.moeforge_experts_forward


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_implementation_matches_eager(family):
    model = make_model(family, "moeforge")
    assert model.config._experts_implementation == "moeforge"
    inputs = batch()
    got = run(model, inputs)
    model.set_experts_implementation("eager")
    want = run(model, inputs)
    assert_same_run(got, want)
    model.set_experts_implementation("moeforge")  # and back, at run time
    assert_same_run(run(model, inputs), want)


def test_unknown_experts_layout_falls_back_with_warning():
    model = make_model("qwen3_moe", "moeforge")
    experts = experts_modules(model)[0]
    experts.act_fn = nn.GELU()  # not SiLU: moeforge must not compute it
    x = torch.randn(5, 64)
    ids = torch.randint(0, 8, (5, 2))
    w = torch.rand(5, 2)
    with pytest.warns(UserWarning, match="not SiLU"):
        got = experts(x, ids, w)
    model.set_experts_implementation("eager")
    torch.testing.assert_close(got, experts(x, ids, w), **TOL)


# ------------------------------------------------------------------------------------------
# patch_model on bare models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_model_matches_eager_and_unpatch_restores(family):
    model = make_model(family, "eager")
    inputs = batch()
    want = run(model, inputs)
    state = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    names = mh.patch_model(model)
    expected = [n for n, m in model.named_modules() if type(m).__name__.endswith("Experts")]
    assert names == expected and names
    assert mh.patch_model(model) == names  # idempotent
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == state
    assert all("forward" in m.__dict__ for m in experts_modules(model))
    assert_same_run(run(model, inputs), want)
    assert mh.unpatch_model(model) == names
    assert all("forward" not in m.__dict__ for m in experts_modules(model))
    assert_same_run(run(model, inputs), want)


def test_patch_model_really_runs_moeforge(monkeypatch):
    model = make_model("qwen3_moe")
    mh.patch_model(model)
    calls = []
    real = experts_interface.moe_experts
    monkeypatch.setattr(
        experts_interface, "moe_experts", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model(**batch())
    assert len(calls) == 2


class _ListExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])


def test_unknown_moe_blocks_warn_or_raise():
    model = nn.Sequential(_ListExperts())
    with pytest.warns(UserWarning, match=r"0 \(its experts are an nn.ModuleList"):
        assert mh.patch_model(model) == []
    with pytest.raises(ValueError, match="left to transformers"):
        mh.patch_model(model, strict=True)
    hf = make_model("qwen3_moe")
    experts_modules(hf)[1].has_gate = False  # e.g. NemotronH's ungated experts
    with pytest.raises(
        ValueError, match=r"model.layers.1.mlp.experts \(Qwen3MoeExperts: it has no gate"
    ):
        mh.patch_model(hf, strict=True)


# ------------------------------------------------------------------------------------------
# PEFT expert LoRA
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_peft_expert_lora_matches_peft(family, monkeypatch):
    pmodel = make_peft_model(family)
    params = lora_params(pmodel)
    expert_lora = [n for n in params if ".experts." in n]
    assert len(expert_lora) == 8  # A and B of both projections, both layers
    inputs = batch()
    want = run(pmodel, inputs, params)
    names = mh.patch_model(pmodel)
    assert names == [f"base_model.model.model.layers.{i}.mlp.experts" for i in range(2)]
    with monkeypatch.context() as m:
        forbid_peft_materialisation(m)
        got = run(pmodel, inputs, params)
    assert_same_run(got, want, tol=LORA_TOL, check_grads_nonzero=expert_lora)
    mh.unpatch_model(pmodel)
    assert_same_run(run(pmodel, inputs, params), want)


def test_peft_patched_before_get_peft_model_warns_then_repatch_upgrades(monkeypatch):
    peft = pytest.importorskip("peft")
    ref = make_peft_model("qwen3_moe")
    inputs = batch()
    want = run(ref, inputs, lora_params(ref))
    model = make_model("qwen3_moe")
    mh.patch_model(model)  # before PEFT
    pmodel = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS
        ),
    )
    pmodel.load_state_dict(ref.state_dict())
    params = lora_params(pmodel)
    with pytest.warns(UserWarning, match="call moeforge.patch_model"):
        assert_same_run(run(pmodel, inputs, params), want, tol=LORA_TOL)
    mh.patch_model(pmodel)
    with monkeypatch.context() as m:
        forbid_peft_materialisation(m)
        assert_same_run(run(pmodel, inputs, params), want, tol=LORA_TOL)


def test_peft_unsupported_states_fall_back_with_warning():
    pmodel = make_peft_model("qwen3_moe")
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    mh.patch_model(pmodel)

    def logits():
        with torch.no_grad():
            return pmodel(**inputs).logits

    def peft_logits():
        mh.unpatch_model(pmodel)
        try:
            return logits()
        finally:
            mh.patch_model(pmodel)

    with pytest.warns(UserWarning, match="the adapters are disabled"), pmodel.disable_adapter():
        torch.testing.assert_close(logits(), peft_logits(), **LORA_TOL)

    pmodel.add_adapter("second", pmodel.peft_config["default"])
    pmodel.base_model.set_adapter(["default", "second"])
    with pytest.warns(UserWarning, match=r"several adapters are active \(default, second\)"):
        torch.testing.assert_close(logits(), peft_logits(), **LORA_TOL)
    pmodel.base_model.set_adapter("default")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # back to the supported state: no warning
        unmerged = logits()
    pmodel.merge_adapter()
    with pytest.warns(UserWarning, match="merged into the base weights"):
        torch.testing.assert_close(logits(), unmerged, rtol=1e-4, atol=1e-5)
    pmodel.unmerge_adapter()


def test_peft_save_load_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    pmodel = make_peft_model("qwen3_moe")
    mh.patch_model(pmodel)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        want = pmodel(**inputs).logits
    pmodel.save_pretrained(tmp_path)
    saved = set(peft.utils.load_peft_weights(str(tmp_path)))
    assert any(".experts.lora_A" in k for k in saved)  # PEFT's own key names
    assert any(".experts.base_layer.lora_B" in k for k in saved)

    # plain transformers + PEFT, never patched: the same outputs
    loaded = peft.PeftModel.from_pretrained(make_model("qwen3_moe", seed=0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, **LORA_TOL)
        mh.patch_model(loaded)
        torch.testing.assert_close(loaded(**inputs).logits, want, **TOL)


def test_patched_model_compiles_fullgraph():
    # aot_eager: dynamo + AOTAutograd trace the whole model through moeforge's fake kernels and
    # autograd with no graph break, and run eager kernels, so results must equal eager's.
    # (Inductor would also reorder the float math of attention and norms around our ops.)
    torch._dynamo.reset()
    model = make_model("qwen3_moe")
    inputs = batch()
    mh.patch_model(model)
    want = run(model, inputs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = run(compiled, inputs, dict(model.named_parameters()))
    assert_same_run(got, want)
