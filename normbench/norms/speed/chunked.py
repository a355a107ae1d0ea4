"""The speed path of Ghost BatchNorm and Batch Renorm: BatchNorm statistics per chunk of
consecutive samples, all chunks at once.

:class:`ChunkedBatchNormFn` is one custom autograd Function for both (no Python loop over
chunks), with an optional stop-gradient correction ``x_hat * r + d`` per channel (Batch Renorm).
Its backward is written by hand (checked by gradcheck in tests/test_norms.py) because autograd
through ``var_mean`` is ~10x slower than PyTorch's GroupNorm on CPU. Where the fused kernels
apply it is one C++ call each way (ReLU and the running-statistics update included); elsewhere
the same maths runs on the primitives of functional.py.

:func:`ghost_batch_norm` and :func:`batch_renorm` are what the layers call (through
normbench.norms.speed): each computes a training step's output of its layer and hands the batch
statistics back to the layer's ``update_running`` unless the fused kernel has already moved the
running statistics in place. The references these are tested against are in
normbench/norms/ghost_batch_norm.py and batch_renorm.py.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from normbench.norms.speed import native
from normbench.norms.speed.functional import affine_bc, affine_bc_backward, moments

KERNEL_PATH_MAX_NUMEL = 1 << 17  # Batch Renorm: PyTorch's BN kernel up to this many elements (CPU)


class Chunks:
    """Chunk bookkeeping for a batch split into consecutive chunks: (K, B) matrices, made on
    the batch's device from shapes and Python integers only (no host tensor: under
    torch.compile on a GPU a host-made table would be a copy and a sync every step)."""

    def __init__(self, sizes: list[int], device, dtype):
        ids = torch.arange(sum(sizes), device=device)
        rows, start = [], 0
        for n in sizes:
            rows.append(((ids >= start) & (ids < start + n)).to(dtype))
            start += n
        self.sizes = sizes
        self.member = torch.stack(rows)  # (K, B) 0/1
        self.count = self.member.sum(1)  # (K,) the chunk sizes (sums of ones: exact)
        self.average = self.member / self.count[:, None]  # (K, B) rows sum to 1
        self.expand = self.member.t().contiguous()  # (B, K): chunk value -> each sample
        self._starts = None

    @property
    def starts(self) -> torch.Tensor:
        """(K + 1,) int64 offsets in host memory, for the fused CPU kernels only."""
        if self._starts is None:
            self._starts = native.chunk_starts(self.sizes)
        return self._starts


class ChunkedLayer:
    """Per-step caches of the layers that run ChunkedBatchNormFn: the chunk layout for a batch
    (``chunk_sizes`` says how a batch splits), and whether the fused kernels may update the
    running statistics in place (buffers of x's dtype, contiguous, one value per channel)."""

    def chunk_sizes(self, batch: int) -> list[int]:
        raise NotImplementedError

    def chunks(self, x: torch.Tensor) -> Chunks:
        cache = self.__dict__.setdefault("_chunks_cache", {})
        key = (x.shape[0], x.device, x.dtype)
        chunks = cache.get(key)
        if chunks is None:
            chunks = cache[key] = Chunks(self.chunk_sizes(x.shape[0]), x.device, x.dtype)
        return chunks

    def _buffers_take(self, x: torch.Tensor, *buffers: torch.Tensor) -> bool:
        key = (x.dtype, x.shape[1]) + tuple(b.data_ptr() for b in buffers)
        if getattr(self, "_buffers_key", None) != key:
            self._buffers_key = key
            self._buffers_ok = all(native.can_update_in_place(b, x) for b in buffers)
        return self._buffers_ok


def no_autocast(x: torch.Tensor):
    """A context with autocast off for x's device (a no-op context when it is not on: entering
    torch.autocast costs ~10 us, which shows at batch 2). The meta device has no autocast."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class ChunkedBatchNormFn(torch.autograd.Function):
    """y = gamma * (r * (x - mu_j) / sqrt(var_j + eps) + d) + beta for samples of chunk j.

    mu_j, var_j: mean and biased variance over (samples of chunk j, H, W) per channel,
    combined exactly from per-(sample, channel) moments (Chan et al.'s parallel variance:
    var_j = mean_b (var_bc + (mu_bc - mu_j)^2)). ``renorm`` = (running_mean, running_std,
    r_limit, d_limit) for Batch Renorm (one chunk): r = clip(sigma_B / sigma, 1/r_limit,
    r_limit), d = clip((mu_B - mu) / sigma, -d_limit, d_limit), sigma_B = sqrt(var_B + eps),
    constants in backward; None means r = 1, d = 0 (Ghost BatchNorm).
    Returns (y, stats) with stats[0] = mu (K, C) and stats[1] = var (K, C) (more rows may
    follow); the statistics carry no gradient. ``update`` (see native.cbn_forward) moves running
    statistics in place in the kernel; ``relu`` returns max(y, 0) (a fused ReLU, its mask
    applied to the gradient in backward); both need the fused kernels (native.py).

    Backward (per chunk and channel, N = n_j H W, a = gamma r / sqrt(var_j + eps)):
    dx = a (g - mean(g) - x_hat mean(g x_hat)), dgamma = sum g (r x_hat + d), dbeta = sum g.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chunks: Chunks, eps: float, renorm, update=None, relu=False,
                counter=None):
        ctx.native = native.applies(x)
        if ctx.native:  # fused kernels, one call each way
            ctx.chunks, ctx.renorm = chunks, renorm is not None
            y, stats = native.cbn_forward(x, weight, bias, chunks.starts, eps, renorm, update, relu, counter)
            ctx.save_for_backward(x, stats, y if relu else None)
            ctx.mark_non_differentiable(stats)
            return y, stats
        with no_autocast(x):  # the chunk matmuls stay in x's dtype
            y, mean, var = ChunkedBatchNormFn._forward(ctx, x, weight, bias, chunks, eps, renorm, update, relu)
            stats = torch.stack([mean, var])
            ctx.mark_non_differentiable(stats)
            return y, stats

    @staticmethod
    def _forward(ctx, x, weight, bias, chunks: Chunks, eps: float, renorm, update=None, relu=False):
        ctx.chunks = chunks
        if relu or update is not None:
            raise ValueError("a fused ReLU and in-place running statistics need normbench's fused kernels")
        m_bc, rstd_bc = moments(x)  # (B, C); eps 0, so var = rstd ** -2 exactly
        var_bc = rstd_bc.pow(-2)
        mean = chunks.average @ m_bc  # (K, C)
        var = chunks.average @ (var_bc + (m_bc - chunks.expand @ mean).square_())
        rstd = torch.rsqrt(var + eps)
        if renorm is None:
            r = d = None
            a = weight * rstd  # (K, C)
            b = bias - mean * a
        else:
            run_mean, run_std, r_lim, d_lim = renorm
            r = torch.clamp((var + eps).sqrt_().div_(run_std), min=r_lim.reciprocal(), max=r_lim)
            d = torch.clamp((mean - run_mean).div_(run_std), min=-d_lim, max=d_lim)
            a = weight * r * rstd
            b = bias + weight * (d - r * rstd * mean)
        y = affine_bc(x, chunks.expand @ a, chunks.expand @ b)
        ctx.save_for_backward(x, mean, rstd, a, r, d)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gstats):
        if ctx.native:
            x, stats, y = ctx.saved_tensors
            gx, g_weight, g_bias = native.cbn_backward(gy, x, ctx.chunks.starts, stats, ctx.renorm, y)
            return (gx, g_weight if ctx.needs_input_grad[1] else None, g_bias if ctx.needs_input_grad[2] else None,
                    None, None, None, None, None, None)
        with no_autocast(gy):
            return ChunkedBatchNormFn._backward(ctx, gy) + (None, None, None)

    @staticmethod
    def _backward(ctx, gy):
        chunks = ctx.chunks
        x, mean, rstd, a, r, d = ctx.saved_tensors
        if x.is_contiguous():
            gy = gy.contiguous()
        gi, dot_bc, gsum_bc = affine_bc_backward(gy, x, chunks.expand @ a)  # a g, sum g x, sum g
        sg = chunks.member @ gsum_bc  # (K, C): sum of g over the chunk
        sg_xhat = rstd * (chunks.member @ dot_bc - mean * sg)  # sum of g * x_hat
        n = chunks.count[:, None] * (x.shape[2] * x.shape[3])
        mgx = sg_xhat / n
        k1 = -a * rstd * mgx  # dx = a g + k1 x + k0
        k0 = -a * (sg / n - rstd * mean * mgx)
        gx = affine_bc(x, chunks.expand @ k1, chunks.expand @ k0).add_(gi)
        g_weight = g_bias = None
        if ctx.needs_input_grad[1]:
            g_weight = sg_xhat.sum(0) if r is None else (r * sg_xhat + d * sg).sum(0)
        if ctx.needs_input_grad[2]:
            g_bias = sg.sum(0)
        return gx, g_weight, g_bias, None, None, None


