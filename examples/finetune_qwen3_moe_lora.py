"""LoRA fine-tuning of a Qwen3-MoE model (attention + experts) with transformers + PEFT on moeforge.

PEFT's ``target_parameters`` puts LoRA on the fused experts; ``moeforge.patch_model`` then runs the
experts, their split LoRA (never materialising ``B @ A``) and the aux loss on moeforge's ops.

Without ``--model`` it builds a tiny random Qwen3-MoE (no download) and trains it on synthetic
byte-level data; with ``--model PATH_OR_ID`` it loads that checkpoint. ``--compare`` first runs the
same steps without moeforge (transformers' default experts + PEFT) and prints the speedup.

    python examples/finetune_qwen3_moe_lora.py                      # tiny model, CPU
    python examples/finetune_qwen3_moe_lora.py --compare
    python examples/finetune_qwen3_moe_lora.py --model Qwen/Qwen3-30B-A3B --device cuda \\
        --dtype bfloat16 --seq 4096 --batch 2 --steps 100 --output adapters/qwen3-moe-lora
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import moeforge

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_qwen3_moe(dtype: torch.dtype):
    """A ~0.2M-parameter random Qwen3-MoE (8 experts, top-2) built from its config."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, output_router_logits=True,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def load_model(args, dtype: torch.dtype):
    torch.manual_seed(args.seed)
    if args.model is None:
        model = tiny_qwen3_moe(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, output_router_logits=True
        )
    return model.to(args.device)


def add_lora(model, rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=ATTENTION_TARGETS,
        target_parameters=EXPERT_TARGETS,
    )
    return get_peft_model(model, config)


def synthetic_batches(vocab: int, batch: int, seq: int, device: str, seed: int):
    """Byte-level sequences from a fixed random successor table (2 choices per byte): learnable,
    so the loss falls from ln(256) towards ln(2). ``{"input_ids", "labels", "attention_mask"}``."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, min(vocab, 256), (256, 2), generator=g)
    while True:
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, 256, (batch,), generator=g)
        choice = torch.randint(0, 2, (batch, seq), generator=g)
        for s in range(1, seq):
            ids[:, s] = table[ids[:, s - 1], choice[:, s]]
        ids = ids.to(device)
        yield {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def check_expert_lora_trains(model) -> int:
    """LoRA must really sit on the experts (several tools shipped silently frozen adapters)."""
    expert_lora = [(n, p) for n, p in model.named_parameters() if "experts" in n and "lora_" in n]
    if not expert_lora or not all(p.requires_grad for _, p in expert_lora):
        raise SystemExit("LoRA did not attach to the experts: no trainable expert adapters")
    return sum(p.numel() for _, p in expert_lora)


def train(args, use_moeforge: bool) -> dict:
    dtype = getattr(torch, args.dtype)
    model = add_lora(load_model(args, dtype), args.lora_rank, args.lora_alpha)
    expert_params = check_expert_lora_trains(model)
    if use_moeforge:
        moeforge.patch_model(model, z_loss_coef=args.z_loss_coef)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    data = synthetic_batches(model.config.vocab_size, args.batch, args.seq, args.device, args.seed)
    label = "moeforge" if use_moeforge else "transformers + PEFT"
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; stay usable without it
        tqdm = None
    steps = range(1, args.steps + 1)
    bar = tqdm(steps, desc=label, leave=False) if tqdm is not None and args.progress else steps
    losses, tokens, elapsed = [], 0, 0.0
    for step in bar:
        batch = next(data)
        sync(args.device)
        t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        if step == 1:
            grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_" in n]
            if not any(g is not None and g.abs().sum() > 0 for g in grads):
                raise SystemExit("the expert LoRA parameters got no gradient")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if step > args.warmup:  # the first steps pay one-time costs (allocations, kernels)
            elapsed += time.perf_counter() - t0
            tokens += batch["input_ids"].numel()
        losses.append(out.loss.item())
        if tqdm is not None and args.progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        elif step % 10 == 0 or step == 1:
            print(f"  [{label}] step {step:4d} | loss {losses[-1]:.4f}")
    if args.output and use_moeforge:
        model.save_pretrained(args.output)  # PEFT's own format: loads in plain PEFT + vLLM
        print(f"adapter saved to {args.output}")
    return {
        "label": label,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"),
        "expert_lora_params": expert_params,
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF checkpoint path or id (default: tiny random)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--z-loss-coef", type=float, default=0.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="directory for the trained adapter")
    p.add_argument("--compare", action="store_true", help="also run without moeforge first")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args()
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be < --steps ({args.steps})")

    print(
        f"moeforge {moeforge.__version__} | CUDA kernels built: {moeforge.built_with_cuda()} | "
        f"device {args.device} | {args.dtype} | model {args.model or 'tiny random Qwen3-MoE'}"
    )
    runs = [train(args, use_moeforge=False)] if args.compare else []
    runs.append(train(args, use_moeforge=True))
    for r in runs:
        print(
            f"{r['label']:>20}: loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} | "
            f"{r['tokens_per_s']:,.0f} tokens/s | {r['expert_lora_params']:,} expert LoRA params"
        )
    if args.compare:
        print(
            f"speedup of moeforge over transformers + PEFT: "
            f"{runs[1]['tokens_per_s'] / runs[0]['tokens_per_s']:.2f}x"
        )
    ours = runs[-1]
    if args.model is None and not ours["last_loss"] < ours["first_loss"] - 0.5:
        raise SystemExit("the loss did not fall: something is wrong")
    print(f"(a perfect model reaches ln(2) = {math.log(2):.3f} on this data)")


if __name__ == "__main__":
    main()
