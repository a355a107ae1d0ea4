"""Filter Response Normalization and the Thresholded Linear Unit (Singh & Krishnan 2019, "Filter
Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep Neural
Networks", Sec. 3, Eq. 1-3 (FRN) and Eq. 4 (TLU); specified in docs/methods.md#frn).

Per sample n and channel c, with no mean subtracted:

    nu2_nc  = mean over (H, W) of x^2                  the mean square
    x_hat   = x / sqrt(nu2_nc + eps)                   eps = 1e-6, or learned: 1e-6 + |eps_l|
    y       = gamma_c x_hat + beta_c
    z       = max(y, tau_c)                            the TLU, a learned per-channel tau (init 0)

The TLU replaces the ReLU after the norm (fused into the layer); a block's second norm has none.
An all-zero input gives x_hat = 0 (finite). Training and eval compute the same function.

:func:`filter_response_norm_reference` and :func:`tlu_reference` are these as plain PyTorch.
The layers run ``speed.filter_response_norm`` / ``speed.tlu``: hand-written autograd
Functions, in the fused CPU kernels where they apply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from normbench.norms import speed
from normbench.norms.tracing import recording

FRN_EPS_FLOOR = 1e-6  # learned eps = 1e-6 + |eps_l| (Singh & Krishnan 2019, Sec. 3.2)
FRN_EPS_L_INIT = 1e-4


def filter_response_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                   tau: Optional[torch.Tensor], eps) -> torch.Tensor:
    """z (or y when ``tau`` is None), as written above; ``eps`` a float or a tensor."""
    nu2 = x.square().mean((2, 3), keepdim=True)
    y = weight.view(1, -1, 1, 1) * (x / torch.sqrt(nu2 + eps)) + bias.view(1, -1, 1, 1)
    return y if tau is None else tlu_reference(y, tau)


def tlu_reference(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return torch.maximum(x, tau.view(1, -1, 1, 1))


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2019,
    Eq. 1-3 and 4); see the module docstring.

    ``tlu=True``: z = max(y, tau), the TLU that REPLACES the ReLU after the norm;
    ``tlu=False`` for the second norm of a residual block. ``learn_eps``: eps = 1e-6 + |eps_l|
    (eps_l init 1e-4, a per-layer scalar), which matters on 1x1 maps where FRN degenerates to a
    sign function.
    """

    def __init__(self, channels: int, eps: float = 1e-6, learn_eps: bool = False, tlu: bool = True):
        super().__init__()
        self.num_features, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.tau = nn.Parameter(torch.zeros(channels)) if tlu else None
        self.eps_l = nn.Parameter(torch.tensor(FRN_EPS_L_INIT)) if learn_eps else None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learn_eps={self.eps_l is not None}, tlu={self.tau is not None}"

    def effective_eps(self):
        return FRN_EPS_FLOOR + self.eps_l.abs() if self.eps_l is not None else self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recording():  # torch.jit.trace / torch.export: plain PyTorch ops (normbench.norms.tracing)
            return filter_response_norm_reference(x, self.weight, self.bias, self.tau, self.effective_eps())
        return speed.filter_response_norm(x, self.weight, self.bias, self.tau, self.effective_eps())


class TLU(nn.Module):
    """Thresholded Linear Unit (Singh & Krishnan 2019, Eq. 4): z = max(x, tau), a learned
    per-channel tau (init 0). normbench uses it (with its own tau) for the activation after
    the residual add of an FRN network (project choice)."""

    def __init__(self, channels: int):
        super().__init__()
        self.tau = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recording():  # torch.jit.trace / torch.export: plain PyTorch ops (normbench.norms.tracing)
            return tlu_reference(x, self.tau)
        return speed.tlu(x, self.tau)
