"""Fused load-balancing + z-loss over all layers' router logits, forward + backward, vs HF's
``load_balancing_loss_func`` (transcribed in moeforge.reference) plus a plain-torch z-loss, for
each model's expert count, top-k and number of MoE layers.

    python benchmarks/bench_router_loss.py [--device cuda] [--tokens 4096 16384] [--models ...]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    MODEL_SHAPES,
    MOE_LAYERS,
    environment,
    kernel_times,
    print_host_profile,
    print_kernel_profile,
    print_table,
    time_ms,
    write_json,
)

from moeforge import ops, reference


def time_or_oom(fn, device: str) -> float | None:
    """time_ms(fn), or None when it runs out of device memory (HF's loss builds a one-hot
    [layers * T, top_k, E] int64 mask: 62 GB for DeepSeek-V3's 58 layers at T=65536)."""
    try:
        return time_ms(fn, device)
    except torch.OutOfMemoryError:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384])
    p.add_argument("--models", nargs="+", default=["qwen3-30b-a3b"])
    p.add_argument("--layers", type=int, default=None, help="override the models' layer counts")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--profile", action="store_true",
        help="also print moeforge's GPU kernel and host times (first row)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(environment(args.device))
    rows, profiled = [], False
    for model in args.models:
        _, _, E, K = MODEL_SHAPES[model]
        num_layers = args.layers or MOE_LAYERS[model]
        for T in args.tokens:
            logits = [
                torch.randn(T, E, device=args.device, dtype=dtype, requires_grad=True)
                for _ in range(num_layers)
            ]

            def zero_grad():  # as an optimizer step's zero_grad(set_to_none=True)
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

            t_ours, t_hf = time_or_oom(ours, args.device), time_or_oom(hf, args.device)
            # The wall time above includes the host's work (autograd over the layers' tensors,
            # launches), which a training step overlaps with GPU work queued before it.
            gpu_ours = None
            if args.device.startswith("cuda") and t_ours is not None:
                gpu_ours = sum(r[0] for r in kernel_times(ours))
            rows.append(
                {
                    "model": model,
                    "E": E,
                    "top_k": K,
                    "layers": num_layers,
                    "T": T,
                    "moeforge ms": "OOM" if t_ours is None else f"{t_ours:.3f}",
                    "moeforge GPU ms": "" if gpu_ours is None else f"{gpu_ours:.3f}",
                    "HF + torch z-loss ms": "OOM" if t_hf is None else f"{t_hf:.3f}",
                    "speedup": "" if None in (t_ours, t_hf) else f"{t_hf / t_ours:.1f}x",
                }
            )
            zero_grad()
            if args.profile and not profiled and t_ours is not None:
                print_kernel_profile(ours)
                print_host_profile(ours)
                profiled = True
    cols = ["model", "E", "top_k", "layers", "T", "moeforge ms", "moeforge GPU ms",
            "HF + torch z-loss ms"]  # fmt: skip
    print_table(rows, [*cols, "speedup"])
    write_json(args.json, rows, args.device)


if __name__ == "__main__":
    main()
