"""Shared benchmark helpers: timing (CUDA events, warm-up, median), environment, model shapes."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

# (H, I, E, K) of one MoE layer.
MODEL_SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "qwen3-235b-a22b": (4096, 1536, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}


# MoE layers per model (the router losses sum over all of them). DeepSeek-V3: 61 layers, the
# first 3 dense.
MOE_LAYERS = {
    "qwen3-30b-a3b": 48,
    "olmoe": 16,
    "mixtral-8x7b": 32,
    "gpt-oss-20b": 24,
    "qwen3-235b-a22b": 94,
    "deepseek-v3": 58,
}


def time_ms(fn: Callable[[], object], device: str, warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment(device: str) -> str:
    """One line: device, torch version, commit, date — printed above every results table."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    commit = os.environ.get("MOEFORGE_COMMIT", "")
    try:
        commit = (
            commit
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    date = datetime.date.today().isoformat()
    return f"device: {name} | torch {torch.__version__} | commit {commit} | date {date}"


def routed_ids(T: int, K: int, E: int, device: str) -> torch.Tensor:
    """Top-k ids of a random softmax router: distinct experts per token, ``[T, K]`` int64."""
    return torch.rand(T, E, device=device).topk(K, dim=-1).indices


def write_json(path: str | None, rows: list[dict], device: str) -> None:
    """The rows of a results table and the environment line, for benchmarks/targets.py."""
    if path:
        with open(path, "w") as f:
            json.dump({"environment": environment(device), "rows": rows}, f, indent=1)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def profiled_averages(step: Callable[[], object], steps: int, activity):
    """torch.profiler's per-name averages over ``steps`` calls of ``step`` after 3 warm-up calls,
    recording one activity (ProfilerActivity.CUDA: kernels; CPU: host ops)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof.key_averages()


def kernel_times(step: Callable[[], object], steps: int = 3) -> list[tuple[float, int, str]]:
    """(ms per call, launches per call, kernel name) of ``step``'s GPU work, largest first,
    summed per kernel name. Their sum is the device time of a call without the host's launch and
    Python overhead."""
    averages = profiled_averages(step, steps, torch.profiler.ProfilerActivity.CUDA)
    rows = [
        (getattr(a, "self_device_time_total", 0.0) / 1e3 / steps, a.count // steps, a.key)
        for a in averages
    ]
    return sorted((r for r in rows if r[0] > 0), reverse=True)


def print_kernel_profile(step: Callable[[], object], steps: int = 3, top: int = 18) -> None:
    """Prints kernel_times(step): the GPU time per call and its largest kernels."""
    rows = kernel_times(step, steps)
    print(f"GPU time per step {sum(r[0] for r in rows):.3f} ms (kernels and copies, summed)")
    for ms, count, name in rows[:top]:
        print(f"{ms:8.3f} ms {count:4d}x  {name[:110]}")


def print_host_profile(step: Callable[[], object], steps: int = 3, top: int = 12) -> None:
    """The host side of ``step``: the ops and autograd nodes with the most CPU time per call, to
    see where the wall time goes above the GPU time."""
    averages = profiled_averages(step, steps, torch.profiler.ProfilerActivity.CPU)
    rows = sorted(((a.self_cpu_time_total / 1e3 / steps, a.count // steps, a.key)
                   for a in averages), reverse=True)  # fmt: skip
    print(f"host CPU time per step {sum(r[0] for r in rows):.3f} ms (self time, summed)")
    for ms, count, name in rows[:top]:
        print(f"{ms:8.3f} ms {count:4d}x  {name[:110]}")
