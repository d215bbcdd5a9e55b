"""The main job: train a small language model built from ``moeforge.MoE`` on synthetic data.

Each token of the synthetic byte stream is followed by one of a few successors drawn from a fixed
random table, so a model that learns the table drives the loss from ln(256) ~ 5.5 towards
ln(branching). Prints loss, the load-balancing / z-losses and tokens/s; exits non-zero if the loss
did not fall. Runs on CPU in well under a minute; ``--device cuda`` runs it on moeforge's CUDA
kernels.

    python examples/train_moe.py [--steps 60] [--device cpu] [--lora-rank 0]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import moeforge


class MoELanguageModel(nn.Module):
    """Embedding -> n x (RMSNorm -> MoE, residual) -> RMSNorm -> LM head."""

    def __init__(
        self,
        vocab: int,
        hidden: int,
        intermediate: int,
        experts: int,
        top_k: int,
        layers: int,
        lora_rank: int,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.blocks = nn.ModuleList(
            moeforge.MoE(hidden, intermediate, experts, top_k, lora_rank=lora_rank)
            for _ in range(layers)
        )
        self.final_norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``ids [B, S] -> (logits [B, S, vocab], router logits per layer [B*S, E])``."""
        h = self.embed(ids)
        router_logits = []
        for norm, block in zip(self.norms, self.blocks):
            out, logits = block(norm(h))
            h = h + out
            router_logits.append(logits)
        return self.head(self.final_norm(h)), router_logits


def synthetic_batches(vocab: int, branching: int, batch: int, seq: int, device: str, seed: int):
    """Endless batches from a fixed random successor table: ``[B, S+1]`` int64."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, branching), generator=g)
    while True:
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        choice = torch.randint(0, branching, (batch, seq), generator=g)
        for s in range(seq):
            ids[:, s + 1] = table[ids[:, s], choice[:, s]]
        yield ids.to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--lora-rank", type=int, default=0, help="train expert LoRA only (frozen experts)"
    )
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--z-coef", type=float, default=0.001)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    vocab, branching = 256, 2
    model = MoELanguageModel(
        vocab, args.hidden, args.intermediate, args.experts, args.top_k, args.layers, args.lora_rank
    ).to(args.device)
    if args.lora_rank:
        for block in model.blocks:
            block.experts.gate_up_proj.requires_grad_(False)
            block.experts.down_proj.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    data = synthetic_batches(vocab, branching, args.batch, args.seq, args.device, args.seed)
    print(
        f"moeforge {moeforge.__version__} | CUDA kernels built: {moeforge.built_with_cuda()} | "
        f"device {args.device} | {sum(q.numel() for q in params):,} trainable parameters"
    )
    print(
        f"target: loss -> ln({branching}) = {math.log(branching):.3f} (from ln({vocab}) = "
        f"{math.log(vocab):.3f})"
    )

    first = last = float("nan")
    tokens = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = next(data)
        logits, router_logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        aux, z = moeforge.router_losses(router_logits, args.top_k)
        total = loss + args.aux_coef * aux + args.z_coef * z
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        tokens += ids[:, :-1].numel()
        first = loss.item() if step == 1 else first
        last = loss.item()
        if step % 10 == 0 or step == 1:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rate = tokens / (time.perf_counter() - start)
            print(
                f"step {step:4d} | loss {last:.4f} | aux {aux.item():.4f} | z {z.item():.3f} | "
                f"{rate:,.0f} tokens/s"
            )
    print(f"loss {first:.4f} -> {last:.4f}")
    if not last < first - 0.5:
        raise SystemExit("the loss did not fall: something is wrong")


if __name__ == "__main__":
    main()
