"""Ghost BatchNorm (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better: closing the
generalization gap in large batch training of neural networks", Sec. 4.1, Alg. 1; specified in
docs/methods.md#ghost_bn).

Training: the batch is split into K consecutive chunks ("ghost batches", :func:`ghost_chunk_sizes`)
and each chunk j of n_j samples is batch-normalized on its own, per channel c:

    mu_jc   = mean over (samples of chunk j, H, W) of x
    var_jc  = mean over (samples of chunk j, H, W) of (x - mu_jc)^2     biased
    x_hat   = (x - mu_jc) / sqrt(var_jc + eps)                         for the samples of chunk j
    y       = gamma_c x_hat + beta_c

Running statistics (project choice ``running_stats``), momentum m, s_jc^2 the unbiased variance
of chunk j: ``per_step`` (default) ``run_mean <- (1 - m) run_mean + m sum_j (n_j / B) mu_jc``,
``run_var <- (1 - m) run_var + m sum_j (n_j / B) s_jc^2``; ``per_chunk`` (the authors' code)
one BN update per chunk, in order. Eval is BN with the running statistics.

:func:`ghost_batch_norm_reference` is this as plain PyTorch, one chunk after the other. The layer
computes all chunks at once through ``speed.ghost_batch_norm`` (normbench.norms.speed.chunked).
"""
from __future__ import annotations

import torch

from normbench.errors import UserError
from normbench.norms import speed
from normbench.norms.batch_norm import BatchNorm2d, batch_norm_reference, reject_single_value


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


def ghost_batch_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, sizes: list[int],
                               eps: float):
    """The training output for chunks of ``sizes``, as written above: (y, [mu_j], [unbiased var_j])."""
    outs, means, variances = [], [], []
    for chunk in torch.split(x, sizes):
        y, mu, var = batch_norm_reference(chunk, weight, bias, eps)
        outs.append(y)
        means.append(mu)
        variances.append(var)
    return torch.cat(outs), means, variances


class GhostBatchNorm2d(speed.ChunkedLayer, BatchNorm2d):
    """Ghost BatchNorm (Hoffer, Hubara & Soudry 2017, Alg. 1); see the module docstring.

    A batch of at most ``ghost_batch_size`` samples is plain BN (PyTorch's kernel, bit for
    bit). Otherwise all chunks at once, through ``speed.ghost_batch_norm``. Running statistics
    (momentum m = 0.1): ``per_step`` (default), one update per training step, like BN, from the
    chunks' statistics averaged with weights n_j / B; ``per_chunk``, one BN update per chunk, in
    order, at momentum m each. Eval uses the running statistics exactly like BN (the ghost size
    is never enforced at eval).
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

    def chunk_sizes(self, batch: int) -> list[int]:
        return ghost_chunk_sizes(batch, self.ghost_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch_size:  # one chunk: exactly BatchNorm
            if self.training:
                reject_single_value(x, x.shape[0], self.layer, "Ghost BatchNorm")
            return super().forward(x)
        chunks = self.chunks(x)
        reject_single_value(x, min(chunks.sizes), self.layer, "Ghost BatchNorm")
        return speed.ghost_batch_norm(self, x, chunks)  # calls update_running unless the kernel did

    @torch.no_grad()
    def update_running(self, mean: torch.Tensor, var: torch.Tensor, chunks: speed.Chunks, hw: int) -> None:
        """This step's running update from the chunks' means and biased variances (K, C)."""
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
