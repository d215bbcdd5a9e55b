"""lora_expand_add_ (LoRA's up-projection added in place into a GEMM output) vs what it replaced:
torch's grouped GEMM writing the [S, n] delta, then an add. The four calls of a LoRA layer step,
over MoE model shapes (h and y take lora_B, grad_aw and grad_x take lora_A). Bandwidth counts
the bytes the op must move: out read and written, u read once.

    python benchmarks/bench_lora_expand.py [--device cuda] [--tokens 4096 16384] [--rank 16]
"""

from __future__ import annotations

import argparse

import torch
from common import MODEL_SHAPES, environment, print_table, routed_ids, time_ms

from moeforge import ops

_ops = torch.ops.moeforge


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--models", nargs="+", default=["qwen3-30b-a3b", "gpt-oss-20b"])
    args = p.parse_args()
    dtype, r, dev = getattr(torch, args.dtype), args.rank, args.device
    print(environment(dev))
    rows = []
    for model in args.models:
        H, I, E, K = MODEL_SHAPES[model]
        for T in args.tokens:
            offsets = ops.routing(routed_ids(T, K, E, dev), E).expert_offsets
            S = T * K
            # (call, n, rank_major): lora_B [n, r*E] is rank-major, lora_A [E*r, n] is not.
            for call, n, rank_major in (
                ("h += (gate_up)", 2 * I, True),
                ("y += (down)", H, True),
                ("grad_aw +=", I, False),
                ("grad_x +=", H, False),
            ):
                out = torch.randn(S, n, device=dev, dtype=dtype)
                u = torch.randn(S, r, device=dev, dtype=dtype)
                shape = (n, r * E) if rank_major else (E * r, n)
                weight = torch.randn(shape, device=dev, dtype=dtype) / r**0.5
                m = (
                    weight.reshape(n, r, E).permute(2, 1, 0).contiguous()
                    if rank_major
                    else weight.reshape(E, r, n)
                )
                ends = offsets[1:]

                def ours():
                    _ops.lora_expand_add_(out, u, weight, offsets, 0.5, rank_major)

                def peer():  # the delta through torch's grouped GEMM, then an add
                    out.add_(torch._grouped_mm(u, m, offs=ends), alpha=0.5)

                t_ours, t_peer = time_ms(ours, dev), time_ms(peer, dev)
                moved = S * (2 * n + r) * out.element_size()
                rows.append(
                    {
                        "model": model,
                        "T": T,
                        "call": call,
                        "n": n,
                        "moeforge ms": f"{t_ours:.3f}",
                        "grouped_mm + add ms": f"{t_peer:.3f}",
                        "speedup": f"{t_peer / t_ours:.2f}x",
                        "moeforge GB/s": f"{moved / t_ours / 1e6:.0f}",
                    }
                )
    cols = ["model", "T", "call", "n", "moeforge ms", "grouped_mm + add ms", "speedup"]
    print_table(rows, [*cols, "moeforge GB/s"])


if __name__ == "__main__":
    main()
