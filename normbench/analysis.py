"""Measurements inside a run: loss smoothness, BN's train/eval gap, dead units.

Four measurements, each opt-in from ``analysis.*`` (see README, "Analysis"):

1. **Loss-landscape probe** (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch
   Normalization Help Optimization?", Sec. 3.1 and Appendix A.2.2, Fig. 4). Every
   ``analysis.probe_every`` steps, from the current parameters theta and the current gradient
   g (``.grad`` after backward, before clipping), evaluate loss and gradient at
   theta - eta * s * g for each multiplier s (eta = the current learning rate), on the same
   batch, without changing anything the training step uses. Logged: ``probe/loss_range``
   (max - min loss along the direction, s = 0 included), ``probe/loss_min`` /
   ``probe/loss_max`` (the band of Fig. 4a), ``probe/grad_pred`` (largest ||g_s - g||,
   "gradient predictiveness", Fig. 4b; ``probe/grad_pred_min`` the band's lower edge) and
   ``probe/beta`` (largest ||g_s - g|| / ||theta_s - theta||, the "effective beta-smoothness"
   of Fig. 4c). :func:`landscape_probe` is the maths on any (loss_fn, params).
   ``analysis.probe_mode: fixed`` measures the landscape without the step: ``probes_per_run``
   times over the run, on one held-out batch (the first ``probe_images`` test images), along
   the normalized gradient of that batch's loss, at the absolute distances ``probe_distances``;
   beta is the least-squares slope of ||g_t - g|| against t (:func:`fixed_probe`), the same
   measurement at every batch size and LR.
2. **Train/eval gap** for batch-statistics schemes: test accuracy in eval mode (running
   statistics), in train mode at the run's batch size (each test batch's own statistics), and
   after recomputing the running statistics with the model frozen (:func:`precise_bn`,
   "precise BN"; at the end of the run with ``analysis.precise_bn``, or afterwards with
   ``normbench analyze --recalibrate``).
3. **Dead units**: per activation layer, the fraction of channels whose output sits at the
   activation's floor (0 for ReLU, tau for TLU) for every sample of a fixed probe batch.
4. **Activation statistics**: per-channel mean and std of every norm layer's input (the
   "internal covariate shift" view, Santurkar et al. Sec. 2), as TensorBoard histograms.

Nothing here changes the training trajectory: every extra forward runs on a deep copy of the
model (so parameters, ``.grad``, running statistics, ``num_batches_tracked`` and any other
buffer or attribute of the trained model are untouched) and the RNG states are restored
around it. Probe values and histograms stay on the device until the epoch ends (one host
read per epoch); they travel in the checkpoint so an interrupted run resumes with them.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROBE_TAGS = ("probe/loss_range", "probe/grad_pred", "probe/beta", "probe/loss_min", "probe/loss_max",
              "probe/grad_pred_min")


# ----------------------------------------------------------------------------- helpers


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper (parameters are shared)."""
    return getattr(model, "_orig_mod", model)


@contextmanager
def preserved_rng(device: Optional[torch.device] = None):
    """Restore the CPU (and the device's) RNG state on exit: extra forwards draw nothing."""
    cpu = torch.get_rng_state()
    dev = None
    if device is not None and device.type == "cuda":
        dev = torch.cuda.get_rng_state(device)
    elif device is not None and device.type == "mps":
        dev = torch.mps.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if dev is not None and device.type == "cuda":
            torch.cuda.set_rng_state(dev, device)
        elif dev is not None:
            torch.mps.set_rng_state(dev)


