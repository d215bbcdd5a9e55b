"""grouped_mm under each grouped GEMM engine, GEMM by GEMM, over MoE model shapes: our sm_90a
wgmma kernel (MOEFORGE_GROUPED_GEMM=sm90, experimental) against torch's at::_grouped_mm ("auto",
the default) and our WMMA kernels ("moeforge"), in the same run. This is the measurement that
decides whether the sm90 engine becomes the default (docs/hopper-gemm-plan.md).

Each row times the op as the fused layer calls it (CUDA events, median), so the engines pay for
what they need around the GEMM: "auto" copies the gathered rows first (torch's GEMM has no
gather) and zeroes the rows of no expert; "sm90" reads the rows through the plan. Rows (HF's
layout; "sm90" reads the weight K-major in the forward GEMMs, MN-major in the backward ones):

    gate_up (gathered)  h [S, 2I] = x[token of row] W_gu^T, x token-major [T, H] (the forward)
    gate_up (dense)     the same from x already in expert order [S, H] (the GEMM alone)
    gate_up + swiglu    grouped_mm_swiglu: h and a = silu(h_gate) h_up (one kernel under sm90)
    down                y [S, H] = a W_dn^T, a [S, I]
    grad_aw (gathered)  [S, I] = dO[token of row] W_dn, dO token-major [T, H] (the backward)
    grad_x (gate_up)    [S, H] = grad_h W_gu, grad_h [S, 2I]
    dW gate_up          [E, 2I, H] = grad_h_e^T x_e, x read through the plan (the weight gradient;
                        "sm90": the K-grouped kernel)
    gate_up+swiglu+LoRA grouped_mm_swiglu with the gate_up adapter (r = 16): "sm90" adds
                        s u B_e^T in the epilogue; the others run grouped_mm, lora_expand_add_
                        and swiglu (the fused layer's frozen + LoRA forward)
    down + LoRA         grouped_mm_lora: y = a W_dn^T + s u B_e^T (one kernel under "sm90")
    gpt-oss gate_up     grouped_mm_swiglu in gpt-oss's layout: x W_gu + b_gu with [E, H, 2I]
                        read MN-major, a its clamped interleaved activation ("sm90": bias and
                        activation in the epilogue; the others: GEMM, bias pass, swiglu)
    grad_aw + LoRA      grouped_mm_lora: dO W_dn + s du A_e, dO gathered (the LoRA backward)

The LoRA rows count the base GEMM's FLOPs only (the rank-16 add is < 2% of them).

TFLOP/s count 2 * S * n * k. "max rel err" is |engine - first| / |first| (normwise) of the
same call against the first engine that ran it: a wrong kernel shows up here before it shows up
in a speed (for gate_up + swiglu, of a). An engine "sm90:<pipeline>"
runs the sm90 engine with MOEFORGE_SM90_PIPELINE=<pipeline> (serial, overlapped,
warp_specialized, warp_specialized_wide: 128 x 256 tiles; LoRA rows, GEMMs of <= 128
columns and the weight gradient on the 128 x 128 warp-specialised kernels).

    python benchmarks/bench_grouped_mm.py [--models qwen3-30b-a3b ...] [--tokens 4096 16384]
        [--engines auto sm90:serial sm90:overlapped sm90:warp_specialized
                   sm90:warp_specialized_wide moeforge]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import os

import torch
from common import MODEL_SHAPES, environment, print_table, routed_ids, time_ms, write_json

from moeforge import ops

_ops = torch.ops.moeforge


def gemm_cases(T: int, H: int, I: int, E: int, K: int, device: str):
    """(name, call, flops) of the GEMMs above for one model shape; call() runs the op."""
    dt = torch.bfloat16
    plan = ops.routing(routed_ids(T, K, E, device), E)
    offs = plan.expert_offsets
    S = T * K
    x = torch.randn(T, H, device=device, dtype=dt)
    xs = ops.permute(x, plan)
    w_gu = torch.randn(E, 2 * I, H, device=device, dtype=dt) / H**0.5
    a = torch.randn(S, I, device=device, dtype=dt)
    w_dn = torch.randn(E, H, I, device=device, dtype=dt) / I**0.5
    d_out = torch.randn(T, H, device=device, dtype=dt)
    grad_h = torch.randn(S, 2 * I, device=device, dtype=dt)
    grad_x_mask, grad_w_mask = [True, False, False], [False, True, False]
    pairs = (plan.sorted_pairs, plan.pair_to_row)
    gate_up = 2 * S * 2 * I * H
    r = 16  # LoRA rank
    u = torch.randn(S, r, device=device, dtype=dt)
    gu_B = torch.randn(2 * I, r * E, device=device, dtype=dt) / r
    dn_B = torch.randn(H, r * E, device=device, dtype=dt) / r
    dn_A = torch.randn(E * r, I, device=device, dtype=dt) / I**0.5
    w_gu_t = w_gu.transpose(1, 2).contiguous()  # [E, H, 2I]: gpt-oss's layout
    b_gu = torch.randn(E, 2 * I, device=device, dtype=dt)
    gpt_oss = {"bias": b_gu, "weight_transposed": True, "variant": "gpt_oss"}
    return [
        ("gate_up (gathered)", lambda: ops.grouped_mm(x, w_gu, offs, plan=plan), gate_up),
        ("gate_up (dense)", lambda: ops.grouped_mm(xs, w_gu, offs), gate_up),
        ("gate_up + swiglu", lambda: ops.grouped_mm_swiglu(x, w_gu, offs, plan), gate_up),
        ("down", lambda: ops.grouped_mm(a, w_dn, offs), 2 * S * H * I),
        (
            "grad_aw (gathered)",
            lambda: ops.grouped_mm(d_out, w_dn, offs, None, True, plan=plan),
            2 * S * I * H,
        ),
        (
            "grad_x (gate_up)",
            lambda: _ops.grouped_mm_backward(grad_h, xs, w_gu, offs, False, grad_x_mask)[0],
            gate_up,
        ),
        (
            "dW gate_up",
            lambda: _ops.grouped_mm_backward(grad_h, x, w_gu, offs, False, grad_w_mask, *pairs)[1],
            gate_up,
        ),
        (
            "gate_up+swiglu+LoRA",
            lambda: ops.grouped_mm_swiglu(
                x, w_gu, offs, plan, lora_u=u, lora_B=gu_B, lora_scaling=2.0
            ),
            gate_up,
        ),
        ("down + LoRA", lambda: ops.grouped_mm_lora(a, w_dn, offs, u, dn_B, 2.0), 2 * S * H * I),
        (
            "gpt-oss gate_up",
            lambda: ops.grouped_mm_swiglu(x, w_gu_t, offs, plan, **gpt_oss),
            gate_up,
        ),
        (
            "grad_aw + LoRA",
            lambda: ops.grouped_mm_lora(
                d_out,
                w_dn,
                offs,
                u,
                dn_A,
                2.0,
                lora_rank_major=False,
                weight_transposed=True,
                plan=plan,
            ),
            2 * S * I * H,
        ),
    ]


def relative_error(got, want) -> float:
    """Normwise, of the last output when an op returns several (a of grouped_mm_swiglu)."""
    got = got[-1] if isinstance(got, tuple) else got
    want = want[-1] if isinstance(want, tuple) else want
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["qwen3-30b-a3b"], choices=sorted(MODEL_SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument(
        "--engines",
        nargs="+",
        default=[
            "auto",
            "sm90:serial",
            "sm90:overlapped",
            "sm90:warp_specialized",
            "sm90:warp_specialized_wide",
            "moeforge",
        ],
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped_mm.py compares CUDA engines: it needs a GPU")
    print(environment(args.device))
    saved = {v: os.environ.get(v) for v in ("MOEFORGE_GROUPED_GEMM", "MOEFORGE_SM90_PIPELINE")}
    rows = []
    for model in args.models:
        H, I, E, K = MODEL_SHAPES[model]
        for T in args.tokens:
            for name, call, flops in gemm_cases(T, H, I, E, K, args.device):
                row = {"model": model, "T": T, "gemm": name}
                reference = ref_engine = None
                for engine in args.engines:
                    engine_name, _, pipeline = engine.partition(":")
                    os.environ["MOEFORGE_GROUPED_GEMM"] = engine_name
                    os.environ["MOEFORGE_SM90_PIPELINE"] = pipeline
                    try:
                        out = call()
                        ms = time_ms(call, args.device)
                    except (RuntimeError, torch.OutOfMemoryError) as exc:
                        row[f"{engine} ms"] = f"error: {str(exc).splitlines()[0][:60]}"
                        continue
                    row[f"{engine} ms"] = f"{ms:.3f}"
                    row[f"{engine} TFLOP/s"] = f"{flops / ms / 1e9:.0f}"
                    if reference is None:
                        reference, ref_engine, row["first ms"] = out, engine, ms
                    else:
                        row[f"{engine} vs {ref_engine}"] = f"{row['first ms'] / ms:.2f}x"
                        rel = relative_error(out, reference)
                        row["max rel err"] = f"{max(rel, float(row.get('max rel err', 0))):.1e}"
                    del out
                del reference
                row.pop("first ms", None)
                rows.append(row)
                print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)  # progress
            torch.cuda.empty_cache()
    for variable, value in saved.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value
    print()
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "max rel err"))
    print_table(rows, [*columns, "max rel err"])
    write_json(args.json, rows, args.device)


if __name__ == "__main__":
    main()
