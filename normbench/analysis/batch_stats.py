"""Batch statistics after training: test accuracy with running, batch (train-mode) and
precise-BN (recomputed) statistics, and the local statistics a SyncBN model uses alone."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from normbench.analysis.common import preserved_rng, twin_of, unwrap
from normbench.evaluation import evaluate


def running_stat_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that keep running statistics: floating buffers named ``running_*`` (the
    PyTorch convention; every BN-like layer in normbench.norms follows it)."""
    out = []
    for m in model.modules():
        names = [n for n, b in m.named_buffers(recurse=False) if n.startswith("running") and b.is_floating_point()]
        if names:
            out.append(m)
    return out


def _momentum_attrs(m: nn.Module) -> list[str]:
    """The attribute holding a stat layer's averaging rate (normbench's layers: ``momentum``)."""
    return [a for a in ("momentum",) if isinstance(getattr(m, a, None), (int, float))]


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[nn.Module, int]:
    """"Precise BN": a copy of ``model`` whose running statistics are the equal-weight average,
    over ``batches`` (normalized inputs), of the batch statistics its layers compute in train
    mode with the weights frozen (no gradients). Returns (copy, number of batches used).

    This is PyTorch's cumulative average (``momentum=None`` after a reset), done through each
    layer's own update rule so that every layer with ``running_*`` buffers and an exponential
    average at rate ``momentum`` is recalibrated (BN, Ghost BN, Batch Renorm): before batch k
    (0-based) the rate is set to 1 / (k + 1), so after it the buffers hold the mean of the
    statistics of batches 0..k (the first batch overwrites the old values: no reset needed).
    Batch Renorm's r, d during the pass are taken against this running average. The rates are
    restored afterwards; ``num_batches_tracked`` advances on the copy only.
    """
    twin = twin_of(model)
    layers = [(m, _momentum_attrs(m)) for m in running_stat_layers(twin)]
    layers = [(m, attrs) for m, attrs in layers if attrs]
    if not layers:
        return twin.eval(), 0
    saved = [{a: getattr(m, a) for a in attrs} for m, attrs in layers]
    count = 0
    try:
        for x in batches:
            for m, attrs in layers:
                for a in attrs:
                    setattr(m, a, 1.0 / (count + 1))
            twin(x)
            count += 1
    finally:
        for (m, _), rates in zip(layers, saved):
            for a, v in rates.items():
                setattr(m, a, v)
    return twin.eval(), count


def accuracy(model: nn.Module, data, normalize, batch_size: int, train_mode: bool) -> float:
    """Test accuracy through ``normbench.evaluation.evaluate`` on a deep copy of the model (so even
    ``num_batches_tracked``, which ``evaluate(train_mode=True)`` advances, is untouched)."""

    twin = twin_of(model)
    return evaluate(twin, data, normalize, batch_size, train_mode=train_mode)["acc"]


def train_eval_gap(model: nn.Module, data, normalize, batch_size: int, eval_batch_size: int,
                   eval_acc: Optional[float] = None) -> dict:
    """Test accuracy with running statistics (eval mode) and with each test batch's own
    statistics at the run's ``batch_size`` (train mode); gap = train-mode - eval-mode."""
    if eval_acc is None:
        eval_acc = accuracy(model, data, normalize, eval_batch_size, train_mode=False)
    train_acc = accuracy(model, data, normalize, batch_size, train_mode=True)
    return {"test_acc_eval_mode": eval_acc, "test_acc_train_mode": train_acc,
            "train_eval_gap": train_acc - eval_acc}


def training_batches(cfg, data, normalize, batch_size: int, max_images: Optional[int] = None):
    """One pass over the training set as training sees it (same augmentation), in batches of
    ``batch_size``; the order is the plan of epoch ``train.epochs`` (never trained on)."""
    from normbench.data import EpochPlan

    n = len(data.train_y)
    plan = EpochPlan(n, batch_size, cfg.seed, cfg.train.epochs, cfg.data.augment, data.train_y.device)
    steps = plan.steps if max_images is None else min(plan.steps, max(1, max_images // batch_size))
    for i in range(steps):
        x, _ = plan.batch(data, i)
        yield normalize(x)


def precise_bn_batches(data, normalize, images: int, batch_size: int):
    """The in-run precise-BN pass: the first ``images`` training images in their stored order,
    without augmentation, normalized, in batches of ``batch_size`` (at most the training set;
    a short last batch is dropped so that every batch weighs the same)."""
    n = min(images, len(data.train_y))
    b = max(1, min(batch_size, n))
    for start in range(0, n - n % b, b):
        yield normalize(data.train_x[start:start + b])


def precise_bn_eval(model: nn.Module, data, normalize, images: int, batch_size: int, eval_batch_size: int,
                    device: Optional[torch.device] = None) -> dict:
    """Test accuracy with the running statistics recomputed by :func:`precise_bn` over
    :func:`precise_bn_batches`: ``test_acc_precise_bn`` (None for a model without running
    statistics), ``precise_bn_images`` (images used) and ``precise_bn_batch_size``. The model
    and the RNG are untouched."""
    if not running_stat_layers(unwrap(model)):
        return {"test_acc_precise_bn": None}
    with preserved_rng(device):
        b = max(1, min(batch_size, images, len(data.train_y)))
        twin, used = precise_bn(model, precise_bn_batches(data, normalize, images, b))
        acc = accuracy(twin, data, normalize, eval_batch_size, train_mode=False)
    return {"test_acc_precise_bn": acc, "precise_bn_images": used * b, "precise_bn_batch_size": b}


# ----------------------------------------------------------------------------- 3. dead units