# ----------------------------------------------------------------------------- the layers' calls


def _kernel_updates(layer, x: torch.Tensor) -> bool:
    """Whether the kernel can do a Ghost BN layer's running update of this step (an exponential
    average of buffers it may write)."""
    return (isinstance(layer.momentum, float) and layer.track_running_stats and layer.affine
            and layer._buffers_take(x, layer.running_mean, layer.running_var))


def ghost_batch_norm(layer, x: torch.Tensor, chunks: Chunks) -> torch.Tensor:
    """A GhostBatchNorm2d training step on a batch of several chunks: the output (ReLU applied
    when ``layer.relu``). The running statistics: moved in place by the fused kernel where it
    applies (``per_step`` only), else ``layer.update_running(mean, var, chunks, H * W)`` with
    the chunks' means and biased variances (K, C)."""
    fast = native.applies(x)
    if fast and layer.running_stats == "per_step" and _kernel_updates(layer, x):  # all in the kernel call
        update = ("var", layer.running_mean, layer.running_var, layer.momentum)
        return ChunkedBatchNormFn.apply(x, layer.weight, layer.bias, chunks, layer.eps, None, update, layer.relu,
                                        layer.num_batches_tracked)[0]
    fuse = layer.relu and fast
    y, stats = ChunkedBatchNormFn.apply(x, layer.weight, layer.bias, chunks, layer.eps, None, None, fuse)
    layer.update_running(stats[0], stats[1], chunks, x.shape[2] * x.shape[3])
    return y if fuse else layer.trailing_relu(y)


