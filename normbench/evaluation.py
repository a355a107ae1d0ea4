"""Test-set evaluation of a model, and the finiteness check of its buffers.

Sums over the test set are taken in float64 where the device has it, and in float32 on
Apple's MPS, which has no float64 (:func:`sum_dtype`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


NO_FLOAT64 = {"mps"}  # device types without float64


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of accumulated sums on ``device``: float64, except where the device has none."""
    return torch.float32 if device.type in NO_FLOAT64 else torch.float64


def images_evaluated(n: int, batch_size: int, train_mode: bool) -> int:
    """How many of ``n`` test images :func:`evaluate` counts: all of them in eval mode; in
    train mode the full batches only (a short last batch would carry other statistics)."""
    return n - (n % batch_size) if train_mode and n >= batch_size else n


@torch.no_grad()
def evaluate(model: nn.Module, data, normalize, batch_size: int, train_mode: bool = False, dist_ctx=None,
             on_images=None) -> dict:
    """Test loss and accuracy over the whole test set. ``train_mode`` uses each test batch's
    own statistics (BN-like layers) without touching the running statistics. Under torchrun
    each rank takes every world_size-th test batch and the sums are all-reduced.
    ``on_images(n)``, when given, hears after each batch how far along the test set the job is
    (all ranks together; for a progress view; it reads nothing from the device)."""
    from normbench.distributed import DistContext, all_reduce_sum

    dist_ctx = dist_ctx or DistContext()
    saved = None
    if train_mode:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(train_mode)
    loss_sum = torch.zeros((), device=data.test_y.device)
    correct = torch.zeros((), device=data.test_y.device, dtype=torch.long)
    n = len(data.test_y)
    usable = images_evaluated(n, batch_size, train_mode)
    for start in range(dist_ctx.rank * batch_size, usable, batch_size * dist_ctx.world_size):
        x = normalize(data.test_x[start:start + batch_size])
        y = data.test_y[start:start + batch_size]
        out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        if on_images is not None:  # all ranks step together: the images the whole job has evaluated
            on_images(min(start - dist_ctx.rank * batch_size + batch_size * dist_ctx.world_size, usable))
    if saved is not None:
        model.load_state_dict(saved)
    model.train()
    wide = sum_dtype(loss_sum.device)
    totals = all_reduce_sum(torch.stack([loss_sum.to(wide), correct.to(wide)]), dist_ctx).tolist()
    return {"loss": totals[0] / usable, "acc": totals[1] / usable}


def buffers_finite(model: nn.Module) -> Optional[str]:
    """Name of the first buffer (e.g. a BN running variance) that is not finite, or None."""
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and not torch.isfinite(buf).all():
            return name
    return None

