"""The loss-landscape probes (Santurkar et al. 2018, Sec. 3.1): along the gradient from the
current parameters, how fast the loss and its gradient change. See docs/methods.md#probe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normbench.analysis.common import preserved_rng, twin_of, unwrap

PROBE_TAGS = ("probe/loss_range", "probe/grad_pred", "probe/beta", "probe/loss_min", "probe/loss_max",
              "probe/grad_pred_min")


# ----------------------------------------------------------------------------- helpers



def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """||concat(tensors)||_2 as a 0-d tensor on their device (one fused kernel where possible)."""
    tensors = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]
    try:
        norms = torch._foreach_norm(tensors)  # what clip_grad_norm_ uses; one launch per dtype/device
    except (AttributeError, RuntimeError):
        norms = [torch.linalg.vector_norm(t) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(list(norms)))


# ----------------------------------------------------------------------------- 1. landscape probe


@dataclass
class ProbeResult:
    """Losses at s = 0 and each multiplier, and per multiplier ||g_s - g|| and the ratio to
    ||theta_s - theta||; all 0-d / 1-d tensors on the parameters' device (no host sync)."""

    losses: torch.Tensor  # (1 + m,): s = 0 first
    grad_dists: torch.Tensor  # (m,)
    betas: torch.Tensor  # (m,)

    @property
    def loss_range(self) -> torch.Tensor:
        return self.losses.max() - self.losses.min()

    @property
    def grad_pred(self) -> torch.Tensor:
        return self.grad_dists.max()

    @property
    def beta(self) -> torch.Tensor:
        return self.betas.max()

    def vector(self) -> torch.Tensor:
        """The logged values in the order of :data:`PROBE_TAGS`."""
        return torch.stack([self.loss_range, self.grad_pred, self.beta, self.losses.min(),
                            self.losses.max(), self.grad_dists.min()]).float()


def _gradient_change(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                     theta0: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], t: float,
                     g: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Set ``params`` to theta0 - t * direction; return the loss there and ||grad there - g||_2
    (global over all parameters; the parameters are left moved: the caller restores them)."""
    with torch.no_grad():
        for p, p0, di in zip(params, theta0, direction):
            torch.add(p0, di, alpha=-t, out=p)
    loss = loss_fn()
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    diffs = torch._foreach_sub([(gsi if gsi is not None else torch.zeros_like(gi)) for gsi, gi in zip(gs, g)], g)
    return loss, _global_norm(diffs)


def landscape_probe(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], lr: float,
                    multipliers: Iterable[float], grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    loss0: Optional[torch.Tensor] = None) -> ProbeResult:
    """Loss and gradient along the gradient direction (Santurkar et al. 2018, App. A.2.2).

    ``loss_fn()`` computes the loss from the current values of ``params`` (leaf tensors with
    ``requires_grad``). With g the gradient at the starting point theta (``grads``, or computed
    here when None) and t = ``lr`` * s for each s in ``multipliers``, the parameters are set
    to theta - t g, the loss L_s and gradient g_s are computed with ``torch.autograd.grad``
    (never ``.backward``: no ``.grad`` is touched), and in the end every parameter is copied
    back from a saved clone (bit-exact). Returns L_0 (``loss0`` or computed) and L_s, the
    distances ||g_s - g||_2 (global over all parameters: "gradient predictiveness") and
    ||g_s - g|| / (t ||g||) (the "effective beta-smoothness" along g). For a quadratic
    L = 1/2 theta^T H theta + b^T theta: L_s = L_0 - t ||g||^2 + t^2/2 g^T H g,
    ||g_s - g|| = t ||H g|| and the ratio is ||H g|| / ||g|| for every s (equal to the
    curvature g^T H g / ||g||^2 when g is an eigenvector of H).
    """
    params = list(params)
    with torch.no_grad():
        theta0 = [p.detach().clone() for p in params]
    if grads is None:
        start = loss_fn()
        grads = torch.autograd.grad(start, params, allow_unused=True)
        loss0 = start if loss0 is None else loss0
    elif loss0 is None:
        with torch.no_grad():
            loss0 = loss_fn()
    g = [(gi.detach() if gi is not None else torch.zeros_like(p)) for gi, p in zip(grads, params)]
    g_norm = _global_norm(g)
    dtype = torch.promote_types(loss0.dtype, torch.float32)
    losses, dists, betas = [loss0.detach().to(dtype).reshape(())], [], []
    try:
        for s in multipliers:
            t = float(lr) * float(s)
            loss, dist = _gradient_change(loss_fn, params, theta0, g, t, g)
            step = g_norm * t
            losses.append(loss.detach().to(dtype).reshape(()))
            dists.append(dist)
            betas.append(torch.where(step > 0, dist / step.clamp_min(torch.finfo(torch.float32).tiny),
                                     torch.zeros_like(dist)))
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, theta0):
                p.copy_(p0)
    return ProbeResult(torch.stack(losses), torch.stack(dists), torch.stack(betas))


def snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Clones of every buffer of the (unwrapped) model, in ``.buffers()`` order."""
    with torch.no_grad():
        return [b.detach().clone() for b in unwrap(model).buffers()]


