"""End-to-end LoRA step: Qwen3-30B-A3B architecture truncated to 4 layers, random weights, bf16,
batch 2 x 4096, LoRA r=16 on q,k,v,o + experts (PEFT target_parameters), AdamW. transformers'
default (grouped_mm experts) + PEFT vs the same model after ``moeforge.patch_model``, in one run.
Reports ms/step, tokens/s, peak GiB and the ratios (target: >= 1.6x tokens/s at <= 80% memory).

    python benchmarks/bench_e2e_lora.py [--layers 4] [--batch 2] [--seq 4096]
    python benchmarks/bench_e2e_lora.py --device cpu --tiny      # smoke run
"""

from __future__ import annotations

import argparse

import torch
from common import environment, print_table, time_ms

import moeforge


def make_model(args, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    if args.tiny:
        sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, num_experts=8, num_experts_per_tok=2)  # fmt: skip
    else:  # Qwen3-30B-A3B
        sizes = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, num_experts=128, num_experts_per_tok=8)  # fmt: skip
    cfg = Qwen3MoeConfig(**sizes, num_hidden_layers=args.layers, norm_topk_prob=True,
                         output_router_logits=True)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    model = get_peft_model(model, lora)
    model.train()
    return model


def run(args, use_moeforge: bool, dtype):
    model = make_model(args, dtype)
    if use_moeforge:
        moeforge.patch_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids.to(args.device), "labels": ids.to(args.device)}

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = time_ms(step, args.device, warmup=3, iters=args.iters)
    peak = float("nan")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    return ms, args.batch * args.seq / ms * 1e3, peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.tiny:
        args.seq, args.iters = 64, 3
    dtype = getattr(torch, args.dtype)
    print(environment(args.device))
    base = run(args, False, dtype)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the first model is gone with run()'s frame
    ours = run(args, True, dtype)
    rows = [
        {"experts path": name, "step ms": f"{ms:.1f}", "tokens/s": f"{tps:,.0f}",
         "peak GiB": f"{peak:.1f}"}
        for name, (ms, tps, peak) in [("HF grouped_mm + PEFT", base), ("moeforge", ours)]
    ]  # fmt: skip
    print_table(rows, ["experts path", "step ms", "tokens/s", "peak GiB"])
    print(f"tokens/s ratio {ours[1] / base[1]:.2f}x | peak memory ratio {ours[2] / base[2]:.2f}")


if __name__ == "__main__":
    main()
