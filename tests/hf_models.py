"""Tiny random transformers (+ PEFT) MoE models and run/compare helpers shared by the HF tests.

Importing this module skips the importing test module when transformers is not installed; the
PEFT helpers skip the calling test when peft is not installed. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-6}
# split LoRA (x A^T) B^T vs PEFT's x (W + s B A)^T: float32 rounding differs a little more
LORA_TOL = {"rtol": 1e-5, "atol": 1e-5}
ATTN = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256, "hidden_size": 64}
# Qwen3-Next / Qwen3.5-MoE: layer 0 linear attention (gated delta net), layer 1 full attention
HYBRID_ATTN = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}


def make_config(family: str, **overrides):
    """A tiny config of ``family`` (every MoE layer has 8 experts, top-2); ``overrides`` are
    passed to the config class (e.g. ``mlp_only_layers=[0]``)."""
    t = transformers
    if family == "qwen3_moe":
        kw = dict(
            **ATTN, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
            head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        )  # fmt: skip
        return t.Qwen3MoeConfig(**{**kw, **overrides})
    if family == "qwen2_moe":
        kw = dict(
            **ATTN, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
            shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False,
        )  # fmt: skip
        return t.Qwen2MoeConfig(**{**kw, **overrides})
    if family == "mixtral":
        kw = dict(
            **ATTN, intermediate_size=32, num_key_value_heads=2, num_local_experts=8,
            num_experts_per_tok=2,
        )  # fmt: skip
        return t.MixtralConfig(**{**kw, **overrides})
    if family == "olmoe":
        kw = dict(
            **ATTN, intermediate_size=32, num_key_value_heads=4, num_experts=8,
            num_experts_per_tok=2, pad_token_id=1, eos_token_id=2, bos_token_id=0,
        )  # fmt: skip
        return t.OlmoeConfig(**{**kw, **overrides})
    if family == "gpt_oss":
        kw = dict(
            **ATTN, intermediate_size=32, num_key_value_heads=2, head_dim=16,
            num_local_experts=8, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"], sliding_window=8,
        )  # fmt: skip
        return t.GptOssConfig(**{**kw, **overrides})
    if family == "deepseek_v3":  # layer 0 dense, layer 1 MoE (mixed model)
        kw = dict(
            **ATTN, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4,
            first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, n_shared_experts=1,
        )  # fmt: skip
        return t.DeepseekV3Config(**{**kw, **overrides})
    if family == "qwen3_next":  # hybrid attention, shared expert with a sigmoid gate
        kw = dict(
            **ATTN, **HYBRID_ATTN, intermediate_size=128, moe_intermediate_size=32,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, shared_expert_intermediate_size=64,
        )  # fmt: skip
        return t.Qwen3NextConfig(**{**kw, **overrides})
    if family == "qwen3_5_moe":  # the text model of Qwen3.5-MoE (Qwen3_5MoeForCausalLM)
        kw = dict(
            **ATTN, **HYBRID_ATTN, moe_intermediate_size=32, num_key_value_heads=2,
            head_dim=16, num_experts=8, num_experts_per_tok=2,
            shared_expert_intermediate_size=64,
        )  # fmt: skip
        return t.Qwen3_5MoeTextConfig(**{**kw, **overrides})
    raise ValueError(family)


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3"]
HYBRID_FAMILIES = ["qwen3_next", "qwen3_5_moe"]
HAS_AUX = {f: f != "deepseek_v3" for f in FAMILIES + HYBRID_FAMILIES}  # DeepSeek-V3 records none


def make_model(
    family: str,
    experts_implementation: str = "eager",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
):
    """A tiny random model; every weight and bias re-drawn so nothing is zero or tied."""
    cfg = make_config(family, **config_overrides)
    cfg.output_router_logits = HAS_AUX[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation=experts_implementation, dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
            elif "norm" not in name:
                p.normal_(0.0, 0.1)  # biases (gpt-oss experts and router)
    return model.to(dtype)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row: the aux loss must ignore it
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def run(model, inputs, params=None):
    """Forward + backward; ``(logits, loss, aux_loss, {name: grad})`` of the trainable params."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    named = params if params is not None else dict(model.named_parameters())
    grads = {n: p.grad.clone() for n, p in named.items() if p.requires_grad}
    aux = getattr(out, "aux_loss", None)
    return out.logits.detach(), out.loss.detach(), None if aux is None else aux.detach(), grads


def assert_same_run(got, want, *, tol=TOL, check_grads_nonzero=()):
    logits, loss, aux, grads = got
    w_logits, w_loss, w_aux, w_grads = want
    torch.testing.assert_close(logits, w_logits, **tol)
    torch.testing.assert_close(loss, w_loss, **tol)
    if w_aux is not None:
        torch.testing.assert_close(aux, w_aux, **tol)
    assert grads.keys() == w_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], w_grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    for name in check_grads_nonzero:
        assert grads[name].abs().sum() > 0, f"{name} has a zero gradient"


def experts_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def restore_hf_aux_loss() -> None:
    """Give every transformers modeling module back its own ``load_balancing_loss_func``.

    ``patch_model`` swaps it for moeforge's fused one per modeling module, i.e. process-wide; a
    test that leaves a model patched would make later "HF" references use moeforge's aux loss.
    """
    from moeforge.hf import losses

    losses.restore_all_aux_losses()


@pytest.fixture(autouse=True)
def fresh_hf_state():
    """One-time warnings re-armed, moeforge's experts implementation registered and HF's own aux
    loss in place before and after each test of a module that imports this fixture."""
    from moeforge.hf import experts_interface, register_experts_implementation

    experts_interface._warned.clear()
    register_experts_implementation()
    restore_hf_aux_loss()  # HF references must use HF's own aux loss
    yield
    restore_hf_aux_loss()


# ------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_peft_model(
    family: str,
    seed: int = 0,
    *,
    target_modules=("q_proj", "v_proj"),
    config_overrides: dict | None = None,
    **lora_kwargs,
):
    """``family``'s tiny model with LoRA on ``target_modules`` and on the experts
    (``target_parameters``); lora_B drawn at random so that every delta counts."""
    peft = pytest.importorskip("peft")
    model = make_model(family, "eager", seed=seed, **(config_overrides or {}))
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(target_modules),
        target_parameters=EXPERT_TARGETS,
        **lora_kwargs,
    )
    pmodel = peft.get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # PEFT initialises lora_B to zero: draw it so the deltas count
        for name, p in pmodel.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return pmodel


def lora_params(pmodel):
    return {n: p for n, p in pmodel.named_parameters() if p.requires_grad}


def forbid_peft_materialisation(monkeypatch):
    from peft.tuners.lora.layer import ParamWrapper

    def boom(*args, **kwargs):
        raise AssertionError("PEFT's materialising ParamWrapper path was called")

    monkeypatch.setattr(ParamWrapper, "_activate_lora", boom)
