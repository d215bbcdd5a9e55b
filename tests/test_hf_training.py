"""transformers + PEFT integration beyond test_hf.py: more families, bfloat16, training.

* Qwen3-Next and Qwen3.5-MoE (text model; hybrid linear/full attention, shared expert with a
  sigmoid gate): ``patch_model`` and ``experts_implementation="moeforge"`` vs HF eager in float32
  (logits, loss, aux loss, every gradient), and PEFT expert LoRA vs PEFT's own.
* bfloat16 (every family but Qwen3.5-MoE, see MARGIN_FAMILIES; Qwen3-MoE, Mixtral, gpt-oss also
  via experts_implementation and with PEFT fp32 adapters on the bf16 base):
  moeforge's error vs a float64 HF eager run is at most twice HF eager's own bf16 error vs that
  run, plus 1e-5 for tensors and an eighth of a bf16 ulp for the scalars loss and aux loss.
* Gradient checkpointing (reentrant and not) with ``patch_model``, bare and with PEFT expert LoRA.
* HF ``Trainer`` on a patched PEFT Qwen3-MoE (LoRA on q/k/v/o and the experts), with and without
  gradient checkpointing.
* Models mixing dense and MoE layers (``mlp_only_layers``, ``decoder_sparse_step``).

Tiny random models from configs, CPU, no downloads.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import moeforge.hf as mh
from hf_models import (
    EXPERT_TARGETS,
    HYBRID_FAMILIES,
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


@pytest.fixture
def moeforge_calls(monkeypatch):
    """A list that grows by one on every call of moeforge's expert pipeline."""
    calls = []
    real = experts_interface.moe_experts

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_interface, "moe_experts", counting)
    return calls


def moe_layer_names(model, prefix="model.layers"):
    return [
        f"{prefix}.{i}.mlp.experts"
        for i, layer in enumerate(model.get_decoder().layers)
        if hasattr(layer.mlp, "experts")
    ]


def assert_untouched(*modules):
    """Still transformers' own modules: nothing of moeforge's installed on them."""
    for module in modules:
        for m in module.modules():
            assert "forward" not in m.__dict__, f"{type(m).__name__}.forward was replaced"
            assert not any(k.startswith("_moeforge") for k in m.__dict__), type(m).__name__


# ------------------------------------------------------------------------------------------
# Qwen3-Next and Qwen3.5-MoE
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_families_match_eager(family, moeforge_calls):
    model = make_model(family, "moeforge")
    assert model.config._experts_implementation == "moeforge"
    layers = model.get_decoder().layers
    assert model.config.layer_types == ["linear_attention", "full_attention"]
    assert hasattr(layers[0], "linear_attn") and hasattr(layers[1], "self_attn")
    inputs = batch()
    got = run(model, inputs)
    assert len(moeforge_calls) == 2
    model.set_experts_implementation("eager")
    want = run(model, inputs)
    assert want[2] is not None  # the aux loss is compared too
    # the shared experts and their sigmoid gates run (and get gradients) exactly as in HF
    shared = [n for n in want[3] if ".shared_expert" in n]
    assert sum(".shared_expert_gate." in n for n in shared) == 2
    assert_same_run(got, want, check_grads_nonzero=shared)

    names = mh.patch_model(model)
    assert (
        names
        == moe_layer_names(model)
        == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    )
    for layer in layers:
        mlp = layer.mlp
        assert type(mlp.shared_expert).__module__.startswith("transformers.models.")
        assert type(mlp.shared_expert_gate) is nn.Linear
        assert_untouched(mlp.gate, mlp.shared_expert, mlp.shared_expert_gate)
        assert "forward" not in mlp.__dict__
    moeforge_calls.clear()
    assert_same_run(run(model, inputs), want, check_grads_nonzero=shared)
    assert len(moeforge_calls) == 2
    assert mh.unpatch_model(model) == names
    assert_same_run(run(model, inputs), want)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_families_peft_expert_lora_matches_peft(family, monkeypatch):
    pmodel = make_peft_model(family)
    params = lora_params(pmodel)
    expert_lora = [n for n in params if ".experts." in n]
    assert len(expert_lora) == 8
    inputs = batch()
    want = run(pmodel, inputs, params)
    assert mh.patch_model(pmodel) == moe_layer_names(pmodel, "base_model.model.model.layers")
    with monkeypatch.context() as m:
        forbid_peft_materialisation(m)
        got = run(pmodel, inputs, params)
    assert_same_run(got, want, tol=LORA_TOL, check_grads_nonzero=expert_lora)


