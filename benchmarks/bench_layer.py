"""One MoE layer (router included, input requires grad), forward and forward+backward, moeforge vs
the peers measured in the same run: HF eager loop (small T only), HF ``grouped_mm`` (transformers'
default), a careful plain-torch pipeline (argsort + gather + ``torch._grouped_mm`` +
``index_add_``) and PEFT expert LoRA on HF ``grouped_mm``.

Modes: ``train`` (expert weights trainable), ``frozen`` (expert weights frozen), ``lora`` (frozen
experts + LoRA r on both projections). TFLOP/s counts ``6*T*K*H*I`` per GEMM pass: forward 1 pass,
frozen forward+backward 2, trainable forward+backward 3 (LoRA FLOPs not counted).

    python benchmarks/bench_layer.py --models qwen3-30b-a3b --tokens 4096 16384
    python benchmarks/bench_layer.py --device cpu --tiny        # smoke run
    python benchmarks/bench_layer.py --engines auto moeforge simt   # every grouped GEMM engine

``--unfused`` adds "moeforge (op by op)": the same ops composed one by one with their own
autograd (permute materialised, activation and expert outputs saved), i.e. moe_experts before the
fused layer, to measure what the fusion buys in time and peak memory.

``--engines`` runs the moeforge path once per grouped GEMM engine (MOEFORGE_GROUPED_GEMM, see
csrc/cuda/grouped_mm.cpp): ``auto`` (the default: torch's ``at::_grouped_mm`` where it applies,
bfloat16 on sm90 / sm100, our engine elsewhere; LoRA's GEMMs too), ``moeforge``
(our kernels only: WMMA tensor cores for fp16 / bf16 on sm80+, SIMT for the rest) and ``simt``
(our SIMT kernels only) and ``sm90`` (experimental: our sm_90a wgmma kernels for the bfloat16
GEMMs, torch's for the rest; ``sm90:<pipeline>`` with MOEFORGE_SM90_PIPELINE=<pipeline>:
serial, overlapped, warp_specialized or warp_specialized_wide), labelled "moeforge",
"moeforge (own gemm)", "moeforge (simt gemm)", "moeforge (sm90 gemm)" and e.g.
"moeforge (sm90:warp_specialized gemm)";
the speedup column is relative to the first engine listed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os

import torch
from common import MODEL_SHAPES, environment, kernel_times, print_table, time_ms, write_json

import moeforge

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def one_layer_model(H: int, I: int, E: int, K: int, dtype, device, impl: str):
    """A 1-layer Qwen3-MoE whose MoE block is the unit under test (random weights, std 0.02)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=128, hidden_size=H, intermediate_size=4 * H, moe_intermediate_size=I,
        num_hidden_layers=1, num_attention_heads=max(1, H // 128), num_key_value_heads=1,
        head_dim=128, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation=impl)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def careful_torch_experts(experts, x, ids, weights):
    """argsort + gather + torch._grouped_mm (x2) + weighted index_add, in plain torch."""
    K = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=experts.num_experts)
    offs = counts.cumsum(0).to(torch.int32)
    tok = order // K
    xs = x[tok]
    h = torch._grouped_mm(xs, experts.gate_up_proj.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    a = torch.nn.functional.silu(gate) * up
    y = torch._grouped_mm(a, experts.down_proj.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def iter_paths(args, H, I, E, K, T, mode, dtype):
    """Yields (name, block) one model at a time, where block (a module) maps x [1, T, H] ->
    [1, T, H]; every model is built from the same seed, so all paths share the same weights.
    Built lazily so that only one model's weights (22.5 GB for DeepSeek-V3's 256 experts) are on
    the device at a time; block is None when building the model ran out of device memory."""
    lora = mode == "lora"
    impls = ["grouped_mm", "moeforge"] + (["eager"] if args.eager_max_tokens >= T else [])
    for impl in impls:
        name = {"grouped_mm": "HF grouped_mm", "eager": "HF eager", "moeforge": "moeforge"}[impl]
        name = ("PEFT + " if lora and impl != "moeforge" else "") + name
        try:
            block = build_block(args, H, I, E, K, mode, dtype, impl)
        except torch.OutOfMemoryError:
            release_device_memory()
            yield name, None
            continue
        yield name, block
        if impl == "grouped_mm" and not lora and args.device.startswith("cuda"):
            yield "careful torch", CarefulTorchBlock(block)
        del block
        release_device_memory()


def build_block(args, H, I, E, K, mode, dtype, impl: str) -> torch.nn.Module:
    """The MoE block of a fresh 1-layer model for one path (impl: grouped_mm, moeforge, eager)."""
    model = one_layer_model(
        H, I, E, K, dtype, args.device, "grouped_mm" if impl == "moeforge" else impl
    )
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
            target_modules=[], target_parameters=EXPERT_TARGETS,
        ))  # fmt: skip
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    if impl == "moeforge":
        moeforge.patch_model(model)
    for n, p in model.named_parameters():
        if "experts" in n and "lora_" not in n:
            p.requires_grad_(mode == "train")
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))


