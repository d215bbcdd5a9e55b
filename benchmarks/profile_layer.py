"""Where the time of one moeforge MoE layer's forward+backward goes: the CUDA kernels of a few
profiled steps (torch.profiler), summed per kernel name, largest first.

    python benchmarks/profile_layer.py --mode lora --tokens 16384 [--engine moeforge] [--forward]
        [--host]   # also the host side: the ops with the most CPU time per step
"""

from __future__ import annotations

import argparse
import types

import torch
from bench_layer import build_block, grouped_gemm_engine, train_step
from common import MODEL_SHAPES, environment, print_host_profile, print_kernel_profile


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--mode", default="lora", choices=["train", "frozen", "lora"])
    p.add_argument("--engine", default=None, help="MOEFORGE_GROUPED_GEMM for the run")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--forward", action="store_true", help="profile the forward alone")
    p.add_argument("--host", action="store_true", help="also print the host side's largest ops")
    args = p.parse_args()
    H, I, E, K = MODEL_SHAPES[args.model]
    T = args.tokens
    opts = types.SimpleNamespace(device="cuda", lora_rank=16)
    fn = build_block(opts, H, I, E, K, args.mode, torch.bfloat16, "moeforge")
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    print(environment("cuda"), "|", args.model, "T", T, args.mode, "engine", args.engine)
    with grouped_gemm_engine(args.engine):
        step = (lambda: fn(x)) if args.forward else (lambda: train_step(fn, x, grad))
        print_kernel_profile(step, args.steps, args.top)
        if args.host:
            print_host_profile(step, args.steps, args.top)


if __name__ == "__main__":
    main()
