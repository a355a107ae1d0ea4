"""CIFAR-10 in memory: the splits as uint8 tensors on the training device, normalization, and
each epoch's batches.

Training batches come from uint8 tensors held in memory with a per-sample random crop (zero
padding 4) and horizontal flip done as one batched gather: no per-image Python, no
DataLoader. The order and the augmentation of every epoch derive from (seed, epoch) alone,
so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from normbench.data.files import DataIdentity, ensure_cifar10_identity, load_split
from normbench.errors import UserError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of ``n`` samples with classes as equal as possible (fixed, seed-independent)."""
    classes = int(labels.max()) + 1
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345))
    per_class = [order[labels[order] == c] for c in range(classes)]
    quota = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
    picked = torch.cat([idx[:q] for idx, q in zip(per_class, quota)])
    return picked.sort().values


@dataclass
class Cifar10:
    train_x: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    fingerprint: Optional[str] = None  # DataIdentity.fingerprint of the files loaded

    @property
    def identity(self) -> Optional[DataIdentity]:
        return DataIdentity(self.source, self.fingerprint) if self.fingerprint else None

    def to(self, device: torch.device) -> "Cifar10":
        return Cifar10(self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                       self.test_y.to(device), self.source, self.fingerprint)


def load_cifar10(data_cfg, log=print) -> Cifar10:
    folder, identity = ensure_cifar10_identity(data_cfg.resolved_root(), data_cfg.allow_download, log)
    train_x, train_y = load_split(folder, train=True)
    test_x, test_y = load_split(folder, train=False)
    if data_cfg.train_subset is not None:
        if data_cfg.train_subset > len(train_y):
            raise UserError(f"data.train_subset: got {data_cfg.train_subset}; the training set has {len(train_y)} images")
        idx = balanced_subset(train_y, data_cfg.train_subset)
        train_x, train_y = train_x[idx], train_y[idx]
    return Cifar10(train_x, train_y, test_x, test_y, identity.source, identity.fingerprint)


# ----------------------------------------------------------------------------- batches


class Normalizer:
    """uint8 images -> float, standardized per channel, in the requested memory format."""

    def __init__(self, device: torch.device, channels_last: bool):
        mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, x_u8.to(torch.float32), self.scale)
        return x.contiguous(memory_format=self.memory_format)


def crop_flip(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Per-sample crop at offsets (oy, ox) of the zero-padded image, mirrored where ``flip``.

    One advanced-indexing gather for the whole batch: rows oy..oy+H-1, columns ox..ox+W-1
    (reversed for flipped samples) of the padded (H + 2 pad, W + 2 pad) images.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1) - ar_w, ox[:, None] + ar_w)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2**63))


class EpochPlan:
    """The order and augmentation of one epoch, fixed by (seed, epoch).

    Under data-parallel training (``world_size`` ranks) step ``s`` covers the global batch
    ``order[s*G:(s+1)*G]`` with G = batch_size x world_size, and rank r takes its r-th slice of
    ``batch_size`` samples: the shards are disjoint, and the global batches (and their
    augmentation) are exactly those of a single process at batch G."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, augment: bool, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        g = epoch_generator(seed, epoch)
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size
        self.offset = rank * batch_size
        self.steps = n // self.global_batch  # the last incomplete batch is dropped
        self.order = torch.randperm(n, generator=g).to(device)
        offsets = torch.randint(0, 9, (n, 2), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool()
        self.augment = augment
        self.oy, self.ox = offsets[:, 0].to(device), offsets[:, 1].to(device)
        self.flip = flips.to(device)

    def batch(self, data: Cifar10, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of batch ``step`` (augmented when enabled)."""
        start = step * self.global_batch + self.offset
        sl = slice(start, start + self.batch_size)
        idx = self.order[sl]
        x = data.train_x[idx]
        if self.augment:
            x = crop_flip(x, self.oy[sl], self.ox[sl], self.flip[sl])
        return x, data.train_y[idx]