def probe_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, multipliers: Iterable[float],
                loss: Optional[torch.Tensor] = None, device: Optional[torch.device] = None,
                use_model_grads: bool = True, autocast: Optional[Callable] = None,
                buffers: Optional[Sequence[torch.Tensor]] = None) -> ProbeResult:
    """The landscape probe of a classifier on batch (x, y), run on a deep copy in train mode.

    g is the model's current ``.grad`` (the training step's, before clipping) and ``loss`` the
    step's loss (L_0); with ``use_model_grads=False`` both are recomputed on the copy (under
    data-parallel training ``.grad`` is already averaged over processes, while the probe's
    losses are this process's batch). ``autocast``: the training step's autocast context
    factory, so that L_s is computed at the precision L_0 was. The model itself, its buffers,
    its ``.grad`` and the RNG are untouched.

    ``buffers``: the model's buffers as they were before the step's forward
    (:func:`snapshot_buffers`); the copy is reset to them before every forward. This matters
    for layers whose train-mode output reads their running statistics (Batch Renorm's r and
    d): g was computed with the pre-step statistics, and without the reset each L_s would see
    statistics moved by the step's own forward and by every earlier probe forward, a change
    that does not shrink with the step, so ||g_s - g|| / ||theta_s - theta|| grows like 1/lr.
    """
    base = unwrap(model)
    with preserved_rng(device), torch.enable_grad():
        twin = twin_of(base)
        pairs = [(q, p) for q, p in zip(twin.parameters(), base.parameters()) if p.requires_grad]
        params = [q for q, _ in pairs]
        grads = [p.grad for _, p in pairs] if use_model_grads else None
        twin_buffers = list(twin.buffers())
        if buffers is not None and len(buffers) != len(twin_buffers):
            raise ValueError(f"probe_model: {len(buffers)} saved buffers for a model with {len(twin_buffers)}")

        def loss_fn() -> torch.Tensor:
            if buffers is not None:
                with torch.no_grad():
                    for b, saved in zip(twin_buffers, buffers):
                        b.copy_(saved)
            if autocast is None:
                return F.cross_entropy(twin(x), y)
            with autocast():
                out = twin(x).float()
            return F.cross_entropy(out, y)

        loss0 = loss.detach() if (loss is not None and use_model_grads) else None
        return landscape_probe(loss_fn, params, lr, multipliers, grads=grads, loss0=loss0)


# ----------------------------------------------------------------------------- 1b. fixed probe


@dataclass
class FixedProbeResult:
    """The fixed-distance probe (:func:`fixed_probe`): at each distance t (ascending), the loss
    L(theta - t d) and ||g(theta - t d) - g(theta)||, d = g / ||g||; 0-d / 1-d tensors on the
    parameters' device (no host sync)."""

    distances: torch.Tensor  # (m,) ascending
    losses: torch.Tensor  # (1 + m,): t = 0 first
    grad_dists: torch.Tensor  # (m,)
    grad_norm: torch.Tensor  # ||g(theta)||

    @property
    def beta(self) -> torch.Tensor:
        """Least-squares slope through the origin of ||Delta g|| against t: sum t ||Delta g|| / sum t^2."""
        t = self.distances.to(self.grad_dists.dtype)
        return (t * self.grad_dists).sum() / (t * t).sum()

    @property
    def linearity(self) -> torch.Tensor:
        """(||Delta g|| / t at the largest t) / (the same at the smallest t): 1 where the gradient
        changes linearly with the distance (a quadratic); below 1 where it flattens, above 1 where
        curvature grows along the direction or float32 rounding dominates the smallest t."""
        t = self.distances.to(self.grad_dists.dtype)
        return (self.grad_dists[-1] / t[-1]) / (self.grad_dists[0] / t[0])

    def vector(self) -> torch.Tensor:
        """The logged values in the order of :func:`fixed_probe_tags`: the six quantities of
        :data:`PROBE_TAGS` (beta the slope), then linearity, ||g||, every loss, every ||Delta g||."""
        base = torch.stack([self.losses.max() - self.losses.min(), self.grad_dists.max(), self.beta,
                            self.losses.min(), self.losses.max(), self.grad_dists.min(), self.linearity,
                            self.grad_norm.to(self.losses.dtype)])
        return torch.cat([base, self.losses, self.grad_dists.to(self.losses.dtype)]).float()


