"""Issue #3's targets (Qwen3-30B-A3B, bf16) against the JSON the benchmarks wrote in one run:
measured value, the peer of the same run, and met / missed by how much.

    python benchmarks/targets.py DIR   # DIR holds bench_layer.json, bench_permute.json,
                                       # bench_router_loss.json (gpu_check.sh writes them)

A target whose rows are missing (not run, or out of memory) prints as "not measured".
"""

from __future__ import annotations

import argparse
import json
import os

from common import print_table

MODEL = "qwen3-30b-a3b"


def load_rows(directory: str, name: str) -> list[dict]:
    path = os.path.join(directory, f"{name}.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def pick(rows: list[dict], key: str, **match) -> float | None:
    """rows[i][key] as a float for the first row whose fields equal ``match``, else None."""
    for row in rows:
        if all(str(row.get(k)) == str(v) for k, v in match.items()):
            try:
                return float(str(row[key]).rstrip("x"))
            except (KeyError, ValueError):
                return None
    return None


def status(value: float | None, bound: float, at_most: bool) -> str:
    if value is None:
        return "not measured"
    if (value <= bound) if at_most else (value >= bound):
        return "met"
    miss = value / bound - 1 if at_most else 1 - value / bound
    return f"missed by {100 * miss:.0f}%"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("directory")
    p.add_argument("--copy-tbps", type=float, default=3.0, help="device copy ceiling, TB/s")
    args = p.parse_args()
    layer = load_rows(args.directory, "bench_layer")
    permute = load_rows(args.directory, "bench_permute")
    router = load_rows(args.directory, "bench_router_loss")

    def ours(key: str, T: int, mode: str) -> float | None:
        return pick(layer, key, model=MODEL, T=T, mode=mode, path="moeforge")

    def peer(key: str, T: int, mode: str) -> float | None:
        path = "PEFT + HF grouped_mm" if mode == "lora" else "HF grouped_mm"
        return pick(layer, key, model=MODEL, T=T, mode=mode, path=path)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    def bandwidth(op: str) -> float | None:
        gbs = pick(permute, "moeforge GB/s", model=MODEL, T=16384, op=op)
        return None if gbs is None else gbs / (1000 * args.copy_tbps)

    def text(value: float | None, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    lora_over_frozen = ratio(ours("fwd+bwd ms", 16384, "lora"), ours("fwd+bwd ms", 16384, "frozen"))
    routing_ms = pick(permute, "moeforge ms", model=MODEL, T=16384, op="routing")
    torch_ms = {op: pick(permute, "torch ms", model=MODEL, T=16384, op=op)
                for op in ("routing", "permute", "combine")}  # fmt: skip
    # (target, measured, bound, at most (else at least), unit, the peer of the same run)
    targets = [
        ("trainable fwd+bwd, T=16384", ours("fwd+bwd ms", 16384, "train"), 8.3, True, "ms",
         text(peer("fwd+bwd ms", 16384, "train"), "HF grouped_mm {:.2f} ms")),
        ("trainable fwd+bwd, T=16384", ours("fwd+bwd TF/s", 16384, "train"), 450, False, "TF/s",
         text(peer("fwd+bwd TF/s", 16384, "train"), "HF grouped_mm {:.0f} TF/s")),
        ("  the same, GPU kernel time only", ours("fwd+bwd GPU ms", 16384, "train"), 8.3, True,
         "ms", "-"),
        ("forward, T=16384", ours("fwd TF/s", 16384, "train"), 500, False, "TF/s",
         text(peer("fwd TF/s", 16384, "train"), "HF grouped_mm {:.0f} TF/s")),
        ("frozen + LoRA r=16 fwd+bwd, T=16384", ours("fwd+bwd ms", 16384, "lora"), 6.0, True,
         "ms", text(peer("fwd+bwd ms", 16384, "lora"), "PEFT + grouped_mm {:.2f} ms")),
        ("frozen + LoRA r=16 fwd+bwd, T=4096", ours("fwd+bwd ms", 4096, "lora"), 2.0, True, "ms",
         text(peer("fwd+bwd ms", 4096, "lora"), "PEFT + grouped_mm {:.2f} ms")),
        ("  the same, GPU kernel time only", ours("fwd+bwd GPU ms", 4096, "lora"), 2.0, True,
         "ms", "-"),
        ("LoRA's time over frozen, T=16384",
         None if lora_over_frozen is None else 100 * (lora_over_frozen - 1), 15, True, "%", "-"),
        ("LoRA peak memory / PEFT's, T=16384", ours("peak / HF", 16384, "lora"), 0.6, True, "x",
         "-"),
        ("LoRA peak memory / PEFT's, T=4096", ours("peak / HF", 4096, "lora"), 0.6, True, "x",
         "-"),
        ("permute / copy ceiling, T=16384", bandwidth("permute"), 0.8, False, "x",
         text(torch_ms["permute"], "x[tok] {:.3f} ms")),
        ("combine / copy ceiling, T=16384", bandwidth("combine"), 0.8, False, "x",
         text(torch_ms["combine"], "index_add_ {:.3f} ms")),
        ("routing metadata, T=16384", None if routing_ms is None else 1000 * routing_ms, 50, True,
         "us", text(torch_ms["routing"], "argsort + bincount {:.3f} ms")),
        ("aux + z-loss, all 48 layers, fwd+bwd, T=16384",
         pick(router, "moeforge ms", model=MODEL, T=16384), 0.3, True, "ms",
         text(pick(router, "HF + torch z-loss ms", model=MODEL, T=16384), "HF {:.2f} ms")),
        ("  the same, GPU kernel time only", pick(router, "moeforge GPU ms", model=MODEL,
         T=16384), 0.3, True, "ms", "-"),
    ]  # fmt: skip
    rows = []
    for name, value, bound, at_most, unit, peer_text in targets:
        rows.append(
            {
                "target": name,
                "bound": f"{'<=' if at_most else '>='} {bound:g} {unit}",
                "measured": text(value, "{:.3g} " + unit),
                "peer (same run)": peer_text,
                "status": status(value, bound, at_most),
            }
        )
    print_table(rows, ["target", "bound", "measured", "peer (same run)", "status"])


if __name__ == "__main__":
    main()
