"""Fast primitives for the hand-written normalization layers (CPU-tuned, device-agnostic).

Eager PyTorch on CPU is slow at exactly what a normalizer needs: ``var_mean`` over (H, W) or
over (B, H, W) runs ~20x slower than PyTorch's GroupNorm kernel, reductions across the batch
dimension of an NCHW tensor are ~5x slower than reductions over contiguous (H, W) planes, and
masks (``where``, comparisons) are ~10x slower than arithmetic. So the custom autograd Functions
of chunked.py and per_sample.py have hand-written backward passes (each checked by
``torch.autograd.gradcheck`` in tests/test_norms.py), built from primitives that map onto
PyTorch's fused per-channel kernels, always at the granularity of one (sample, channel)
plane, with cross-sample combinations done on tiny (B, C) tensors:

* :func:`moments`: mean and rstd over (C/G, H, W) of each sample and group via the GroupNorm
  kernel on NCHW tensors (G = C gives per-(sample, channel) moments; numerically stable there);
* :func:`affine_bc`: ``x * a / sqrt(var + eps) + b`` with a, b, var per (sample, channel),
  via the inference-mode BatchNorm kernel on the (1, B*C, H, W) view of x (running mean 0,
  running var ``var`` or 1);
* :func:`affine_bc_backward`: for that map, ``(g * a / sqrt(var + eps), sum_HW g * x /
  sqrt(var + eps), sum_HW g)``, via the inference-mode BatchNorm backward kernel, which
  returns exactly these three.

For channels_last tensors on CPU (the layout of the bn/ghost_bn/frn/evonorm_s0 models) the
same quantities come from the (B, H*W, C) view of the memory, where a reduction over H*W runs
along contiguous rows of C: PyTorch's GroupNorm kernel with G = C and ``vector_norm`` over
(H, W) were measured 5-25x slower there (scripts/bench_norms.py, channels_last columns).
On other devices, and for other layouts, the same maths runs as ordinary broadcasting ops.
``FAST_KERNELS = False`` forces that path (the tests compare all of them).
"""
from __future__ import annotations

from typing import Optional

import torch

FAST_KERNELS = True
_CONSTS: dict = {}
_unsafe_view = torch.ops.aten._unsafe_view.default  # a reshape that is not a view (no autograd view tracking)
_bn_backward = torch.ops.aten.native_batch_norm_backward.default
threshold_backward = torch.ops.aten.threshold_backward.default  # g where x > threshold, else 0


def _const(n: int, value: float, like: torch.Tensor) -> torch.Tensor:
    """A cached, never-modified 1-d tensor of ``n`` copies of ``value``."""
    key = (n, value, like.dtype, like.device)
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 256:
            _CONSTS.clear()
        t = _CONSTS[key] = torch.full((n,), value, dtype=like.dtype, device=like.device)
    return t


def use_fast(x: torch.Tensor) -> bool:
    return FAST_KERNELS and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()


