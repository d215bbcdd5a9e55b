"""routing, permute and combine vs the plain-torch pipeline (argsort + bincount, gather,
index_add_), over MoE model shapes. Bandwidth counts bytes read + written once.

    python benchmarks/bench_permute.py [--device cuda] [--tokens 16384] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch
from common import MODEL_SHAPES, environment, print_table, routed_ids, time_ms, write_json

from moeforge import ops


def torch_routing(ids: torch.Tensor, E: int):
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E)
    return order, counts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--models", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b"])
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(environment(args.device))
    rows = []
    for model in args.models:
        H, _, E, K = MODEL_SHAPES[model]
        for T in args.tokens:
            ids = routed_ids(T, K, E, args.device)
            x = torch.randn(T, H, device=args.device, dtype=dtype)
            w = torch.rand(T, K, device=args.device, dtype=torch.float32)
            plan = ops.routing(ids, E)
            y = torch.randn(T * K, H, device=args.device, dtype=dtype)
            order, _ = torch_routing(ids, E)
            tok = order // K
            # the fewest bytes either op must move: T token rows and T*K routed rows, once each
            moved = (T + T * K) * H * x.element_size()

            def torch_combine():
                out = torch.zeros(T, H, device=args.device, dtype=dtype)
                return out.index_add_(0, tok, y * w.reshape(-1)[order, None].to(dtype))

            results = {
                "routing": (lambda: ops.routing(ids, E), lambda: torch_routing(ids, E), None),
                "permute": (lambda: ops.permute(x, plan), lambda: x[tok], moved),
                "combine": (lambda: ops.combine(y, plan, w), torch_combine, moved),
            }
            for name, (ours, peer, nbytes) in results.items():
                t_ours = time_ms(ours, args.device)
                t_peer = time_ms(peer, args.device)
                row = {
                    "model": model,
                    "T": T,
                    "op": name,
                    "moeforge ms": f"{t_ours:.3f}",
                    "torch ms": f"{t_peer:.3f}",
                    "speedup": f"{t_peer / t_ours:.2f}x",
                }
                if nbytes:
                    row["moeforge GB/s"] = f"{nbytes / t_ours / 1e6:.0f}"
                rows.append(row)
    print_table(rows, ["model", "T", "op", "moeforge ms", "torch ms", "speedup", "moeforge GB/s"])
    write_json(args.json, rows, args.device)


if __name__ == "__main__":
    main()