def twin_of(model: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) model, in train mode, without gradients, whose
    SyncBatchNorm layers are plain BatchNorm (:func:`local_statistics`)."""
    twin = copy.deepcopy(unwrap(model))
    for p in twin.parameters():
        p.grad = None
    return local_statistics(twin).train()


def local_statistics(model: nn.Module) -> nn.Module:
    """Turn every SyncBatchNorm layer of ``model`` into plain BatchNorm, in place.

    Every measurement runs on one process (rank 0 under torchrun) while the other ranks go
    on or have already left: a train-mode forward through SyncBatchNorm would all-reduce with
    whatever collective another rank is in, or wait for a rank that has exited. On the copy
    each layer keeps its parameters and running statistics and normalizes a train-mode batch
    with this process's own statistics: train mode "at the per-process batch". SyncBatchNorm2d
    adds no state to BatchNorm2d, so changing the class is exact."""
    from normbench.norms.batch import BatchNorm2d
    from normbench.norms.sync import SyncBatchNorm2d

    for m in model.modules():
        if isinstance(m, SyncBatchNorm2d):
            m.__class__ = BatchNorm2d
    return model


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


def running_stat_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that keep running statistics: floating buffers named ``running_*`` (the
    PyTorch convention; every BN-like layer in normbench.norms follows it)."""
    out = []
    for m in model.modules():
        names = [n for n, b in m.named_buffers(recurse=False) if n.startswith("running") and b.is_floating_point()]
        if names:
            out.append(m)
    return out


def _momentum_attrs(m: nn.Module) -> list[str]:
    """The attribute holding a stat layer's averaging rate (normbench's layers: ``momentum``)."""
    return [a for a in ("momentum",) if isinstance(getattr(m, a, None), (int, float))]


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[nn.Module, int]:
    """"Precise BN": a copy of ``model`` whose running statistics are the equal-weight average,
    over ``batches`` (normalized inputs), of the batch statistics its layers compute in train
    mode with the weights frozen (no gradients). Returns (copy, number of batches used).

    This is PyTorch's cumulative average (``momentum=None`` after a reset), done through each
    layer's own update rule so that every layer with ``running_*`` buffers and an exponential
    average at rate ``momentum`` is recalibrated (BN, Ghost BN, Batch Renorm): before batch k
    (0-based) the rate is set to 1 / (k + 1), so after it the buffers hold the mean of the
    statistics of batches 0..k (the first batch overwrites the old values: no reset needed).
    Batch Renorm's r, d during the pass are taken against this running average. The rates are
    restored afterwards; ``num_batches_tracked`` advances on the copy only.
    """
    twin = twin_of(model)
    layers = [(m, _momentum_attrs(m)) for m in running_stat_layers(twin)]
    layers = [(m, attrs) for m, attrs in layers if attrs]
    if not layers:
        return twin.eval(), 0
    saved = [{a: getattr(m, a) for a in attrs} for m, attrs in layers]
    count = 0
    try:
        for x in batches:
            for m, attrs in layers:
                for a in attrs:
                    setattr(m, a, 1.0 / (count + 1))
            twin(x)
            count += 1
    finally:
        for (m, _), rates in zip(layers, saved):
            for a, v in rates.items():
                setattr(m, a, v)
    return twin.eval(), count


def accuracy(model: nn.Module, data, normalize, batch_size: int, train_mode: bool) -> float:
    """Test accuracy through ``engine.evaluate`` on a deep copy of the model (so even
    ``num_batches_tracked``, which ``evaluate(train_mode=True)`` advances, is untouched)."""
    from normbench.engine import evaluate

    twin = twin_of(model)
    return evaluate(twin, data, normalize, batch_size, train_mode=train_mode)["acc"]


def train_eval_gap(model: nn.Module, data, normalize, batch_size: int, eval_batch_size: int,
                   eval_acc: Optional[float] = None) -> dict:
    """Test accuracy with running statistics (eval mode) and with each test batch's own
    statistics at the run's ``batch_size`` (train mode); gap = train-mode - eval-mode."""
    if eval_acc is None:
        eval_acc = accuracy(model, data, normalize, eval_batch_size, train_mode=False)
    train_acc = accuracy(model, data, normalize, batch_size, train_mode=True)
    return {"test_acc_eval_mode": eval_acc, "test_acc_train_mode": train_acc,
            "train_eval_gap": train_acc - eval_acc}