# ------------------------------------------------------------------------------------------
# bfloat16: error ratios against a float64 HF eager run
# ------------------------------------------------------------------------------------------

BF16_FACTOR = 2.0
BF16_ATOL = 1e-5
# A scalar summary (loss, aux loss) is one sample of a rounding error: HF's own bf16 error on it
# can be lucky by orders of magnitude (measured over seeds: the aux error of HF eager ranges
# 1e-5..1e-2 and its grouped_mm implementation differs from eager by 4x on the same model). Its
# floor is an eighth of a bf16 ulp of the value, fixed before measuring moeforge.
SCALAR_REL_FLOOR = 2.0**-8 / 8


def _bf16_outputs(model, inputs):
    """Forward + backward; every compared quantity as float64: logits, per-layer router logits,
    every trainable parameter's gradient, and the scalars loss and aux loss."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    vectors = {"logits": out.logits}
    router_logits = getattr(out, "router_logits", None) or ()  # DeepSeek-V3 records none
    vectors.update({f"router_logits[{i}]": r for i, r in enumerate(router_logits)})
    vectors.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.requires_grad})
    scalars = {"loss": out.loss}
    if getattr(out, "aux_loss", None) is not None:
        scalars["aux_loss"] = out.aux_loss
    return (
        {k: v.detach().double() for k, v in vectors.items()},
        {k: v.detach().double() for k, v in scalars.items()},
    )


def _bf16_model(family, use_peft, dtype=torch.bfloat16, lora_from=None):
    """``family``'s tiny model with bf16-representable weights, in ``dtype``. With ``use_peft``,
    PEFT LoRA on q/v and the experts as users get it on a bf16 base: fp32 adapters (PEFT's
    ``autocast_adapter_dtype``), lora_B drawn at random, or copied from ``lora_from``."""
    model = make_model(family, "eager", dtype=torch.bfloat16).to(dtype)
    if not use_peft:
        return model
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS
    )
    pmodel = peft.get_peft_model(model, config)
    lora = {n: p for n, p in pmodel.named_parameters() if "lora_" in n}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora.items():
            if lora_from is not None:
                p.copy_(lora_from[n])
            elif "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return pmodel


@functools.cache
def _bf16_references(family, use_peft, batch_kind):
    """(float64 HF eager, bfloat16 HF eager) on the same bf16-representable weights, and the
    inputs (``batch_kind``: "default" or "margin", see _bf16_inputs)."""
    inputs = _bf16_inputs(family, batch_kind)
    lowp = _bf16_model(family, use_peft)
    lora = {n: p.detach() for n, p in lowp.named_parameters() if "lora_" in n}
    if use_peft:
        assert lora and all(p.dtype == torch.float32 for p in lora.values())
    ref64 = _bf16_model(family, use_peft, torch.float64, lora_from=lora)
    return _bf16_outputs(ref64, inputs), _bf16_outputs(lowp, inputs), inputs


def _bf16_inputs(family, batch_kind):
    return _routing_margin_batch(family) if batch_kind == "margin" else batch()


def _routing_margin_batch(family, seeds=range(1, 13), tokens=8):
    """The 1 x ``tokens`` batch (over ``seeds``) whose float64 run has the widest top-k margin
    (smallest gap between the k-th and (k+1)-th router logit over all tokens and layers), so that
    bf16 rounding cannot flip a routing decision. Chosen from the float64 HF run alone."""
    model = make_model(family, "eager", dtype=torch.bfloat16).to(torch.float64)
    k = model.config.num_experts_per_tok
    best, best_margin = None, -1.0
    for seed in seeds:
        ids = torch.randint(3, 256, (1, tokens), generator=torch.Generator().manual_seed(seed))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with torch.no_grad():
            logits = model(**inputs).router_logits
        top = [layer.topk(k + 1, dim=-1).values for layer in logits]
        margin = min((t[:, k - 1] - t[:, k]).min().item() for t in top)
        if margin > best_margin:
            best, best_margin = inputs, margin
    return best


def _max_err(a, b):
    return (a - b).abs().max().item()


# With the default batch a near-tie flips one routing decision of Qwen2-MoE in a bf16 run, after
# which error ratios say nothing: it runs on the batch with the widest float64 routing margin.
# Not here: Qwen3.5-MoE, whose tiny model's own HF bf16 run is far from float64 (logit error ~0.9,
# even on its widest-margin batch), so no error ratio against it means anything.
MARGIN_FAMILIES = ["qwen2_moe"]

BF16_CASES = [
    (family, how)
    for family in ["qwen3_moe", "mixtral", "gpt_oss"]
    for how in ["patch_model", "experts_implementation", "patch_model+peft"]
] + [(family, "patch_model") for family in ["olmoe", "deepseek_v3", "qwen3_next"]]
BF16_CASES += [(family, "patch_model") for family in MARGIN_FAMILIES]


@pytest.mark.parametrize(("family", "how"), BF16_CASES)
def test_bf16_error_at_most_twice_hf_eager(family, how, moeforge_calls, monkeypatch):
    use_peft = how.endswith("+peft")
    kind = "margin" if family in MARGIN_FAMILIES else "default"
    (v64, s64), (vlp, slp), inputs = _bf16_references(family, use_peft, kind)
    # the seed must not flip a routing decision in HF's bf16 run, or the comparison means nothing
    assert _max_err(vlp["logits"], v64["logits"]) < 0.1, "HF's bf16 routing flipped: new seed"
    model = _bf16_model(family, use_peft)
    if how == "experts_implementation":
        model.set_experts_implementation("moeforge")
    else:
        assert len(mh.patch_model(model)) == len(experts_modules(model))
    if use_peft:
        forbid_peft_materialisation(monkeypatch)
    vgot, sgot = _bf16_outputs(model, inputs)
    assert len(moeforge_calls) == len(experts_modules(model))
    assert vgot.keys() == v64.keys() and sgot.keys() == s64.keys()
    failures = []
    for name, want in v64.items():
        assert torch.isfinite(vgot[name]).all(), name
        err, ref_err = _max_err(vgot[name], want), _max_err(vlp[name], want)
        if err > BF16_FACTOR * ref_err + BF16_ATOL:
            failures.append(f"{name}: error {err:.3e} vs HF eager bf16 {ref_err:.3e}")
    for name, want in s64.items():
        err, ref_err = _max_err(sgot[name], want), _max_err(slp[name], want)
        if err > BF16_FACTOR * ref_err + SCALAR_REL_FLOOR * want.abs().item():
            failures.append(f"{name}: error {err:.3e} vs HF eager bf16 {ref_err:.3e}")
    assert not failures, "\n".join(failures)
    if use_peft:
        expert_grads = [n for n in vgot if ".experts." in n]
        assert len(expert_grads) == 8 and all(vgot[n].abs().sum() > 0 for n in expert_grads)


# ------------------------------------------------------------------------------------------
# Gradient checkpointing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use_peft", "use_reentrant"), [(True, False), (True, True), (False, False)]
)
def test_gradient_checkpointing(use_peft, use_reentrant, moeforge_calls, monkeypatch):
    if use_peft:
        model = make_peft_model("qwen3_moe")
        params = lora_params(model)
        nonzero = [n for n in params if ".experts." in n]
        assert len(nonzero) == 8
        tol = LORA_TOL
    else:
        model = make_model("qwen3_moe")
        params = dict(model.named_parameters())
        nonzero = [n for n in params if ".experts." in n]
        tol = TOL
    model.train()
    inputs = batch()
    no_aux = {**inputs, "output_router_logits": False}
    want_hf = run(model, inputs, params)  # HF (+ PEFT), no checkpointing
    assert len(mh.patch_model(model)) == 2
    want = run(model, inputs, params)  # moeforge, no checkpointing
    assert_same_run(want, want_hf, tol=tol, check_grads_nonzero=nonzero)
    want_no_aux = run(model, no_aux, params)

    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
    )
    assert model.is_gradient_checkpointing
    moeforge_calls.clear()
    with monkeypatch.context() as m:
        if use_peft:
            forbid_peft_materialisation(m)
        got = run(model, inputs, params)
        assert len(moeforge_calls) == 4  # each MoE layer ran again in the backward
        assert_same_run(run(model, no_aux, params), want_no_aux, check_grads_nonzero=nonzero)
    if not use_reentrant:
        assert_same_run(got, want, check_grads_nonzero=nonzero)
        return
    # transformers records router logits with forward hooks; under reentrant checkpointing the
    # recorded forward runs without grad, so the aux loss back-propagates nothing, in HF too.
    # Same loss, and the same gradients as HF's own reentrant run.
    torch.testing.assert_close(got[1], want[1], **TOL)
    mh.unpatch_model(model)
    assert_same_run(got, run(model, inputs, params), tol=tol, check_grads_nonzero=nonzero)


# ------------------------------------------------------------------------------------------
# HF Trainer
# ------------------------------------------------------------------------------------------

TEXT = (
    b"The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    b"Sphinx of black quartz, judge my vow! How vexingly quick daft zebras jump."
)


def byte_dataset(num: int = 8, length: int = 16):
    """Byte-level causal-LM samples (token id = byte value) cut from a fixed text."""
    samples = []
    for i in range(num):
        ids = torch.tensor(list(TEXT[i * 7 : i * 7 + length]), dtype=torch.long)
        samples.append(
            {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        )
    return samples


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_runs_patched_peft_qwen3_moe(
    gradient_checkpointing, tmp_path, moeforge_calls, monkeypatch
):
    from transformers import Trainer, TrainingArguments

    pmodel = make_peft_model("qwen3_moe", target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert len(mh.patch_model(pmodel)) == 2
    named = dict(pmodel.named_parameters())

    def snapshot(keep):
        return {n: p.detach().clone() for n, p in named.items() if keep(n, p)}

    expert_lora = snapshot(lambda n, p: p.requires_grad and ".experts." in n)
    attn_lora = snapshot(lambda n, p: p.requires_grad and ".self_attn." in n)
    base_experts = snapshot(lambda n, p: ".experts." in n and "lora_" not in n)
    # A and B of 2 expert projections / 4 attention projections, 2 layers; frozen base experts
    assert len(expert_lora) == 8 and len(attn_lora) == 16 and len(base_experts) == 4
    assert not any(named[n].requires_grad for n in base_experts)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        gradient_checkpointing=gradient_checkpointing,
    )
    trainer = Trainer(model=pmodel, args=args, train_dataset=byte_dataset())
    forbid_peft_materialisation(monkeypatch)
    result = trainer.train()

    assert trainer.state.global_step == 3
    # 3 steps x 2 MoE layers, all on moeforge (and recomputed in the backward when checkpointed)
    assert len(moeforge_calls) == 6 * (2 if gradient_checkpointing else 1)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(math.isfinite(x) for x in logged)
    assert math.isfinite(result.training_loss)
    for n, before in expert_lora.items():
        assert not torch.equal(named[n].detach(), before), f"{n} did not change"
    for n, before in attn_lora.items():
        assert not torch.equal(named[n].detach(), before), f"{n} did not change"
    for n, before in base_experts.items():
        assert torch.equal(named[n].detach(), before), f"{n} changed"


# ------------------------------------------------------------------------------------------
# Mixed dense and MoE layers
# ------------------------------------------------------------------------------------------

MIXED = {  # case: (family, config overrides, indices of the MoE layers)
    "qwen3_moe-mlp_only_layers": (
        "qwen3_moe",
        {"num_hidden_layers": 3, "mlp_only_layers": [1]},
        [0, 2],
    ),
    # dense, MoE (with a gated shared expert)
    "qwen2_moe-decoder_sparse_step": ("qwen2_moe", {"decoder_sparse_step": 2}, [1]),
}


@pytest.mark.parametrize("case", list(MIXED))
def test_mixed_dense_and_moe_layers(case, moeforge_calls, monkeypatch):
    family, overrides, moe_layers = MIXED[case]
    model = make_model(family, "eager", **overrides)
    layers = model.get_decoder().layers
    dense = [layer.mlp for i, layer in enumerate(layers) if i not in moe_layers]
    assert dense and not any(hasattr(mlp, "experts") for mlp in dense)
    moe = moe_layer_names(model)
    assert moe == [f"model.layers.{i}.mlp.experts" for i in moe_layers]
    inputs = batch()
    want = run(model, inputs)
    assert mh.patch_model(model) == moe
    assert len(experts_modules(model)) == len(moe)
    assert_untouched(*dense)
    assert_same_run(run(model, inputs), want)
    assert len(moeforge_calls) == len(moe)
    mh.unpatch_model(model)

    # and with PEFT expert LoRA, which attaches to the MoE layers only
    pmodel = make_peft_model(family, config_overrides=overrides)
    params = lora_params(pmodel)
    expert_lora = [n for n in params if ".experts." in n]
    assert len(expert_lora) == 4 * len(moe)
    want = run(pmodel, inputs, params)
    assert mh.patch_model(pmodel) == [f"base_model.model.{n}" for n in moe]
    with monkeypatch.context() as m:
        forbid_peft_materialisation(m)
        got = run(pmodel, inputs, params)
    assert_same_run(got, want, tol=LORA_TOL, check_grads_nonzero=expert_lora)
