"""EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020, "Evolving Normalization-Activation Layers",
Table 1, the S0 expression; specified in docs/methods.md#evonorm_s0).

A normalization and its non-linearity in one layer. Per sample n and group g (groups as
GroupNorm: C/G consecutive channels), per channel c:

    var_ng      = mean over (C/G channels of g, H, W) of (x - mean)^2     biased
    group_std   = sqrt(var_ng + eps)                                     eps inside the root
    z           = x sigmoid(v_c x) / group_std gamma_c + beta_c          v, gamma = 1, beta = 0 at init

A zero-variance group is scaled by 1 / sqrt(eps) instead of giving NaN. Without the
non-linearity (``apply_act=False``, a block's second norm; project choice) there is no v and
``z = x / group_std gamma_c + beta_c``. Training and eval compute the same function.

:func:`evonorm_s0_reference` is this as plain PyTorch. The layer runs ``speed.evonorm_s0``: a
hand-written autograd Function, in the fused CPU kernels where they apply. While the model is
recorded into a program (``torch.jit.trace``, ``torch.export``; normbench.norms.tracing) it runs
the reference instead: the Function cannot be saved in a TorchScript file, and its primitives'
constant cache breaks ``torch.export`` (a symbolic batch size cannot key it; a recording leaves
fake tensors in it). Training, eager or compiled, never takes that branch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from normbench.norms import speed
from normbench.norms.tracing import recording


def evonorm_s0_reference(x: torch.Tensor, v: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                         groups: int, eps: float) -> torch.Tensor:
    """z, as written above (``v`` None: without the non-linearity)."""
    xg = x.reshape(x.shape[0], groups, -1)
    var = (xg - xg.mean(-1, keepdim=True)).square().mean(-1, keepdim=True)
    group_std = torch.sqrt(var + eps).expand_as(xg).reshape(x.shape)
    numerator = x if v is None else x * torch.sigmoid(v.view(1, -1, 1, 1) * x)
    return numerator / group_std * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020, Table 1 / Fig. 2); see the module docstring.

    Groups as GroupNorm (norm.groups / norm.group_size, default 8). ``apply_act=False`` (the
    second norm of a residual block) is group-std scaling only (project choice; timm's no-act
    variant is a bare affine instead).
    """

    def __init__(self, channels: int, groups: int = 8, eps: float = 1e-5, apply_act: bool = True):
        super().__init__()
        if channels % groups:
            raise ValueError(f"{groups} groups do not divide {channels} channels")
        self.num_features, self.groups, self.eps = channels, groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.v = nn.Parameter(torch.ones(channels)) if apply_act else None

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, apply_act={self.v is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recording():  # torch.jit.trace / torch.export: plain PyTorch ops (see the module docstring)
            return evonorm_s0_reference(x, self.v, self.weight, self.bias, self.groups, self.eps)
        return speed.evonorm_s0(x, self.v, self.weight, self.bias, self.groups, self.eps)
