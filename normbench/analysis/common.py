"""What every measurement shares: the model under its wrappers, its twin (a deep copy to
measure on, so the trained model is never touched), and the RNG states kept around it."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper (parameters are shared)."""
    return getattr(model, "_orig_mod", model)


@contextmanager
def preserved_rng(device: Optional[torch.device] = None):
    """Restore the CPU (and the device's) RNG state on exit: extra forwards draw nothing."""
    cpu = torch.get_rng_state()
    dev = None
    if device is not None and device.type == "cuda":
        dev = torch.cuda.get_rng_state(device)
    elif device is not None and device.type == "mps":
        dev = torch.mps.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if dev is not None and device.type == "cuda":
            torch.cuda.set_rng_state(dev, device)
        elif dev is not None:
            torch.mps.set_rng_state(dev)


def local_statistics(model: nn.Module) -> nn.Module:
    """Turn every SyncBatchNorm layer of ``model`` into plain BatchNorm, in place.

    Every measurement runs on one process (rank 0 under torchrun) while the other ranks go
    on or have already left: a train-mode forward through SyncBatchNorm would all-reduce with
    whatever collective another rank is in, or wait for a rank that has exited. On the copy
    each layer keeps its parameters and running statistics and normalizes a train-mode batch
    with this process's own statistics: train mode "at the per-process batch". SyncBatchNorm2d
    adds no state to BatchNorm2d, so changing the class is exact."""
    from normbench.norms.batch_norm import BatchNorm2d
    from normbench.norms.sync_batch_norm import SyncBatchNorm2d

    for m in model.modules():
        if isinstance(m, SyncBatchNorm2d):
            m.__class__ = BatchNorm2d
    return model


def twin_of(model: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) model, in train mode, without gradients, whose
    SyncBatchNorm layers are plain BatchNorm (:func:`local_statistics`)."""
    twin = copy.deepcopy(unwrap(model))
    for p in twin.parameters():
        p.grad = None
    return local_statistics(twin).train()