def batch_renorm(layer, x: torch.Tensor) -> torch.Tensor:
    """A BatchRenorm2d training step: the output (ReLU applied when ``layer.relu``); the moving
    statistics moved in place by the fused kernel where it applies, else by
    ``layer.update_running(mu_B, var_B)`` (biased batch variance).

    ``layer.path`` picks the implementation: ``chunked`` (:class:`ChunkedBatchNormFn`, one
    chunk), ``kernel`` (:func:`renorm_through_bn_kernel`) or ``auto``: measured
    (scripts/bench_norms.py), the fused kernels win at every CPU size; without them the BN
    kernel wins on small CPU batches and on GPUs."""
    fast = native.applies(x)
    path = layer.path
    if path == "auto":
        if fast:
            path = "chunked"
        else:
            path = "kernel" if x.device.type != "cpu" or x.numel() <= KERNEL_PATH_MAX_NUMEL else "chunked"
    if path == "kernel":
        y, mean, var = renorm_through_bn_kernel(layer, x)
        y = layer.trailing_relu(y)
    else:
        chunks = layer.chunks(x)
        renorm = (layer.running_mean, layer.running_std, layer.r_limit, layer.d_limit)
        in_place = fast and layer._buffers_take(x, layer.running_mean, layer.running_std)
        fuse = layer.relu and fast
        update = ("std", layer.running_mean, layer.running_std, layer.momentum) if in_place else None
        y, stats = ChunkedBatchNormFn.apply(x, layer.weight, layer.bias, chunks, layer.eps, renorm, update, fuse,
                                            layer.num_batches_tracked)
        if not fuse:
            y = layer.trailing_relu(y)
        if in_place:  # the kernel has moved the running statistics and counted the step
            return y
        mean, var = stats[0, 0], stats[1, 0]
    layer.update_running(mean, var)
    return y


def renorm_through_bn_kernel(layer, x: torch.Tensor):
    """Batch Renorm through PyTorch's BN kernel: r, d from the batch statistics (no gradient),
    then BN with weight gamma r and bias beta + gamma d, whose autograd gives exactly Batch
    Renorm's stop-gradient backward. Returns (y, mu_B, var_B)."""
    with torch.no_grad():
        m_bc, rstd_bc = moments(x)
        mean = m_bc.mean(0)
        var = (rstd_bc.pow(-2) + (m_bc - mean).square_()).mean(0)
        r = torch.clamp((var + layer.eps).sqrt_().div_(layer.running_std), min=layer.r_limit.reciprocal(),
                        max=layer.r_limit)
        d = torch.clamp((mean - layer.running_mean).div_(layer.running_std), min=-layer.d_limit, max=layer.d_limit)
    y = F.batch_norm(x, None, None, layer.weight * r, torch.addcmul(layer.bias, layer.weight, d), True, 0.0, layer.eps)
    return y, mean, var
