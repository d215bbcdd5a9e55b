"""moeforge.MoE under DistributedDataParallel, two CPU processes on the gloo backend: the
gradients of the replicated layer equal those of one process on the whole batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moeforge

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_layer() -> moeforge.MoE:
    torch.manual_seed(0)
    moe = moeforge.MoE(16, 12, 6, 2, lora_rank=2, dtype=torch.float64)
    for p in moe.experts.lora.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return moe


def loss_fn(moe, x):
    out, logits = moe(x)
    aux, z = moeforge.router_losses([logits], 2)
    return out.square().mean() + 0.01 * aux + 0.001 * z


def _worker(rank: int, port: int, x: torch.Tensor, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(make_layer())
        shard = x.chunk(WORLD)[rank]
        loss_fn(ddp, shard).backward()
        if rank == 0:
            result.update({n: p.grad.clone() for n, p in ddp.module.named_parameters()})
        # Both ranks finish before either tears gloo down: a rank destroying the group while the
        # other is still inside it can abort ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process():
    x = torch.randn(2 * 10, 16, dtype=torch.float64)
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_worker, args=(_free_port(), x, result), nprocs=WORLD, join=True)
    # DDP averages the per-rank gradients of the per-rank mean losses.
    single = make_layer()
    for shard in x.chunk(WORLD):
        (loss_fn(single, shard) / WORLD).backward()
    assert result, "rank 0 returned no gradients"
    for name, p in single.named_parameters():
        torch.testing.assert_close(result[name], p.grad, msg=name)
