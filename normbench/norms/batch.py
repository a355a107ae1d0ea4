"""Batch-statistics normalizers: statistics mix the samples of a batch.

BatchNorm is PyTorch's kernel. Ghost BatchNorm and Batch Renormalization share one custom
autograd Function, :class:`ChunkedBatchNormFn`: BatchNorm statistics computed separately for
each chunk of consecutive samples (all chunks at once, no Python loop over chunks), with an
optional stop-gradient correction ``x_hat * r + d`` per channel (Batch Renorm). Its backward
is written by hand (checked by gradcheck in tests/test_norms.py) because autograd through
``var_mean`` is ~10x slower than PyTorch's GroupNorm on CPU.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import UserError
from normbench.norms import native
from normbench.norms.functional import TrailingReLU, affine_bc, affine_bc_backward, moments


def reject_single_value(x: torch.Tensor, per_stat_samples: int, layer: str, what: str = "BatchNorm") -> None:
    """UserError when a batch statistic would be computed from one value per channel."""
    if per_stat_samples * x.shape[2] * x.shape[3] == 1:
        raise UserError(f"{what} at layer {layer} sees one value per channel "
                        f"(batch {x.shape[0]} on {x.shape[2]}x{x.shape[3]} maps): its variance is undefined; "
                        "use a larger batch or a per-sample norm (gn, ln, frn)")


class _ChunkedLayer:
    """Per-step caches of the layers that run ChunkedBatchNormFn: the chunk layout for a batch
    (``_chunk_sizes`` says how a batch splits), and whether the fused kernels may update the
    running statistics in place (buffers of x's dtype, contiguous, one value per channel)."""

    def _chunk_sizes(self, batch: int) -> list[int]:
        raise NotImplementedError

    def _chunks(self, x: torch.Tensor) -> "_Chunks":
        cache = self.__dict__.setdefault("_chunks_cache", {})
        key = (x.shape[0], x.device, x.dtype)
        chunks = cache.get(key)
        if chunks is None:
            chunks = cache[key] = _Chunks(self._chunk_sizes(x.shape[0]), x.device, x.dtype)
        return chunks

    def _buffers_take(self, x: torch.Tensor, *buffers: torch.Tensor) -> bool:
        key = (x.dtype, x.shape[1]) + tuple(b.data_ptr() for b in buffers)
        if getattr(self, "_buffers_key", None) != key:
            self._buffers_key = key
            self._buffers_ok = all(native.can_update_in_place(b, x) for b in buffers)
        return self._buffers_ok


class BatchNorm2d(TrailingReLU, nn.BatchNorm2d):
    """BatchNorm (Ioffe & Szegedy 2015, Alg. 1).

    Training: x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps) with mu_B, sigma_B^2 over (B, H, W)
    per channel; y = gamma * x_hat + beta. Running mean/var (momentum 0.1, unbiased
    variance) replace the batch statistics in eval. ``relu=True``: the ReLU that follows,
    applied by the layer (in place). PyTorch's kernel does the maths: the fused kernel of
    :class:`ChunkedBatchNormFn` with one chunk (ReLU and running update included) was measured
    no faster for a whole ResNet-20 training step on CPU (step-time ratio 0.88 at batch 2,
    0.96-1.02 at 8-128). The one undefined case (one value per channel: B = 1 on
    1x1 maps) is an error that names the layer.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, layer: str = "?",
                 relu: bool = False):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.layer = layer
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            reject_single_value(x, x.shape[0], self.layer)
        return self._act(super().forward(x))  # PyTorch's kernel: the fused one was no faster for a whole step


# ----------------------------------------------------------------------------- chunked BN


def ghost_chunk_sizes(batch: int, ghost: int) -> list[int]:
    """Sizes of the ghost batches of a batch of ``batch`` samples (project choice).

    Consecutive chunks of ``ghost`` samples; a remainder of r >= 2 samples is its own last
    chunk; a remainder of exactly 1 sample folds into the previous chunk (which then has
    ghost + 1 samples). A batch of at most ``ghost`` samples is one chunk (= BatchNorm).
    Examples: (10, 4) -> [4, 4, 2]; (9, 4) -> [4, 5]; (4, 4) -> [4]; (3, 4) -> [3].
    """
    if batch <= ghost:
        return [batch]
    full, rest = divmod(batch, ghost)
    sizes = [ghost] * full
    if rest == 1:
        sizes[-1] += 1
    elif rest > 1:
        sizes.append(rest)
    return sizes


class _Chunks:
    """Chunk bookkeeping for a batch split into consecutive chunks: (K, B) matrices."""

    def __init__(self, sizes: list[int], device, dtype):
        k, b = len(sizes), sum(sizes)
        member = torch.zeros(k, b, dtype=dtype)
        start = 0
        for j, n in enumerate(sizes):
            member[j, start:start + n] = 1.0
            start += n
        self.sizes = sizes
        self.member = member.to(device)  # (K, B) 0/1
        self.count = torch.tensor(sizes, dtype=dtype).to(device)  # (K,)
        self.average = self.member / self.count[:, None]  # (K, B) rows sum to 1
        self.expand = self.member.t().contiguous()  # (B, K): chunk value -> each sample
        self.starts = native.chunk_starts(sizes)  # (K + 1,) int64 offsets, for the fused kernels


def _no_autocast(x: torch.Tensor):
    """A context with autocast off for x's device (a no-op context when it is not on: entering
    torch.autocast costs ~10 us, which shows at batch 2)."""
    if torch.is_autocast_enabled(x.device.type):
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
    applied to the gradient in backward); both need the fused kernels (normbench.norms.native).

    Backward (per chunk and channel, N = n_j H W, a = gamma r / sqrt(var_j + eps)):
    dx = a (g - mean(g) - x_hat mean(g x_hat)), dgamma = sum g (r x_hat + d), dbeta = sum g.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chunks: _Chunks, eps: float, renorm, update=None, relu=False,
                counter=None):
        ctx.native = native.applies(x)
        if ctx.native:  # fused kernels, one call each way
            ctx.chunks, ctx.renorm = chunks, renorm is not None
            y, stats = native.cbn_forward(x, weight, bias, chunks.starts, eps, renorm, update, relu, counter)
            ctx.save_for_backward(x, stats, y if relu else None)
            ctx.mark_non_differentiable(stats)
            return y, stats
        with _no_autocast(x):  # the chunk matmuls stay in x's dtype
            y, mean, var = ChunkedBatchNormFn._forward(ctx, x, weight, bias, chunks, eps, renorm, update, relu)
            stats = torch.stack([mean, var])
            ctx.mark_non_differentiable(stats)
            return y, stats

    @staticmethod
    def _forward(ctx, x, weight, bias, chunks: _Chunks, eps: float, renorm, update=None, relu=False):
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
        with _no_autocast(gy):
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


class GhostBatchNorm2d(_ChunkedLayer, BatchNorm2d):
    """Ghost BatchNorm (Hoffer, Hubara & Soudry 2017, Sec. 4.1, Alg. 1).

    Training: the batch is split into consecutive chunks ("ghost batches") of
    ``ghost_batch_size`` samples (:func:`ghost_chunk_sizes`: a remainder of 1 folds into the
    previous chunk, project choice) and each chunk j is batch-normalized with its own
    statistics over (b_j, H, W) per channel: x_hat = (x - mu_j) / sqrt(sigma_j^2 + eps),
    y = gamma x_hat + beta. A batch of at most ``ghost_batch_size`` samples is plain BN
    (PyTorch's kernel, bit for bit). Otherwise all chunks are computed at once by
    :class:`ChunkedBatchNormFn` (no Python loop over chunks).

    Running statistics (momentum m = 0.1), project choice ``per_step`` (default): one update
    per training step, like BN, from the chunks' statistics averaged with weights n_j / B:
    mean <- (1 - m) mean + m sum_j (n_j/B) mu_j, var <- (1 - m) var + m sum_j (n_j/B)
    s_j^2 with s_j^2 the unbiased chunk variance. ``per_chunk`` (the authors' code): one BN
    update per chunk, in order, at momentum m each. Eval uses the running statistics
    exactly like BN (the ghost size is never enforced at eval).
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, ghost_batch_size: int = 16,
                 running_stats: str = "per_step", layer: str = "?", relu: bool = False):
        super().__init__(channels, eps=eps, momentum=momentum, layer=layer, relu=relu)
        if running_stats not in ("per_step", "per_chunk"):
            raise UserError(f"norm.running_stats: got {running_stats!r}; allowed: per_step, per_chunk")
        self.ghost_batch_size = int(ghost_batch_size)
        self.running_stats = running_stats
        self.layer = layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}, running_stats={self.running_stats}"

    def _chunk_sizes(self, batch: int) -> list[int]:
        return ghost_chunk_sizes(batch, self.ghost_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch_size:  # one chunk: exactly BatchNorm
            if self.training:
                reject_single_value(x, x.shape[0], self.layer, "Ghost BatchNorm")
            return super().forward(x)
        chunks = self._chunks(x)
        reject_single_value(x, min(chunks.sizes), self.layer, "Ghost BatchNorm")
        fast = native.applies(x)
        if fast and self.running_stats == "per_step" and self._kernel_updates(x):  # all in the kernel call
            update = ("var", self.running_mean, self.running_var, self.momentum)
            return ChunkedBatchNormFn.apply(x, self.weight, self.bias, chunks, self.eps, None, update, self.relu,
                                            self.num_batches_tracked)[0]
        fuse = self.relu and fast
        y, stats = ChunkedBatchNormFn.apply(x, self.weight, self.bias, chunks, self.eps, None, None, fuse)
        self._update_running(stats[0], stats[1], chunks, x.shape[2] * x.shape[3])
        return y if fuse else self._act(y)

    def _kernel_updates(self, x: torch.Tensor) -> bool:
        """Whether the kernel can do this step's running update (an exponential average of
        buffers it may write)."""
        return (isinstance(self.momentum, float) and self.track_running_stats and self.affine
                and self._buffers_take(x, self.running_mean, self.running_var))

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, chunks: _Chunks, hw: int) -> None:
        n = chunks.count[:, None] * hw
        unbiased = var * n / (n - 1)
        m = self.momentum
        k = len(chunks.sizes)
        if self.running_stats == "per_step" or k == 1:
            w = chunks.count / chunks.count.sum()
            self.running_mean.lerp_((w @ mean).to(self.running_mean.dtype), m)
            self.running_var.lerp_((w @ unbiased).to(self.running_var.dtype), m)
            self.num_batches_tracked.add_(1)
        else:  # K sequential BN updates: x_K = (1-m)^K x_0 + sum_j m (1-m)^(K-1-j) stat_j
            coef = m * (1 - m) ** torch.arange(k - 1, -1, -1, dtype=mean.dtype, device=mean.device)
            keep = (1 - m) ** k
            self.running_mean.mul_(keep).add_((coef @ mean).to(self.running_mean.dtype))
            self.running_var.mul_(keep).add_((coef @ unbiased).to(self.running_var.dtype))
            self.num_batches_tracked.add_(k)


