"""The speed paths of the per-sample normalizers: custom autograd Functions with hand-written
backward passes (each checked by ``torch.autograd.gradcheck`` in tests/test_norms.py).

* :class:`GroupNormFn`: GroupNorm / LayerNorm / InstanceNorm (+ a fused ReLU) in the fused
  kernels, one call each way; only where they apply (elsewhere the layer runs PyTorch's
  GroupNorm kernel);
* :class:`FRNFn` (FRN + TLU), :class:`TLUFn` and :class:`EvoNormS0Fn`: on every device; the fused
  kernels where they apply, else the primitives of functional.py, whose CPU fast path maps onto
  PyTorch's per-channel kernels: autograd through the naive expressions of these layers is
  3.5-13x slower than GroupNorm + ReLU on CPU (see scripts/bench_norms.py --naive).

The plain-PyTorch references these are tested against are in normbench/norms/group_norm.py,
filter_response.py and evonorm.py.
"""
from __future__ import annotations

import torch

from normbench.norms.speed import native
from normbench.norms.speed.functional import affine_bc, affine_bc_backward, mean_sq, moments, threshold_backward


class GroupNormFn(torch.autograd.Function):
    """GroupNorm (+ a fused ReLU) through the fused kernels (native.py); see
    normbench.norms.group_norm.GroupNorm. Backward per sample and group, N = C/G H W, g' = g (or g where y > 0):
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
    """FRN (+ TLU when ``tau`` is given); see
    normbench.norms.filter_response.FilterResponseNorm2d.

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


class EvoNormS0Fn(torch.autograd.Function):
    """EvoNorm-S0 (``v`` given) or group-std scaling only (``v`` None); see normbench.norms.evonorm.EvoNormS0.

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