def fixed_probe_tags(distances: Sequence[float]) -> list[str]:
    """Metric names of :meth:`FixedProbeResult.vector` for ascending ``distances``."""
    ts = sorted(float(t) for t in distances)
    return [*PROBE_TAGS, "probe/linearity", "probe/grad_norm", "probe/loss_t0",
            *(f"probe/loss_t{t:g}" for t in ts), *(f"probe/grad_change_t{t:g}" for t in ts)]


def fixed_probe(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                distances: Iterable[float]) -> FixedProbeResult:
    """The loss landscape around theta at fixed distances along the normalized gradient.

    A variant of the probe of Santurkar, Tsipras, Ilyas & Madry 2018 (App. A.2.2, Fig. 4:
    loss and gradient along the gradient direction) that keeps the step size out of the
    result: with g = grad L(theta) (computed here) and d = g / ||g||_2 (global over all
    ``params``), the parameters are set to theta - t d for each t in ``distances``, absolute
    lengths in parameter space, and L_t, g_t = grad L(theta - t d) are computed with
    ``torch.autograd.grad`` (no ``.grad`` is touched); the parameters are copied back from a
    saved clone (bit-exact). Their "effective beta-smoothness" ||g_t - g|| / ||theta_t - theta||
    (Fig. 4c), summarised over all t, is the least-squares slope through the origin of
    ||g_t - g|| against t (:attr:`FixedProbeResult.beta`). For a
    quadratic L = 1/2 theta^T H theta + b^T theta: g_t - g = -t H d, so ||g_t - g|| = t ||Hg|| / ||g||
    at every t and beta = ||Hg|| / ||g||; L_t = L_0 - t ||g|| + t^2/2 d^T H d.
    """
    params = list(params)
    ts = sorted(float(t) for t in distances)
    with torch.no_grad():
        theta0 = [p.detach().clone() for p in params]
    start = loss_fn()
    grads = torch.autograd.grad(start, params, allow_unused=True)
    g = [(gi.detach() if gi is not None else torch.zeros_like(p)) for gi, p in zip(grads, params)]
    g_norm = _global_norm(g)
    dtype = torch.promote_types(start.dtype, torch.float32)
    losses, dists = [start.detach().to(dtype).reshape(())], []
    try:
        with torch.no_grad():
            d = [gi / g_norm.to(gi.dtype) for gi in g]  # nan when g = 0: the probe is then undefined
        for t in ts:
            loss, dist = _gradient_change(loss_fn, params, theta0, d, t, g)
            losses.append(loss.detach().to(dtype).reshape(()))
            dists.append(dist)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, theta0):
                p.copy_(p0)
    return FixedProbeResult(torch.tensor(ts, dtype=dtype, device=losses[0].device), torch.stack(losses),
                            torch.stack(dists), g_norm)


def probe_model_fixed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, distances: Iterable[float],
                      device: Optional[torch.device] = None) -> FixedProbeResult:
    """:func:`fixed_probe` of a classifier's cross-entropy on the batch (x, y), on a deep copy
    in train mode (BN-like layers normalize with the statistics of (x, y) itself), without
    autocast (the model's own precision, float32, also in a bf16 run).

    The copy is reset to the model's current buffers before every forward, so each loss is
    the same function of the parameters (Batch Renorm's train-mode output reads its running
    statistics, which every train-mode forward moves). The model, its buffers, its ``.grad``
    and the RNG are untouched, and nothing here depends on the run's LR, batch or step."""
    base = unwrap(model)
    with preserved_rng(device), torch.enable_grad():
        twin = twin_of(base)
        params = [q for q, p in zip(twin.parameters(), base.parameters()) if p.requires_grad]
        twin_buffers = list(twin.buffers())
        saved = snapshot_buffers(twin)

        def loss_fn() -> torch.Tensor:
            with torch.no_grad():
                for b, s in zip(twin_buffers, saved):
                    b.copy_(s)
            return F.cross_entropy(twin(x).float(), y)

        return fixed_probe(loss_fn, params, distances)


def probe_batch(data, normalize, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed probe's batch: the first K test images (no augmentation, normalized as the
    training inputs) and their labels; the same for every run on the same data."""
    k = min(k, len(data.test_y))
    return normalize(data.test_x[:k]), data.test_y[:k]


def probe_schedule(total_steps: int, count: int) -> list[int]:
    """``count`` probe points spread evenly over a run of ``total_steps`` steps: the parameters
    after round(i T / (count - 1)) steps, i = 0 .. count - 1 (the initial and the final ones
    included; only the final ones for count = 1; fewer when T < count - 1)."""
    if count <= 1:
        return [total_steps]
    n = count - 1
    return sorted({(2 * i * total_steps + n) // (2 * n) for i in range(count)})


# ----------------------------------------------------------------------------- 2. train/eval gap