def release_device_memory() -> None:
    """Frees the last model's weights and the allocator's cached blocks before the next path."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CarefulTorchBlock(torch.nn.Module):
    """The HF block's router, then careful_torch_experts over its experts (same weights)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        _, w, ids = self.block.gate(flat)
        return careful_torch_experts(self.block.experts, flat, ids, w).view_as(x)


def unfused_moe_experts(
    hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, **ffn_kwargs
):
    """moe_experts composed op by op (each op's own autograd): the baseline of the fusion."""
    from moeforge import ops
    from moeforge.functional import expert_ffn

    plan = ops.routing(top_k_index, gate_up_proj.shape[0])
    x_sorted = ops.permute(hidden_states, plan)
    y_sorted = expert_ffn(x_sorted, plan.expert_offsets, gate_up_proj, down_proj, **ffn_kwargs)
    return ops.combine(y_sorted, plan, top_k_weights)


@contextlib.contextmanager
def layer_variant(unfused: bool):
    """Runs moeforge's HF experts through unfused_moe_experts inside the block."""
    from moeforge.hf import experts_interface

    fused = experts_interface.moe_experts
    if unfused:
        experts_interface.moe_experts = unfused_moe_experts
    try:
        yield
    finally:
        experts_interface.moe_experts = fused


# MOEFORGE_GROUPED_GEMM's values, and the sm90 engine with each MOEFORGE_SM90_PIPELINE.
ENGINES = ["auto", "moeforge", "simt", "sm90"] + [
    f"sm90:{p}" for p in ("serial", "overlapped", "warp_specialized", "warp_specialized_wide")
]


def engine_label(engine: str) -> str:
    return {"auto": "moeforge", "torch": "moeforge", "moeforge": "moeforge (own gemm)"}.get(
        engine, f"moeforge ({engine} gemm)"
    )


@contextlib.contextmanager
def grouped_gemm_engine(engine: str | None):
    """Sets MOEFORGE_GROUPED_GEMM (read by the CUDA ops on every call) for the block; an engine
    "sm90:<pipeline>" also sets MOEFORGE_SM90_PIPELINE (one of ENGINES' pipelines)."""
    names = ("MOEFORGE_GROUPED_GEMM", "MOEFORGE_SM90_PIPELINE")
    old = {name: os.environ.get(name) for name in names}
    if engine is not None:
        gemm, _, pipeline = engine.partition(":")
        os.environ["MOEFORGE_GROUPED_GEMM"] = gemm
        if pipeline:
            os.environ["MOEFORGE_SM90_PIPELINE"] = pipeline
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def train_step(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward + backward as a training step runs them: gradients start unset (what
    ``zero_grad(set_to_none=True)`` leaves), so backward writes them instead of adding to the
    previous step's (that add alone is ~1.3 ms for a trainable Qwen3 layer's weights)."""
    x.grad = None
    for p in block.parameters():
        p.grad = None
    block(x).backward(grad)


def measure(fn, x, grad, device, gpu_time=False):
    """(fwd ms, fwd+bwd ms, peak GiB of fwd+bwd, GPU ms of fwd+bwd or None): wall times by
    time_ms; with gpu_time the kernels' summed time of a step (torch.profiler), i.e. the wall
    time without the host's launch and Python gaps."""

    def fwd():
        return fn(x)

    def fwd_bwd():
        train_step(fn, x, grad)

    t_fwd = time_ms(fwd, device, warmup=3, iters=10)
    t_step = time_ms(fwd_bwd, device, warmup=3, iters=10)
    peak = float("nan")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    t_gpu = None
    if gpu_time and device.startswith("cuda"):
        t_gpu = sum(r[0] for r in kernel_times(fwd_bwd))
    return t_fwd, t_step, peak, t_gpu