def training_batches(cfg, data, normalize, batch_size: int, max_images: Optional[int] = None):
    """One pass over the training set as training sees it (same augmentation), in batches of
    ``batch_size``; the order is the plan of epoch ``train.epochs`` (never trained on)."""
    from normbench.data import EpochPlan

    n = len(data.train_y)
    plan = EpochPlan(n, batch_size, cfg.seed, cfg.train.epochs, cfg.data.augment, data.train_y.device)
    steps = plan.steps if max_images is None else min(plan.steps, max(1, max_images // batch_size))
    for i in range(steps):
        x, _ = plan.batch(data, i)
        yield normalize(x)


def precise_bn_batches(data, normalize, images: int, batch_size: int):
    """The in-run precise-BN pass: the first ``images`` training images in their stored order,
    without augmentation, normalized, in batches of ``batch_size`` (at most the training set;
    a short last batch is dropped so that every batch weighs the same)."""
    n = min(images, len(data.train_y))
    b = max(1, min(batch_size, n))
    for start in range(0, n - n % b, b):
        yield normalize(data.train_x[start:start + b])


def precise_bn_eval(model: nn.Module, data, normalize, images: int, batch_size: int, eval_batch_size: int,
                    device: Optional[torch.device] = None) -> dict:
    """Test accuracy with the running statistics recomputed by :func:`precise_bn` over
    :func:`precise_bn_batches`: ``test_acc_precise_bn`` (None for a model without running
    statistics), ``precise_bn_images`` (images used) and ``precise_bn_batch_size``. The model
    and the RNG are untouched."""
    if not running_stat_layers(unwrap(model)):
        return {"test_acc_precise_bn": None}
    with preserved_rng(device):
        b = max(1, min(batch_size, images, len(data.train_y)))
        twin, used = precise_bn(model, precise_bn_batches(data, normalize, images, b))
        acc = accuracy(twin, data, normalize, eval_batch_size, train_mode=False)
    return {"test_acc_precise_bn": acc, "precise_bn_images": used * b, "precise_bn_batch_size": b}


# ----------------------------------------------------------------------------- 3. dead units


def activation_floor(module: nn.Module):
    """The value an activation outputs for a 'dead' input, or None when it has none.

    ReLU (and ReLU6, and any class whose name ends in "ReLU", e.g. a gain-scaled ReLU) -> 0;
    a module with a ``tau`` parameter or buffer (TLU, Singh & Krishnan 2019) -> tau; a module
    may also declare ``dead_floor`` (a number or a tensor broadcastable to (1, C, 1, 1)).
    """
    floor = getattr(module, "dead_floor", None)
    if floor is not None:
        return floor
    tau = getattr(module, "tau", None)
    if isinstance(tau, torch.Tensor):
        return tau
    if isinstance(module, (nn.ReLU, nn.ReLU6)) or type(module).__name__.lower().endswith("relu"):
        return 0.0
    return None


def activation_layers(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """(name, module whose output to watch, floor) for every activation with a floor.

    A NormAct counts once, with the floor of its activation (or of its norm, for a norm that
    carries its own TLU); stand-alone activations (the ReLU/TLU after a residual add) count
    as their own layers. A NormAct without a floored activation (the block's second norm,
    EvoNorm-S0) is not an activation layer.
    """
    from normbench.norms import NormAct

    out, inside = [], set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, NormAct):
            inside.update(id(c) for c in m.modules())
            floor = activation_floor(m.act)
            if floor is None:
                floor = activation_floor(m.norm)
            if floor is not None:
                out.append((name, m, floor))
            continue
        floor = activation_floor(m)
        if floor is not None and m is not model:
            inside.update(id(c) for c in m.modules())
            out.append((name, m, floor))
    return out


@torch.no_grad()
def dead_units(model: nn.Module, x: torch.Tensor, batch_size: int, device: Optional[torch.device] = None) -> dict:
    """Fraction of dead channels per activation layer, and over all of them ("all").

    A channel is dead when its output is <= the activation's floor at every position of
    every sample of ``x`` (normalized images). The forward runs on a deep copy in train mode
    in chunks of ``batch_size`` (the statistics a training step would use); the hooks live
    on the copy only. Layers are named by their module path.
    """
    with preserved_rng(device):
        twin = twin_of(model)
        watched = activation_layers(twin)
        alive: dict[str, Optional[torch.Tensor]] = {name: None for name, _, _ in watched}
        handles = []
        for name, module, floor in watched:
            def hook(mod, inputs, output, name=name, floor=floor):
                fl = floor.detach() if isinstance(floor, torch.Tensor) else floor
                if isinstance(fl, torch.Tensor) and fl.dim() == 1 and output.dim() > 2:
                    fl = fl.view(1, -1, *([1] * (output.dim() - 2)))
                above = (output > fl)
                dims = [d for d in range(above.dim()) if d != 1]
                now = above.any(dim=dims) if dims else above
                alive[name] = now if alive[name] is None else (alive[name] | now)
            handles.append(module.register_forward_hook(hook))
        try:
            for start in range(0, len(x), batch_size):
                chunk = x[start:start + batch_size]
                if start > 0 and len(chunk) < batch_size:
                    break  # a short last chunk would change batch statistics
                twin(chunk)
        finally:
            for h in handles:
                h.remove()
    counts = {name: (int((~a).sum()), a.numel()) for name, a in alive.items() if a is not None}
    out = {name: d / n for name, (d, n) in counts.items()}
    total = sum(n for _, n in counts.values())
    out["all"] = sum(d for d, _ in counts.values()) / total if total else float("nan")
    return out


def probe_images(data, normalize, k: int, batch_size: int) -> torch.Tensor:
    """The fixed dead-unit probe batch: the first K training images (no augmentation),
    rounded down to a multiple of the chunk size ``min(batch_size, K)``."""
    k = min(k, len(data.train_y))
    chunk = max(1, min(batch_size, k))
    k = max(chunk, k - k % chunk)
    return normalize(data.train_x[:k])


# ----------------------------------------------------------------------------- 4. activation stats


def norm_inputs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Where "pre-norm activations" are read: the input of every NormAct, or, for a model
    without any (normalizer-free), the output of every convolution."""
    from normbench.norms import NormAct

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, NormAct)]
    if found:
        return found
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def activation_stats(model: nn.Module, x: torch.Tensor, device: Optional[torch.device] = None
                     ) -> tuple[list[str], list[int], torch.Tensor]:
    """Per-channel mean and std of every pre-norm activation for batch x (one train-mode
    forward on a copy). Returns the layer names, their channel counts C and one flat tensor
    on the device: for each layer its C means then its C stds."""
    with preserved_rng(device):
        twin = twin_of(model)
        sites = norm_inputs(twin)
        parts: dict[str, torch.Tensor] = {}
        handles = []
        for name, module in sites:
            use_output = isinstance(module, nn.Conv2d)

            def hook(mod, inputs, output=None, name=name, use_output=use_output):
                t = (output if use_output else inputs[0]).float()
                dims = [d for d in range(t.dim()) if d != 1]
                parts[name] = torch.cat([t.mean(dim=dims), t.std(dim=dims, unbiased=False)])

            handles.append(module.register_forward_hook(hook) if use_output else module.register_forward_pre_hook(hook))
        try:
            twin(x)
        finally:
            for h in handles:
                h.remove()
    names = [n for n, _ in sites if n in parts]
    sizes = [parts[n].numel() // 2 for n in names]
    return names, sizes, (torch.cat([parts[n] for n in names]) if names else torch.zeros(0))


# ----------------------------------------------------------------------------- the run's hooks


def _median(values: Sequence[float]) -> Optional[float]:
    """The median (mean of the middle two for an even count), None when empty."""
    v = sorted(values)
    n = len(v)
    if not n:
        return None
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class Analysis:
    """Hooks the engine calls; every method is optional work driven by ``cfg.analysis``.

    ``wants_steps`` is False unless the lr-mode probe or the histograms are on (and this is the
    main process): the engine then does not call :meth:`after_backward` at all, so a run with
    only the end-of-run measurements pays nothing per step. The fixed-mode probe needs no
    hook inside the step: the engine compares its step with ``next_probe_step`` before each.
    Histograms wait on the device until the epoch ends (2 C floats per norm layer per
    histogram step): keep ``hist_every`` coarse.
    """

    def __init__(self, cfg, trainer):
        from normbench.norms import get_scheme

        a = cfg.analysis
        self.cfg = cfg
        self.fixed = a.probe and a.probe_mode == "fixed"  # fixed-distance probe on the held-out batch
        self.probe_every = a.probe_every if (a.probe and not self.fixed) else None
        self.multipliers = [float(s) for s in a.probe_multipliers]
        self.distances = sorted(float(t) for t in a.probe_distances)
        self.probe_tags = fixed_probe_tags(self.distances) if self.fixed else list(PROBE_TAGS)
        self.hist_every = a.hist_every
        self.dead = a.dead_units
        self.dead_images = a.dead_units_images
        self.gap = a.train_mode_eval and get_scheme(cfg.norm.kind).batch_dependent
        dist = getattr(trainer, "dist", None)
        self.main = getattr(dist, "is_main", True)  # under torchrun only rank 0 measures and writes
        self.distributed = getattr(dist, "enabled", False)
        self.wants_steps = self.main and (self.probe_every is not None or self.hist_every is not None)
        self.device = getattr(trainer, "device", None)
        self.pending_probes: list[tuple[int, torch.Tensor]] = []
        self.pending_hists: list[tuple[int, torch.Tensor]] = []
        self.pre_step_buffers: Optional[list[torch.Tensor]] = None  # see before_forward
        self.hist_layers: list[str] = []
        self.hist_sizes: list[int] = []
        self.probe_sums = [0.0, 0.0, 0.0]  # loss_range, grad_pred, beta over flushed probes
        self.probe_count = 0
        self.probe_betas: list[float] = []  # every flushed finite beta (for the median)
        self.probe_linearities: list[float] = []  # fixed mode
        self.last_dead: Optional[dict] = None
        # fixed mode: the steps whose parameters are probed; the engine compares its step with
        # next_probe_step before every step (and at epoch ends), so the probe costs nothing else
        self.probe_steps = (probe_schedule(trainer.total_steps, a.probes_per_run)
                            if self.fixed and self.main and getattr(trainer, "total_steps", None) else [])
        self.last_probe_step = -1
        self.next_probe_step: Optional[int] = None
        self._advance_probe()

    # -- fixed probe ---------------------------------------------------------------------
    def _advance_probe(self) -> None:
        later = [k for k in self.probe_steps if k > self.last_probe_step]
        self.next_probe_step = later[0] if later else None

    def probe_if_due(self, trainer) -> None:
        """Fixed mode: probe the parameters as they are now (after ``trainer.state.step``
        steps) when that step is on the schedule and not yet probed. Called before every step,
        at every epoch end and at the end; a resumed run probes each step once (the last
        probed step travels in the checkpoint). Packed members call it with their own model,
        unpacked from the packed network just before."""
        step = trainer.state.step
        if self.next_probe_step is None or step != self.next_probe_step:
            return
        x, y = probe_batch(trainer.data, trainer.normalize, self.cfg.analysis.probe_images)
        result = probe_model_fixed(trainer.model, x, y, self.distances, self.device)
        self.pending_probes.append((step, result.vector()))
        self.last_probe_step = step
        self._advance_probe()

    # -- per step --------------------------------------------------------------------------
    def _probes_at(self, step: int) -> bool:
        return self.probe_every is not None and step % self.probe_every == 0

    def before_forward(self, trainer) -> None:
        """On a probe step, keep the buffers the step's forward is about to update."""
        self.pre_step_buffers = snapshot_buffers(trainer.model) if self._probes_at(trainer.state.step) else None

    def after_backward(self, trainer, x, y, loss) -> None:
        """Gradients of this step are in ``.grad`` (before clipping); they are only read."""
        if not self.wants_steps:
            return
        step = trainer.state.step
        if self._probes_at(step):
            lr = trainer.optimizer.param_groups[0]["lr"]
            result = probe_model(trainer.model, x, y, lr, self.multipliers, loss=loss, device=self.device,
                                 use_model_grads=not self.distributed, autocast=getattr(trainer, "autocast", None),
                                 buffers=self.pre_step_buffers)
            self.pre_step_buffers = None
            self.pending_probes.append((step, result.vector()))
        if self.hist_every is not None and step % self.hist_every == 0:
            names, sizes, flat = activation_stats(trainer.model, x.detach(), self.device)
            self.hist_layers, self.hist_sizes = names, sizes
            self.pending_hists.append((step, flat))

    # -- logging ---------------------------------------------------------------------------
    def _flush(self, trainer, tb) -> None:
        spe = max(1, trainer.steps_per_epoch)
        if self.pending_probes:
            values = torch.stack([v for _, v in self.pending_probes]).cpu().tolist()  # one host read
            for (step, _), row in zip(self.pending_probes, values):
                record = {"step": step, "epoch": round(step / spe, 4), **dict(zip(self.probe_tags, row))}
                trainer.run_dir.append_metrics(record)
                if tb is not None:
                    tb.scalars(step, {k: v for k, v in record.items() if "/" in k})
                if all(math.isfinite(v) for v in row[:3]):
                    self.probe_count += 1
                    for i in range(3):
                        self.probe_sums[i] += row[i]
                    self.probe_betas.append(row[2])
                    if self.fixed and math.isfinite(row[6]):
                        self.probe_linearities.append(row[6])
            self.pending_probes = []
        if self.pending_hists:
            for step, flat in self.pending_hists:
                flat = flat.cpu()
                offset = 0
                for name, c in zip(self.hist_layers, self.hist_sizes):
                    if tb is not None:
                        tb.histogram(f"act/{name}/mean", flat[offset:offset + c], step)
                        tb.histogram(f"act/{name}/std", flat[offset + c:offset + 2 * c], step)
                    offset += 2 * c
            self.pending_hists = []

    def on_epoch_end(self, trainer, epoch: int, tb) -> None:
        """After the epoch's evaluation, before its checkpoint: write pending probes and
        histograms, then measure dead units when enabled. Fixed mode: a probe due at this
        step (the epoch's last parameters) is taken first."""
        if not self.main:
            return
        self.probe_if_due(trainer)
        self._flush(trainer, tb)
        if self.dead:
            x = probe_images(trainer.data, trainer.normalize, self.dead_images, self.cfg.train.batch_size)
            result = dead_units(trainer.model, x, self.cfg.train.batch_size, self.device)
            self.last_dead = result
            record = {"step": trainer.state.step, "epoch": epoch, **{f"dead/{k}": v for k, v in result.items()}}
            trainer.run_dir.append_metrics(record)
            if tb is not None:
                tb.scalars(trainer.state.step, {k: v for k, v in record.items() if "/" in k})

    def on_finish(self, trainer, tb) -> dict:
        """Extra summary fields for a completed run."""
        if not self.main:
            return {}
        self.probe_if_due(trainer)
        self._flush(trainer, tb)
        out: dict = {}
        if self.gap and trainer.state.last_eval:
            out.update(train_eval_gap(trainer.model, trainer.data, trainer.normalize, self.cfg.train.batch_size,
                                      self.cfg.train.eval_batch_size, eval_acc=trainer.state.last_eval["acc"]))
            record = {"step": trainer.state.step, "gap/test_acc_eval_mode": out["test_acc_eval_mode"],
                      "gap/test_acc_train_mode": out["test_acc_train_mode"], "gap/train_eval_gap": out["train_eval_gap"]}
            trainer.run_dir.append_metrics(record)
            if tb is not None:
                tb.scalars(trainer.state.step, {k: v for k, v in record.items() if "/" in k})
        if self.cfg.analysis.precise_bn:
            a = self.cfg.analysis
            out.update(precise_bn_eval(trainer.model, trainer.data, trainer.normalize, a.precise_bn_images,
                                       a.precise_bn_batch, self.cfg.train.eval_batch_size, self.device))
            if out["test_acc_precise_bn"] is not None:
                record = {"step": trainer.state.step, "gap/test_acc_precise_bn": out["test_acc_precise_bn"]}
                trainer.run_dir.append_metrics(record)
                if tb is not None:
                    tb.scalars(trainer.state.step, {k: v for k, v in record.items() if "/" in k})
        if self.dead:
            if self.last_dead is None:
                x = probe_images(trainer.data, trainer.normalize, self.dead_images, self.cfg.train.batch_size)
                self.last_dead = dead_units(trainer.model, x, self.cfg.train.batch_size, self.device)
            out["dead_unit_frac"] = self.last_dead["all"]
            out["dead_units_by_layer"] = {k: v for k, v in self.last_dead.items() if k != "all"}
        if self.probe_every is not None or self.fixed:
            n = self.probe_count
            out.update({"probe_count": n,
                        "probe_loss_range_mean": self.probe_sums[0] / n if n else None,
                        "probe_grad_pred_mean": self.probe_sums[1] / n if n else None,
                        "probe_beta_mean": self.probe_sums[2] / n if n else None,
                        "probe_beta_median": _median(self.probe_betas)})
            if self.fixed:
                out.update({"probe_mode": "fixed", "probe_linearity_median": _median(self.probe_linearities)})
        return out

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "pending_probes": [(s, v.detach().cpu()) for s, v in self.pending_probes],
            "pending_hists": [(s, v.detach().cpu()) for s, v in self.pending_hists],
            "hist_layers": list(self.hist_layers),
            "hist_sizes": list(self.hist_sizes),
            "probe_sums": list(self.probe_sums),
            "probe_count": self.probe_count,
            "probe_betas": list(self.probe_betas),
            "probe_linearities": list(self.probe_linearities),
            "last_probe_step": self.last_probe_step,
            "last_dead": dict(self.last_dead) if self.last_dead is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        dev = self.device or torch.device("cpu")
        self.pending_probes = [(int(s), v.to(dev)) for s, v in state.get("pending_probes", [])]
        self.pending_hists = [(int(s), v.to(dev)) for s, v in state.get("pending_hists", [])]
        self.hist_layers = list(state.get("hist_layers", []))
        self.hist_sizes = [int(c) for c in state.get("hist_sizes", [])]
        self.probe_sums = [float(v) for v in state.get("probe_sums", [0.0, 0.0, 0.0])]
        self.probe_count = int(state.get("probe_count", 0))
        self.probe_betas = [float(v) for v in state.get("probe_betas", [])]
        self.probe_linearities = [float(v) for v in state.get("probe_linearities", [])]
        self.last_probe_step = int(state.get("last_probe_step", -1))
        self._advance_probe()
        self.last_dead = state.get("last_dead")


def make_analysis(cfg, trainer) -> Optional[Analysis]:
    """An :class:`Analysis` when any ``analysis.*`` part applies to this run, else None (the
    training step then pays nothing). ``train_mode_eval`` applies to batch-dependent schemes."""
    from normbench.norms import get_scheme

    a = cfg.analysis
    gap = a.train_mode_eval and get_scheme(cfg.norm.kind).batch_dependent
    if not (a.probe or a.dead_units or a.hist_every is not None or gap or a.precise_bn):
        return None
    return Analysis(cfg, trainer)


# ----------------------------------------------------------------------------- `normbench analyze`


def analyze_run(path, recalibrate: bool = False, recal_batch_size: Optional[int] = None,
                recal_images: Optional[int] = None, device: Optional[str] = None, log=print) -> dict:
    """Measure a finished (or checkpointed) run again from its folder: the train/eval gap
    (for every scheme: batch-independent ones are the control, with a gap of 0), precise BN
    when ``recalibrate`` (statistics over one pass of ``recal_images`` training images, default
    all, in batches of ``recal_batch_size``, default the run's batch size) and dead units.
    Updates ``summary.json`` atomically (other keys kept) when the run has one; returns the
    measured fields. User mistakes (not a run folder, unreadable files) raise UserError.
    """
    from pathlib import Path

    from normbench.config import load_config, validate_config
    from normbench.data import Normalizer, load_cifar10
    from normbench.engine import resolve_device, use_channels_last
    from normbench.errors import UserError
    from normbench.models import build_model
    from normbench.norms import get_scheme
    from normbench.tracking import RunDir

    run = RunDir(Path(path))
    if not run.path.is_dir():
        raise UserError(f"run folder not found: {run.path}")
    if not run.config.is_file():
        raise UserError(f"{run.path} is not a run folder (no config.yaml)")
    ckpt = run.load_checkpoint()
    if ckpt is None:
        raise UserError(f"{run.path} has no checkpoint.pt to analyze (the run never finished an epoch)")
    cfg = load_config(run.config)
    if device is not None:
        cfg = validate_config({**cfg.to_dict(), "device": device}, source="--device")
    dev = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    channels_last = use_channels_last(cfg, dev)
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as err:
        raise UserError(f"checkpoint of {run.path} does not fit the model its config builds: "
                        f"{str(err).splitlines()[0]}") from None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt).train()
    data = load_cifar10(cfg.data, log=log).to(dev)
    normalize = Normalizer(dev, channels_last)
    batch = cfg.train.batch_size
    scheme = get_scheme(cfg.norm.kind)
    out: dict = {"analyzed_step": int(ckpt.get("state", {}).get("step", 0))}
    with preserved_rng(dev):
        out.update(train_eval_gap(model, data, normalize, batch, cfg.train.eval_batch_size))
        if recalibrate:
            out["test_acc_precise_bn"] = None
            if running_stat_layers(model):
                rb = recal_batch_size or batch
                if rb > len(data.train_y):
                    raise UserError(f"--recal-batch-size: got {rb}; the training set has {len(data.train_y)} images")
                twin, used = precise_bn(model, training_batches(cfg, data, normalize, rb, recal_images))
                out["test_acc_precise_bn"] = accuracy(twin, data, normalize, cfg.train.eval_batch_size, train_mode=False)
                out["precise_bn_images"] = used * rb
                out["precise_bn_batch_size"] = rb
            else:
                log(f"{cfg.norm.kind}: no running statistics; nothing to recalibrate")
        x = probe_images(data, normalize, cfg.analysis.dead_units_images, batch)
        dead = dead_units(model, x, batch, dev)
    out["dead_unit_frac"] = dead.pop("all")
    out["dead_units_by_layer"] = dead
    out["batch_dependent"] = scheme.batch_dependent
    summary = run.read_summary()
    if summary is not None:
        summary.pop("summary_version", None)
        summary.update(out)  # without --recalibrate an earlier test_acc_precise_bn is kept
        run.write_summary(summary)
        out["summary_updated"] = True
    else:
        out["summary_updated"] = False
    out["run_name"] = cfg.run_name
    out["norm"] = cfg.norm.kind
    out["batch_size"] = batch
    return out
