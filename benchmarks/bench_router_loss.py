"""Fused load-balancing + z-loss over all layers' router logits, forward + backward, vs HF's
``load_balancing_loss_func`` (transcribed in moeforge.reference) plus a plain-torch z-loss.

    python benchmarks/bench_router_loss.py [--device cuda] [--tokens 16384] [--layers 48]
"""

from __future__ import annotations

import argparse

import torch
from common import environment, print_kernel_profile, print_table, time_ms

from moeforge import ops, reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--profile", action="store_true", help="also print moeforge's GPU kernel times")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    E, K = args.experts, args.top_k
    logits = [
        torch.randn(args.tokens, E, device=args.device, dtype=dtype, requires_grad=True)
        for _ in range(args.layers)
    ]

    def zero_grad():  # as an optimizer step's zero_grad(set_to_none=True): no accumulation
        for layer in logits:
            layer.grad = None

    def ours():
        zero_grad()
        aux, z = ops.router_loss(logits, K)
        (aux + z).backward()

    def hf():
        zero_grad()
        aux = reference.load_balancing_loss(logits, E, K, None)
        z = reference.router_z_loss(logits)
        (aux + z).backward()

    print(environment(args.device))
    t_ours, t_hf = time_ms(ours, args.device), time_ms(hf, args.device)
    print_table(
        [
            {
                "layers": args.layers,
                "T": args.tokens,
                "moeforge ms": f"{t_ours:.3f}",
                "HF + torch z-loss ms": f"{t_hf:.3f}",
                "speedup": f"{t_hf / t_ours:.1f}x",
            }
        ],
        ["layers", "T", "moeforge ms", "HF + torch z-loss ms", "speedup"],
    )

    if args.profile:
        print_kernel_profile(ours)


if __name__ == "__main__":
    main()