def measure_or_oom(fn, x, grad, device, gpu_time=False):
    """measure(), or None when the path runs out of device memory (large T and wide models: the
    other paths still run; the grads and cached blocks it left are released)."""
    try:
        return measure(fn, x, grad, device, gpu_time)
    except torch.OutOfMemoryError:
        x.grad = None
        for p in fn.parameters():
            p.grad = None
        torch.cuda.empty_cache()
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["qwen3-30b-a3b"])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--modes", nargs="+", default=["train", "frozen", "lora"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--eager-max-tokens", type=int, default=4096)
    p.add_argument(
        "--engines",
        nargs="+",
        default=["auto"],
        choices=ENGINES,
        help="grouped GEMM engines to run the moeforge path with (MOEFORGE_GROUPED_GEMM)",
    )
    p.add_argument("--unfused", action="store_true", help="also run the op-by-op composition")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument(
        "--gpu-time", action="store_true",
        help="also the summed kernel time of each path's fwd+bwd (torch.profiler; slower)",
    )  # fmt: skip
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = {"tiny": (64, 32, 8, 2)} if args.tiny else {m: MODEL_SHAPES[m] for m in args.models}
    tokens = [64] if args.tiny else args.tokens
    print(environment(args.device))
    rows = []
    try:
        measure_rows(args, shapes, tokens, dtype, rows)
    finally:  # what was measured is printed even if a later row fails
        cols = ["model", "T", "mode", "path", "fwd ms", "fwd+bwd ms", "fwd TF/s",
                "fwd+bwd TF/s", "fwd+bwd GPU ms", "peak GiB", "peak / HF",
                "moeforge speedup"]  # fmt: skip
        print_table(rows, cols)
        write_json(args.json, rows, args.device)


def measure_rows(args, shapes: dict, tokens: list[int], dtype, rows: list[dict]) -> None:
    """Appends one row per (model, T, mode, path) to rows as each is measured."""
    for model_name, (H, I, E, K) in shapes.items():
        for T in tokens:
            x = torch.randn(1, T, H, device=args.device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            for mode in args.modes:
                passes_step = {"train": 3, "frozen": 2, "lora": 2}[mode]
                flops = 6 * T * K * H * I
                results = {}
                for name, fn in iter_paths(args, H, I, E, K, T, mode, dtype):
                    if fn is None:  # the model itself did not fit
                        results[name] = None
                        continue
                    runs = [(name, None, False)]
                    if name == "moeforge":
                        runs = [(engine_label(e), e, False) for e in args.engines]
                        if args.unfused:
                            runs.append(("moeforge (op by op)", args.engines[0], True))
                    for label, engine, unfused in runs:
                        with grouped_gemm_engine(engine), layer_variant(unfused):
                            results[label] = measure_or_oom(fn, x, grad, args.device, args.gpu_time)
                    fn = None  # so the next model is built after this one is freed
                nan = float("nan")
                ours = (results.get(engine_label(args.engines[0])) or (nan, nan, nan, None))[1]
                # #3's memory target compares our peak with the HF grouped_mm path of the mode
                # (PEFT + HF grouped_mm with LoRA).
                peer = ("PEFT + " if mode == "lora" else "") + "HF grouped_mm"
                peer_peak = (results.get(peer) or (nan, nan, nan, None))[2]
                for name, result in results.items():
                    if result is None:  # out of memory: a row that says so
                        rows.append({"model": model_name, "T": T, "mode": mode, "path": name,
                                     "fwd ms": "OOM", "fwd+bwd ms": "OOM"})  # fmt: skip
                        continue
                    t_fwd, t_step, peak, t_gpu = result
                    rows.append({
                        "model": model_name, "T": T, "mode": mode, "path": name,
                        "fwd ms": f"{t_fwd:.2f}", "fwd+bwd ms": f"{t_step:.2f}",
                        "fwd TF/s": f"{flops / t_fwd / 1e9:.0f}",
                        "fwd+bwd TF/s": f"{passes_step * flops / t_step / 1e9:.0f}",
                        "fwd+bwd GPU ms": "" if t_gpu is None else f"{t_gpu:.2f}",
                        "peak GiB": f"{peak:.2f}", "peak / HF": f"{peak / peer_peak:.2f}",
                        "moeforge speedup": f"{t_step / ours:.2f}x",
                    })  # fmt: skip


if __name__ == "__main__":
    main()
