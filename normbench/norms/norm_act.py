"""A normalization layer and the non-linearity after it, as one unit (docs/methods.md#conventions).

:class:`NormAct` is what the registry builds for every scheme. :class:`TrailingReLU` is the
mixin of the layers that apply the ReLU after them themselves (``relu=True``: bn, ghost_bn,
brn, gn, ln, in, ws_gn), so that where a fused kernel runs, the ReLU is computed in the same
pass; the maths is ``max(y, 0)`` either way.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class NormAct(nn.Module):
    """A normalization layer followed by its activation (or none when ``act`` is None)."""

    def __init__(self, norm: nn.Module, act: Optional[nn.Module]):
        super().__init__()
        self.norm = norm
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):  # mixed precision: statistics in fp32
            return self.act(self.norm(x.float()))
        return self.act(self.norm(x))


class TrailingReLU:
    """Mixin for a norm layer that also applies the ReLU after it (``relu=True``; the fused kernels
    do it in the same pass, otherwise :meth:`trailing_relu` applies it in place). ``dead_floor`` tells
    normbench.analysis.dead_units where the layer's output counts as dead."""

    relu: bool = False

    @property
    def dead_floor(self):
        return 0.0 if self.relu else None

    def trailing_relu(self, y: torch.Tensor) -> torch.Tensor:
        return torch.relu_(y) if self.relu else y
