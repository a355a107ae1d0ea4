"""Per-sample normalizers: statistics never look across the batch.

GroupNorm, LayerNorm and InstanceNorm (one class, GroupNorm, with 1 or C groups) run in the
fused CPU kernels of normbench.norms.native where they apply (with the ReLU that follows
fused in), PyTorch's GroupNorm kernel elsewhere. FRN + TLU, TLU and EvoNorm-S0 are custom
autograd Functions with hand-written backward passes (each checked by
``torch.autograd.gradcheck`` in tests/test_norms.py), built on the fused primitives of
normbench.norms.functional: autograd through their naive expressions is 3.5-13x slower than
GroupNorm + ReLU on CPU (see scripts/bench_norms.py --naive).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms import native
from normbench.norms.functional import (TrailingReLU, affine_bc, affine_bc_backward, mean_sq, moments,
                                        threshold_backward)

FRN_EPS_FLOOR = 1e-6  # learned eps = 1e-6 + |eps_l| (Singh & Krishnan 2019, Sec. 3.2)
FRN_EPS_L_INIT = 1e-4


class GroupNormFn(torch.autograd.Function):
    """GroupNorm (+ a fused ReLU) through the fused kernels (normbench.norms.native); see
    :class:`GroupNorm`. Backward per sample and group, N = C/G H W, g' = g (or g where y > 0):
    dx = rstd (gamma g' - mean_group(gamma g') - x_hat mean_group(gamma g' x_hat)),
    dgamma = sum g' x_hat, dbeta = sum g'."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, relu: bool):
        y, mean, rstd = native.gn_forward_full(x, weight, bias, groups, eps, relu)
        ctx.save_for_backward(x, weight, mean, rstd, y if relu else None)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd, y = ctx.saved_tensors
        gx, gweight, gbias = native.gn_backward_full(gy, x, y, weight, ctx.groups, mean, rstd)
        return gx, gweight if ctx.needs_input_grad[1] else None, gbias if ctx.needs_input_grad[2] else None, \
            None, None, None


class GroupNorm(TrailingReLU, nn.GroupNorm):
    """GroupNorm (Wu & He 2018, Eq. 1-3 with S_i = the C/G channels of i's group).

    mu, sigma^2 over (C/G, H, W) of each sample and group; x_hat = (x - mu) / sqrt(sigma^2 +
    eps); y = gamma * x_hat + beta with per-channel gamma, beta. ``relu=True``: the ReLU that
    follows, applied by the layer. On CPU (float32/64, NCHW or channels_last) the fused kernels
    compute it, ReLU included (:class:`GroupNormFn`); elsewhere PyTorch's kernel, then the ReLU.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 relu: bool = False):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.relu = relu

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.applies(x):
            return GroupNormFn.apply(x, self.weight, self.bias, self.num_groups, self.eps, self.relu)
        return self._act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm2d(GroupNorm):
    """LayerNorm for conv maps (Ba et al. 2016): statistics over (C, H, W) of each sample,
    per-channel affine. Exactly GroupNorm with one group (Wu & He 2018, Sec. 3.1)."""

    def __init__(self, channels: int, eps: float = 1e-5, relu: bool = False):
        super().__init__(1, channels, eps=eps, relu=relu)


class InstanceNorm2d(GroupNorm):
    """InstanceNorm (Ulyanov et al. 2016, Eq. 2): statistics over (H, W) of each sample and
    channel, per-channel affine, no running statistics. Exactly GroupNorm with G = C."""

    def __init__(self, channels: int, eps: float = 1e-5, relu: bool = False):
        super().__init__(channels, channels, eps=eps, relu=relu)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _tlu_grads(gz: torch.Tensor, z: torch.Tensor, tau: torch.Tensor):
    """For z = max(y, tau): dL/dy = gz where y > tau (else 0), dL/dtau = the rest, summed.

    y > tau exactly where z - tau > 0, so the saved output is enough; ties send the gradient
    to tau (a subgradient of max).
    """
    gy = threshold_backward(gz, z - _per_channel(tau), 0.0)
    return gy, gz.sum((0, 2, 3)) - gy.sum((0, 2, 3))


class TLUFn(torch.autograd.Function):
    """z = max(x, tau), tau per channel (in x's dtype, e.g. under bf16 autocast)."""

    @staticmethod
    def forward(ctx, x, tau):
        tau_x = tau.to(x.dtype)
        z = torch.maximum(x, _per_channel(tau_x))
        ctx.save_for_backward(z, tau_x)
        ctx.tau_dtype = tau.dtype
        return z

    @staticmethod
    def backward(ctx, gz):
        z, tau_x = ctx.saved_tensors
        gx, gtau = _tlu_grads(gz, z, tau_x)
        return gx, gtau.to(ctx.tau_dtype)


class FRNFn(torch.autograd.Function):
    """FRN (+ TLU when ``tau`` is given); see :class:`FilterResponseNorm2d`.

    Backward, with inv = 1 / sqrt(nu^2 + eps), x_hat = x inv, a = gamma inv per (sample,
    channel), N = H W and g the gradient reaching y (zero where the TLU clamped):
    dx = a (g - x_hat mean_HW(g x_hat)), dgamma = sum g x_hat, dbeta = sum g,
    deps = -sum gamma inv^2 sum_HW(g x_hat) / 2, dtau = sum of the gradient where clamped.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        bsz, c = x.shape[0], x.shape[1]
        ctx.eps_is_tensor = isinstance(eps, torch.Tensor)
        ctx.native = native.applies(x)
        if ctx.native:  # fused kernels, one call each way (two passes over x here, two back)
            z, inv = native.frn_forward(x, weight, bias, tau, float(eps))
            ctx.save_for_backward(x, weight, inv, z if tau is not None else None, tau)
            return z
        var = mean_sq(x)  # nu^2, (B, C)
        if ctx.eps_is_tensor:  # learned eps: fold it into var
            var, eps = var + eps, 0.0
        z = affine_bc(x, weight.expand(bsz, c), bias.expand(bsz, c), var, eps)
        if tau is not None:
            z = z.clamp_(min=_per_channel(tau))
        ctx.save_for_backward(x, weight, var, z if tau is not None else None, tau)
        ctx.eps = eps
        return z

    @staticmethod
    def backward(ctx, gz):
        if ctx.native:
            x, weight, inv, z, tau = ctx.saved_tensors
            gx, gweight, gbias, gtau, k = native.frn_backward(gz, x, z, tau, weight, inv)
            geps = None
            if ctx.eps_is_tensor and ctx.needs_input_grad[4]:
                geps = k.sum() * (-0.5 * x.shape[2] * x.shape[3])
            return gx, gweight, gbias, gtau, geps
        x, weight, var, z, tau = ctx.saved_tensors
        bsz, c = x.shape[0], x.shape[1]
        gtau = None
        if tau is not None:
            gz_all = gz
            gz = threshold_backward(gz, z - _per_channel(tau), 0.0)
        if x.is_contiguous():
            gz = gz.contiguous()
        gi, dot, gsum = affine_bc_backward(gz, x, weight.expand(bsz, c), var, ctx.eps)  # a g, sum g x_hat, sum g
        k = (weight * dot).div_(var + ctx.eps).div_(x.shape[2] * x.shape[3])  # a inv mean(g x_hat)
        gx = gi.addcmul_(x, k.view(bsz, c, 1, 1), value=-1.0)
        gbias = gsum.sum(0)
        if tau is not None:
            gtau = gz_all.sum((0, 2, 3)) - gbias
        geps = None
        if ctx.eps_is_tensor and ctx.needs_input_grad[4]:
            geps = k.sum() * (-0.5 * x.shape[2] * x.shape[3])
        return gx, dot.sum(0), gbias, gtau, geps


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2019,
    Eq. 1-3 and 4).

    nu^2 = mean over (H, W) of x^2 per sample and channel (no mean centering); x_hat = x /
    sqrt(nu^2 + eps); y = gamma x_hat + beta; with ``tlu=True`` z = max(y, tau) (per-channel
    tau, init 0), the TLU that REPLACES the ReLU after the norm (fused into this layer);
    ``tlu=False`` for the second norm of a residual block. eps = 1e-6, or learned as 1e-6 +
    |eps_l| (``learn_eps``, eps_l init 1e-4; a per-layer scalar), which matters on 1x1
    maps where FRN degenerates to a sign function. Finite on all-zero input (x_hat = 0).
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
        return FRNFn.apply(x, self.weight, self.bias, self.tau, self.effective_eps())


class TLU(nn.Module):
    """Thresholded Linear Unit (Singh & Krishnan 2019, Eq. 4): z = max(x, tau), a learned
    per-channel tau (init 0). normbench uses it (with its own tau) for the activation after
    the residual add of an FRN network (project choice)."""

    def __init__(self, channels: int):
        super().__init__()
        self.tau = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TLUFn.apply(x, self.tau)


class EvoNormS0Fn(torch.autograd.Function):
    """EvoNorm-S0 (``v`` given) or group-std scaling only (``v`` None); see :class:`EvoNormS0`.

    With s = sigmoid(v x), q = x s (or q = x), rstd = 1 / sqrt(var_g + eps) and z = q gamma
    rstd + beta: dq/dx = s + v x s (1 - s), dq/dv = x^2 s (1 - s), d rstd / dx_i = -rstd^3
    (x_i - mu_g) / N_g (N_g = C/G H W), dgamma = sum g q rstd, dbeta = sum g.
    """

    @staticmethod
    def forward(ctx, x, v, weight, bias, groups: int, eps: float):
        bsz, c = x.shape[0], x.shape[1]
        ctx.groups = groups
        ctx.native = native.applies(x)
        if ctx.native:
            return EvoNormS0Fn._forward_native(ctx, x, v, weight, bias, groups, eps)
        mean, rstd = moments(x, groups, eps)  # (B, G)
        rstd_c = rstd.repeat_interleave(c // groups, dim=1)  # (B, C)
        if v is not None:
            s = affine_bc(x, v.expand(bsz, c)).sigmoid_()
            q = x * s
        else:
            s, q = None, x
        z = affine_bc(q, weight * rstd_c, bias.expand(bsz, c))
        ctx.save_for_backward(x, v, weight, mean, rstd, rstd_c, s, q if v is not None else None)
        return z

    @staticmethod
    def _forward_native(ctx, x, v, weight, bias, groups: int, eps: float):
        """Fused kernels, one call each way: group moments from per-channel moments (Chan et al.'s
        parallel variance), then z; s = sigmoid(v x) is stored for backward (recomputing it twice
        there cost more than reading it)."""
        z, mean, rstd, s = native.evo_forward_full(x, v, weight, bias, groups, eps)
        ctx.save_for_backward(x, v, weight, mean, rstd, s)
        return z

    @staticmethod
    def _backward_native(ctx, gz):
        x, v, weight, mean, rstd, s = ctx.saved_tensors
        gx, gv, gweight, gbias = native.evo_backward_full(gz, x, s, v, weight, ctx.groups, mean, rstd)
        return gx, gv, gweight, gbias, None, None

    @staticmethod
    def backward(ctx, gz):
        if ctx.native:
            return EvoNormS0Fn._backward_native(ctx, gz)
        x, v, weight, mean, rstd, rstd_c, s, q = ctx.saved_tensors
        groups = ctx.groups
        bsz, c = x.shape[0], x.shape[1]
        per = c // groups
        if v is None:
            q = x
        if x.is_contiguous():
            gz = gz.contiguous()
        gq, dotq, gsum = affine_bc_backward(gz, q, weight * rstd_c)  # g a, sum g q, sum g
        gweight = (dotq * rstd_c).sum(0)
        grstd = (weight * dotq).view(bsz, groups, per).sum(2)  # (B, G)
        kk = grstd.mul_(rstd.pow(3)).div_(-per * x.shape[2] * x.shape[3])  # dx (rstd path) = kk (x - mu)
        k0 = (-kk * mean).repeat_interleave(per, dim=1)
        gx = affine_bc(x, kk.repeat_interleave(per, dim=1), k0)
        gv = None
        if v is not None:
            p = gq * torch.addcmul(q, q, s, value=-1.0)  # gq x s (1 - s)
            pv, dot_px, _ = affine_bc_backward(p, x, v.expand(bsz, c), need_dot=ctx.needs_input_grad[1])
            if dot_px is not None:
                gv = dot_px.sum(0)
            gx.add_(pv).addcmul_(gq, s)  # + gq (s + v x s (1 - s))
        else:
            gx.add_(gq)
        return gx, gv, gweight, gsum.sum(0), None, None


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020, Table 1 / Fig. 2).

    z = x * sigmoid(v x) / group_std(x) * gamma + beta, group_std(x) = sqrt(var over (C/G, H,
    W) of each sample and group + eps) (biased variance, eps inside the root, so a
    zero-variance group is amplified by 1/sqrt(eps) instead of giving NaN); per-channel v = 1,
    gamma = 1, beta = 0 at init. It carries its own non-linearity (replaces norm + ReLU).
    Groups as GroupNorm (norm.groups / norm.group_size, default 8). ``apply_act=False`` (the
    second norm of a residual block) is group-std scaling only: z = x / group_std(x) * gamma
    + beta (project choice; timm's no-act variant is a bare affine instead).
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
        return EvoNormS0Fn.apply(x, self.v, self.weight, self.bias, self.groups, self.eps)