KERNEL_PATH_MAX_NUMEL = 1 << 17  # Batch Renorm: PyTorch's BN kernel up to this many elements (CPU)


def _ramp(progress: float, start: float, end: float) -> float:
    """0 until ``start``, then linear to 1 at ``end`` (a step to 1 at ``start`` if end <= start)."""
    if end <= start:
        return 1.0 if progress >= start else 0.0
    return min(1.0, max(0.0, (progress - start) / (end - start)))


class BatchRenorm2d(_ChunkedLayer, TrailingReLU, nn.Module):
    """Batch Renormalization (Ioffe 2017, Alg. 1).

    Training: mu_B, sigma_B = sqrt(var_B + eps) over (B, H, W) per channel (biased var);
    r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max)
    with mu, sigma the moving mean and std from BEFORE this step's update, both treated as
    constants in backward (stop-gradient); x_hat = (x - mu_B) / sigma_B * r + d; y = gamma
    x_hat + beta; then mu += rate (mu_B - mu), sigma += rate (sigma_B - sigma), rate
    ``renorm_momentum`` (0.01 in the paper). Eval: y = gamma (x - mu) / sigma + beta.

    Schedule (the paper's, in epochs; driven by ``set_progress(epoch)``, which the engine
    calls every step): r_max = 1, d_max = 0 (plain BatchNorm) until ``warmup_epochs``, then
    linear rises to ``r_max`` (reached at ``r_max_epochs``) and ``d_max`` (at
    ``d_max_epochs``). The limits in force live in buffers, so a checkpoint restores them.
    With r_max = 1, d_max = 0 this is exactly BatchNorm in training.

    Two implementations of the same maths (``path``): ``chunked`` (:class:`ChunkedBatchNormFn`,
    hand-written backward, fastest for large CPU batches) and ``kernel`` (PyTorch's BN kernel
    with weight gamma r and bias beta + gamma d, r and d computed without gradient: fastest
    for small CPU batches, where per-op overhead dominates, and on GPUs); ``auto`` picks by
    size and device.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.01, r_max: float = 3.0,
                 d_max: float = 5.0, warmup_epochs: float = 0.0, r_max_epochs: float = 0.0,
                 d_max_epochs: float = 0.0, layer: str = "?", relu: bool = False):
        super().__init__()
        self.relu = relu  # the ReLU that follows, fused into the chunked kernels (applied after otherwise)
        self.num_features, self.eps, self.momentum, self.layer = channels, eps, momentum, layer
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_epochs, self.r_max_epochs, self.d_max_epochs = warmup_epochs, r_max_epochs, d_max_epochs
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_std", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("r_limit", torch.tensor(1.0))
        self.register_buffer("d_limit", torch.tensor(0.0))
        self.path = "auto"  # "kernel" | "chunked" | "auto" (by size and device; both are tested)
        self.set_progress(0.0)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}")

    def limits_at(self, epoch: float) -> tuple[float, float]:
        """(r_max, d_max) in force at fractional epoch ``epoch``."""
        r = 1.0 + (self.r_max - 1.0) * _ramp(epoch, self.warmup_epochs, self.r_max_epochs)
        d = self.d_max * _ramp(epoch, self.warmup_epochs, self.d_max_epochs)
        return r, d

    def set_progress(self, epoch: float) -> None:
        r, d = self.limits_at(float(epoch))
        self.r_limit.fill_(r)
        self.d_limit.fill_(d)

    def _chunk_sizes(self, batch: int) -> list[int]:
        return [batch]  # one chunk: the whole batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._act(F.batch_norm(x, self.running_mean, self.running_std.square(), self.weight, self.bias,
                                          False, 0.0, 0.0))
        reject_single_value(x, x.shape[0], self.layer, "Batch Renorm")
        fast = native.applies(x)
        path = self.path
        if path == "auto":  # measured (scripts/bench_norms.py): the fused kernels win at every CPU size;
            # without them the BN kernel wins on small CPU batches and on GPUs
            if fast:
                path = "chunked"
            else:
                path = "kernel" if x.device.type != "cpu" or x.numel() <= KERNEL_PATH_MAX_NUMEL else "chunked"
        if path == "kernel":
            y, mean, var = self._forward_kernel(x)
            y = self._act(y)
        else:
            chunks = self._chunks(x)
            renorm = (self.running_mean, self.running_std, self.r_limit, self.d_limit)
            in_place = fast and self._buffers_take(x, self.running_mean, self.running_std)
            fuse = self.relu and fast
            update = ("std", self.running_mean, self.running_std, self.momentum) if in_place else None
            y, stats = ChunkedBatchNormFn.apply(x, self.weight, self.bias, chunks, self.eps, renorm, update, fuse,
                                                self.num_batches_tracked)
            if not fuse:
                y = self._act(y)
            if in_place:  # the kernel has moved the running statistics and counted the step
                return y
            mean, var = stats[0, 0], stats[1, 0]
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_std.lerp_((var + self.eps).sqrt().to(self.running_std.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return y

    def _forward_kernel(self, x: torch.Tensor):
        """The same maths through PyTorch's BN kernel: r, d from the batch statistics (no
        gradient), then BN with weight gamma r and bias beta + gamma d, whose autograd gives
        exactly Batch Renorm's stop-gradient backward."""
        with torch.no_grad():
            m_bc, rstd_bc = moments(x)
            mean = m_bc.mean(0)
            var = (rstd_bc.pow(-2) + (m_bc - mean).square_()).mean(0)
            r = torch.clamp((var + self.eps).sqrt_().div_(self.running_std), min=self.r_limit.reciprocal(),
                            max=self.r_limit)
            d = torch.clamp((mean - self.running_mean).div_(self.running_std), min=-self.d_limit, max=self.d_limit)
        y = F.batch_norm(x, None, None, self.weight * r, torch.addcmul(self.bias, self.weight, d), True, 0.0, self.eps)
        return y, mean, var
