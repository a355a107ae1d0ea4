"""Gradient clipping, applied after backward and before the optimizer step.

Every mode is a :class:`Clipper`: called with the model's parameters after backward, it
clips their ``.grad`` in place and returns a :class:`ClipStats` of 0-d tensors on the
training device (no host sync): the global L2 norm of the gradient before clipping, the
threshold in force, and the fraction clipped (units for AGC, elements for value, the step
itself for the norm-based modes). The engine reads them once per log interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class ClipStats:
    norm: torch.Tensor  # global L2 norm of all gradients before clipping
    threshold: torch.Tensor  # the threshold in force this step (NaN when none applies)
    clipped_frac: torch.Tensor  # fraction of steps / units / elements clipped this step


def grads_of(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum of squares) over every gradient element, as one 0-d float32 tensor."""
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack(norms)).float()


def clip_by_global_norm_(grads: list[torch.Tensor], norm: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """g <- min(1, c / ||g||) g in place (no 1e-6 in the denominator); returns 1.0 if clipped."""
    coef = torch.clamp(threshold / norm, max=1.0)
    torch._foreach_mul_(grads, coef)
    return (norm > threshold).float()


class Clipper:
    """Base class: no clipping, only the pre-clip norm."""

    def __init__(self, cfg, model: nn.Module):
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        self._nan = torch.tensor(float("nan"), device=device)
        self._zero = torch.tensor(0.0, device=device)

    def __call__(self) -> ClipStats:
        grads = grads_of(self.params)
        return ClipStats(global_norm(grads), self._nan, self._zero)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NormClipper(Clipper):
    """Clip by global L2 norm at ``clip.max_norm``: g <- min(1, c / ||g||_2) g."""

    def __init__(self, cfg, model: nn.Module):
        super().__init__(cfg, model)
        self.threshold = torch.tensor(float(cfg.max_norm), device=self._zero.device)

    def __call__(self) -> ClipStats:
        grads = grads_of(self.params)
        norm = global_norm(grads)
        clipped = clip_by_global_norm_(grads, norm, self.threshold)
        return ClipStats(norm, self.threshold, clipped)


CLIPPERS: dict[str, Callable[..., Clipper]] = {
    "none": Clipper,
    "norm": NormClipper,
}


def make_clipper(cfg, model: nn.Module) -> Clipper:
    return CLIPPERS[cfg.mode](cfg, model)
