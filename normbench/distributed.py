"""Data-parallel training under torchrun: process-group set-up and the few collectives the
engine needs.

``torchrun --nproc_per_node=N -m normbench train ...`` (or ``normbench train --nproc N``)
starts N processes with RANK / WORLD_SIZE / LOCAL_RANK in their environment. Each rank
trains the same model on a disjoint shard of every global batch (``train.batch_size`` is the
per-process batch; the global batch is N times that and drives the learning-rate scaling).
Only rank 0 writes the run folder. Backend: gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank that dies makes the others' collectives fail (gloo: connection closed) or, at worst,
# time out after this long; torchrun then ends the job with a non-zero status.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment (no-op when alone). On
    CUDA each process first takes the GPU of its local rank (NCCL binds a process group to the
    current device), and a local rank without a GPU of its own is one line, not a hang."""
    if not launched_by_torchrun():
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            from normbench.errors import UserError

            raise UserError(f"--nproc: {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this "
                            f"machine but it has {count} CUDA device(s); one process per GPU")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def local_device(device: torch.device, ctx: DistContext) -> torch.device:
    """On CUDA each process takes the GPU of its local rank."""
    if ctx.enabled and device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return device


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Make every rank's buffers (BN running statistics) equal to rank 0's."""
    if ctx.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group. Objects that still hold it (a DistributedDataParallel
    reducer in a reference cycle) are collected first, while the interpreter is whole: left
    to interpreter exit, gloo's threads can die with it ("terminate called without an
    active exception", SIGABRT)."""
    if ctx.enabled and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()