def nhwc_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """The (B, H*W, C) view of a CPU channels_last tensor (None for any other tensor, and for
    shapes where channels_last and NCHW coincide, which the NCHW path handles)."""
    if (not FAST_KERNELS or x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous()
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return None
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(b, h * w, c)


def _empty_nhwc(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A new channels_last tensor shaped like x, and its (B, H*W, C) view (to write into)."""
    out = torch.empty_like(x, memory_format=torch.channels_last)
    return out, out.permute(0, 2, 3, 1).view(x.shape[0], -1, x.shape[1])


def moments(x: torch.Tensor, groups: Optional[int] = None, eps: float = 0.0):
    """(mean, rstd) over (C/G, H, W) per sample and group, each (B, G); biased variance,
    rstd = 1 / sqrt(var + eps). ``groups=None``: G = C. With eps = 0, var = rstd ** -2
    (an all-constant plane gives rstd = inf and var = 0 exactly).

    Every path is stable against a large mean: PyTorch's GroupNorm kernel only on NCHW CPU
    tensors (on channels_last input it takes E[x^2] - mean^2 in float32, measured 1e-2 off at a
    mean of 100 std), a corrected two-pass over the rows of channels_last ones, ``var_mean``
    elsewhere."""
    b, c = x.shape[0], x.shape[1]
    g = c if groups is None else groups
    rows = nhwc_rows(x)
    if rows is not None:
        # two passes over contiguous rows (mean, then deviations d from it), plus the mean of d:
        # the float32 sum over H*W rows leaves the first mean ~10 ulps off, which r repairs
        mean = rows.mean(1, keepdim=True)
        d = rows - mean
        r = d.mean(1)
        var = d.square_().mean(1).sub_(r.square())
        if g == c:
            return mean.view(b, c).add(r), torch.rsqrt(var.clamp_(min=0.0).add_(eps))
        # groups: Chan et al.'s parallel variance over each group's channels, in float64 (tiny
        # (B, C) tensors; in float32, mean_c - mean_g would carry the rounding of a large mean)
        m = (mean.view(b, c).double() + r).view(b, g, c // g)
        v = var.double().view(b, g, c // g)
        mg = m.mean(2, keepdim=True)
        vg = (v + (m - mg).square_()).mean(2).clamp_(min=0.0)
        return mg.view(b, g).to(x.dtype), torch.rsqrt(vg + eps).to(x.dtype)
    if x.device.type == "cpu" and x.is_contiguous():
        _, mean, rstd = torch.native_group_norm(x, None, None, b, c, x.shape[2] * x.shape[3], g, eps)
        return mean, rstd
    if x.device.type != "cpu" and x.dim() == 4 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last):
        # the (B, H*W, G, C/G) view of channels_last memory: reduced in place, not copied to NCHW
        view = x.permute(0, 2, 3, 1).reshape(b, x.shape[2] * x.shape[3], g, c // g)
        var, mean = torch.var_mean(view, dim=(1, 3), unbiased=False)
        return mean, torch.rsqrt(var + eps)
    var, mean = torch.var_mean(x.reshape(b, g, -1), dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def affine_bc(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None,
              var: Optional[torch.Tensor] = None, eps: float = 0.0) -> torch.Tensor:
    """x * a / sqrt(var + eps) + b; a, b, var of shape (B, C) (b None: 0; var None: no division).

    The result is never a view (callers may modify it in place)."""
    bsz, c = x.shape[0], x.shape[1]
    rows = nhwc_rows(x)
    if rows is not None:
        if var is not None:
            a = a * torch.rsqrt(var + eps)
        out, out_rows = _empty_nhwc(x)
        if b is not None:
            torch.addcmul(b.reshape(bsz, 1, c), rows, a.reshape(bsz, 1, c), out=out_rows)
        else:
            torch.mul(rows, a.reshape(bsz, 1, c), out=out_rows)
        return out
    if use_fast(x):
        n = bsz * c
        out = torch.batch_norm(x.view(1, n, x.shape[2], x.shape[3]), a.reshape(n),
                               b.reshape(n) if b is not None else _const(n, 0.0, x), _const(n, 0.0, x),
                               var.reshape(n) if var is not None else _const(n, 1.0, x), False, 0.0, eps, False)
        return _unsafe_view(out, x.shape)
    if var is not None:
        a = a * torch.rsqrt(var + eps)
    a4 = a.reshape(bsz, c, 1, 1)
    return torch.addcmul(b.reshape(bsz, c, 1, 1), x, a4) if b is not None else x * a4


def affine_bc_backward(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, var: Optional[torch.Tensor] = None,
                       eps: float = 0.0, need_dot: bool = True):
    """For y = x * a * s + b with s = 1 / sqrt(var + eps) (or 1): returns (g * a * s,
    sum_HW g * x * s, sum_HW g), the sums of shape (B, C); the second is None unless
    ``need_dot``. The first is never a view."""
    bsz, c = x.shape[0], x.shape[1]
    rows, g_rows = nhwc_rows(x), nhwc_rows(g)
    if rows is not None and g_rows is not None:
        if var is not None:
            s = torch.rsqrt(var + eps).reshape(bsz, c)
            a = a * s
        gi, gi_rows = _empty_nhwc(x)
        torch.mul(g_rows, a.reshape(bsz, 1, c), out=gi_rows)
        dot = (g_rows * rows).sum(1) if need_dot else None
        if dot is not None and var is not None:
            dot = dot * s
        return gi, dot, g_rows.sum(1)
    if use_fast(x) and g.is_contiguous():
        n = bsz * c
        shape = (1, n, x.shape[2], x.shape[3])
        gi, dot, gsum = _bn_backward(
            g.view(shape), x.view(shape), a.reshape(n), _const(n, 0.0, x),
            var.reshape(n) if var is not None else _const(n, 1.0, x), None, None, False, eps,
            [True, need_dot, True])
        return (_unsafe_view(gi, x.shape), dot.view(bsz, c) if need_dot else None,
                gsum.view(bsz, c))
    if var is not None:
        s = torch.rsqrt(var + eps).reshape(bsz, c)
        a = a * s
    dot = (g * x).sum((2, 3)) if need_dot else None
    if dot is not None and var is not None:
        dot = dot * s
    return g * a.reshape(bsz, c, 1, 1), dot, g.sum((2, 3))


def mean_sq(x: torch.Tensor) -> torch.Tensor:
    """mean over (H, W) of x^2 per (sample, channel), shape (B, C)."""
    rows = nhwc_rows(x)
    if rows is not None:
        return (rows * rows).mean(1)
    return torch.linalg.vector_norm(x, dim=(2, 3)).square_().div_(x.shape[2] * x.shape[3])

