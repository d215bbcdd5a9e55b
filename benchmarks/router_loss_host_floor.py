"""The host cost of a router-loss step that no kernel can remove: autograd over one gradient per
MoE layer. Times forward + backward of a trivial op over Qwen3-30B-A3B's 48 router-logit tensors
(leaves, gradients set to None first, as in bench_router_loss.py), registered two ways —
torch.library ``custom_op`` + ``register_autograd`` (how moeforge registers its ops) and a plain
``torch.autograd.Function`` — beside moeforge's real ``router_loss``. The trivial op does no GPU
work beyond two scalars and 48 empty gradients, so its wall time is the floor set by autograd,
the allocator and Python for 48 tensors.

    python benchmarks/router_loss_host_floor.py [--layers 48] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import time

import torch

import moeforge  # noqa: F401  (registers torch.ops.moeforge)
from moeforge import ops


@torch.library.custom_op("moeforge_floor::trivial_loss", mutates_args=())
def trivial_loss(logits: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits[0].new_zeros((), dtype=torch.float32)
    return z, z.clone()


@trivial_loss.register_fake
def _(logits, top_k):
    z = logits[0].new_empty((), dtype=torch.float32)
    return z, z.clone()


@torch.library.custom_op("moeforge_floor::trivial_loss_backward", mutates_args=())
def trivial_loss_backward(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in logits]


@trivial_loss_backward.register_fake
def _(logits):
    return [torch.empty_like(t) for t in logits]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0])


def _backward(ctx, grad_aux, grad_z):
    return trivial_loss_backward(list(ctx.saved_tensors)), None


torch.library.register_autograd("moeforge_floor::trivial_loss", _backward, setup_context=_setup)


class TrivialLossFunction(torch.autograd.Function):
    """The same trivial op as a plain autograd.Function (the layers as separate arguments)."""

    @staticmethod
    def forward(ctx, top_k: int, *logits: torch.Tensor):
        ctx.save_for_backward(*logits)
        z = logits[0].new_zeros((), dtype=torch.float32)
        return z, z.clone()

    @staticmethod
    def backward(ctx, grad_aux, grad_z):
        return (None, *[torch.empty_like(t) for t in ctx.saved_tensors])


def median_ms(step, sync, iters: int = 50) -> float:
    """Median host-to-completion time of step() (synchronised after each call, as time_ms)."""
    for _ in range(20):
        step()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[iters // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=128)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens = args.tokens if device == "cuda" else 16  # on CPU only the host side is of interest
    logits = [
        torch.randn(tokens, args.experts, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(args.layers)
    ]

    def step(loss_fn):
        def run():
            for layer in logits:
                layer.grad = None
            aux, z = loss_fn()
            (aux + z).backward()

        return run

    steps = {
        "trivial op, torch.library + register_autograd": step(
            lambda: torch.ops.moeforge_floor.trivial_loss(logits, 8)
        ),
        "trivial op, plain autograd.Function": step(lambda: TrivialLossFunction.apply(8, *logits)),
        "48 x empty_like alone": lambda: [torch.empty_like(t) for t in logits],
        "moeforge router_loss": step(lambda: ops.router_loss(logits, 8)),
    }
    print(f"device {device} | torch {torch.__version__} | {args.layers} layers x [{tokens}, "
          f"{args.experts}] bf16 | fwd+bwd, median of 50")  # fmt: skip
    for name, run in steps.items():
        print(f"{name:48s} {median_ms(run, sync):7.3f} ms")


if __name__ == "__main__":
    main()
