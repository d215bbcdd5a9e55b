"""Where the time of one moeforge MoE layer's forward+backward goes: the CUDA kernels of a few
profiled steps (torch.profiler), summed per kernel name, largest first.

    python benchmarks/profile_layer.py --mode lora --tokens 16384 --engine torch
"""

from __future__ import annotations

import argparse
import types

import torch
from bench_layer import build_paths, grouped_gemm_engine
from common import MODEL_SHAPES, environment


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--mode", default="lora", choices=["train", "frozen", "lora"])
    p.add_argument("--engine", default=None, help="MOEFORGE_GROUPED_GEMM for the run")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    H, I, E, K = MODEL_SHAPES[args.model]
    T = args.tokens
    opts = types.SimpleNamespace(device="cuda", eager_max_tokens=0, lora_rank=16)
    fn = build_paths(opts, H, I, E, K, T, args.mode, torch.bfloat16)["moeforge"]
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    print(environment("cuda"), "|", args.model, "T", T, args.mode, "engine", args.engine)
    with grouped_gemm_engine(args.engine):
        for _ in range(3):
            fn(x).backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                fn(x).backward(grad)
            torch.cuda.synchronize()
    rows = [
        (getattr(a, "self_device_time_total", 0.0) / 1e3 / args.steps, a.count // args.steps, a.key)
        for a in prof.key_averages()
    ]
    rows = [r for r in rows if r[0] > 0]
    print(f"GPU time per step {sum(r[0] for r in rows):.2f} ms (kernels and copies, summed)")
    for ms, count, name in sorted(rows, reverse=True)[: args.top]:
        print(f"{ms:8.3f} ms {count:4d}x  {name[:110]}")


if __name__ == "__main__":
    main()
