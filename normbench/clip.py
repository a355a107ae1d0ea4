"""Gradient clipping, applied after backward and before the optimizer step.

Every mode is a :class:`Clipper`: called with the model's parameters after backward, it
clips their ``.grad`` in place and returns a :class:`ClipStats` of 0-d tensors on the
training device (no host sync): the global L2 norm of the gradient before clipping, the
threshold in force, and the fraction clipped (units for AGC, elements for value, the step
itself for the norm-based modes). The engine reads them once per log interval. Everything
is vectorized over parameters (``torch._foreach_*`` and one concatenated buffer for AGC).
Specification, sources and project choices: docs/methods.md#clipping and its clip-* sections.

| mode | rule | threshold logged | fraction logged |
|---|---|---|---|
| none | nothing | NaN | 0 |
| norm | g <- min(1, c / ||g||) g, c = ``max_norm`` | c | 1 if ||g|| > c else 0 |
| value | each element clipped to [-v, v], v = ``max_value`` | v | elements with abs > v |
| dynamic | c_t = alpha * mean(||g|| over the last ``window`` steps) + beta, then as norm | c_t (NaN at step 0) | 1 if clipped |
| agc | unit-wise (Brock et al. 2021b): G_i <- min(1, lambda max(||W_i||, eps) / ||G_i||) G_i | lambda | units clipped |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class ClipStats:
    norm: torch.Tensor  # global L2 norm of all gradients before clipping
    threshold: torch.Tensor  # the threshold in force this step (NaN when none applies)
    clipped_frac: torch.Tensor  # fraction of steps / units / elements clipped this step


def grads_of(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum of squares) over every gradient element, as one 0-d float32 tensor."""
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack(norms)).float()


def clip_by_global_norm_(grads: list[torch.Tensor], norm: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """g <- min(1, c / ||g||) g in place (no 1e-6 in the denominator); returns 1.0 if clipped.

    Only a norm above the threshold scales (so ||g|| = c = 0 or a NaN threshold leaves g as is)."""
    clipped = norm > threshold
    coef = torch.where(clipped, threshold / norm, torch.ones_like(norm))
    torch._foreach_mul_(grads, coef)
    return clipped.float()


class Clipper:
    """Base class: no clipping, only the pre-clip norm."""

    def __init__(self, cfg, model: nn.Module):
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The optimizer's flat gradient buffers (FlatSGD.flat_grads), when it keeps them: the
        # norm-based and value modes then reduce and scale one tensor per group, not 62.
        self.grad_source: Optional[Callable[[], Optional[list[torch.Tensor]]]] = None
        device = self.params[0].device
        self._nan = torch.tensor(float("nan"), device=device)
        self._zero = torch.tensor(0.0, device=device)

    def grads(self) -> list[torch.Tensor]:
        flat = self.grad_source() if self.grad_source is not None else None
        return flat if flat is not None else grads_of(self.params)

    def __call__(self) -> ClipStats:
        return ClipStats(global_norm(self.grads()), self._nan, self._zero)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NormClipper(Clipper):
    """Clip by global L2 norm at ``clip.max_norm``: g <- min(1, c / ||g||_2) g."""

    def __init__(self, cfg, model: nn.Module):
        super().__init__(cfg, model)
        self.threshold = torch.tensor(float(cfg.max_norm), device=self._zero.device)

    def __call__(self) -> ClipStats:
        grads = self.grads()
        norm = global_norm(grads)
        clipped = clip_by_global_norm_(grads, norm, self.threshold)
        return ClipStats(norm, self.threshold, clipped)


class ValueClipper(Clipper):
    """Clip every gradient element to [-v, v], v = ``clip.max_value``; the fraction logged is
    the fraction of gradient elements that were outside the interval."""

    def __init__(self, cfg, model: nn.Module):
        super().__init__(cfg, model)
        self.value = float(cfg.max_value)
        self.threshold = torch.tensor(self.value, device=self._zero.device)

    def __call__(self) -> ClipStats:
        grads = self.grads()
        norm = global_norm(grads)
        over = torch._foreach_abs(grads)  # |g| - v > 0 exactly where clipped; sign -> 1 / 0
        torch._foreach_sub_(over, self.value)
        torch._foreach_clamp_min_(over, 0.0)
        torch._foreach_sign_(over)
        count = torch.stack(torch._foreach_norm(over, 1)).sum()
        total = sum(g.numel() for g in grads)
        torch._foreach_clamp_min_(grads, -self.value)
        torch._foreach_clamp_max_(grads, self.value)
        return ClipStats(norm, self.threshold, (count / max(total, 1)).float())


class DynamicClipper(Clipper):
    """Clip by global norm at a threshold that follows the recent norm history:

        c_t = alpha * mean(||g_{t-k}||, ..., ||g_{t-1}||) + beta,  k = min(t, window)

    with ||g|| the pre-clip global norms of earlier steps (``clip.alpha``, ``clip.beta``,
    ``clip.window``). Project choices (no primary source defines the method; cf. AutoClip,
    Seetharaman et al. 2020, which clips at a percentile of the history): step 0 has no
    history, so nothing is clipped and the logged threshold is NaN; until the window fills,
    the mean runs over the steps seen so far; the history records pre-clip norms (a
    non-finite norm is recorded as the mean in force, so one bad step cannot poison the
    window). The history is a ring buffer on the training device; ``state_dict`` carries it
    and the step count, so a resumed run clips exactly like an uninterrupted one.
    """

    def __init__(self, cfg, model: nn.Module):
        super().__init__(cfg, model)
        self.alpha, self.beta, self.window = float(cfg.alpha), float(cfg.beta), int(cfg.window)
        self.history = torch.zeros(self.window, device=self._zero.device)
        self.step = 0

    def threshold_now(self) -> torch.Tensor:
        """c_t for the coming step (NaN at step 0), a 0-d device tensor."""
        if self.step == 0:
            return self._nan
        seen = min(self.step, self.window)  # unfilled slots hold 0, so sum / seen is the mean so far
        return self.history.sum() * (self.alpha / seen) + self.beta

    def __call__(self) -> ClipStats:
        grads = self.grads()
        norm = global_norm(grads)
        threshold = self.threshold_now()
        if self.step == 0:
            clipped, fallback = self._zero, self._zero
        else:
            clipped = clip_by_global_norm_(grads, norm, threshold)
            fallback = (threshold - self.beta) / self.alpha
        self.history[self.step % self.window] = torch.where(torch.isfinite(norm), norm, fallback)
        self.step += 1
        return ClipStats(norm, threshold, clipped)

    def state_dict(self) -> dict:
        return {"history": self.history.detach().cpu().clone(), "step": self.step, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if int(state["window"]) != self.window:
            raise ValueError(f"dynamic clipping state has window {state['window']}, config has {self.window}")
        self.history.copy_(state["history"].to(self.history.device))
        self.step = int(state["step"])


class AGCClipper(Clipper):
    """Adaptive Gradient Clipping (Brock, De, Smith & Simonyan 2021b, Sec. 4.1, Eq. 3),
    unit-wise: for each output unit i (row of a linear weight, output filter of a conv),

        G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i   if ||G_i|| / max(||W_i||, eps) > lambda,

    lambda = ``clip.agc_lambda``, eps = ``clip.agc_eps`` (1e-3); for tensors with ndim <= 1
    (biases, gains, norm parameters) the unit is the whole tensor. The final classifier
    ``model.fc`` is never clipped (the paper's recommendation). Vectorized: all clipped
    tensors are concatenated into one flat buffer and reduced per unit with ``index_add_``;
    the per-unit factors go back with one ``_foreach_mul_``. The logged threshold is lambda,
    the fraction is the fraction of units clipped.
    """

    def __init__(self, cfg, model: nn.Module):
        super().__init__(cfg, model)
        self.lam, self.eps = float(cfg.agc_lambda), float(cfg.agc_eps)
        base = getattr(model, "_orig_mod", model)  # torch.compile / DDP wrappers hold the real model
        base = getattr(base, "module", base)
        fc = getattr(base, "fc", None)
        skip = {id(p) for p in fc.parameters()} if isinstance(fc, nn.Module) else set()
        self.clip_params = [p for p in self.params if id(p) not in skip]
        self.threshold = torch.tensor(self.lam, device=self._zero.device)
        self._layouts: dict = {}

    def _layout(self, params: list[nn.Parameter]):
        """(unit index per element, units per tensor, factor shapes) for these tensors; cached."""
        key = tuple(id(p) for p in params)
        layout = self._layouts.get(key)
        if layout is None:
            units = [p.shape[0] if p.ndim > 1 else 1 for p in params]
            per_unit = [p.numel() // u for p, u in zip(params, units)]
            device = self._zero.device
            index = torch.repeat_interleave(torch.arange(sum(units), device=device),
                                            torch.tensor([n for u, n in zip(units, per_unit) for _ in range(u)],
                                                         device=device))
            shapes = [(u,) + (1,) * (p.ndim - 1) if p.ndim > 1 else (1,) * p.ndim for p, u in zip(params, units)]
            layout = self._layouts[key] = (index, units, shapes)
        return layout

    def unit_norms(self, tensors: list[torch.Tensor], index: torch.Tensor, n_units: int) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        sq = torch.zeros(n_units, device=flat.device, dtype=flat.dtype).index_add_(0, index, flat * flat)
        return sq.sqrt_()

    def __call__(self) -> ClipStats:
        norm = global_norm(self.grads())
        params = [p for p in self.clip_params if p.grad is not None]
        if not params:
            return ClipStats(norm, self.threshold, self._zero)
        grads = [p.grad for p in params]
        index, units, shapes = self._layout(params)
        n_units = sum(units)
        g_norm = self.unit_norms(grads, index, n_units)
        max_norm = self.unit_norms([p.detach() for p in params], index, n_units).clamp_(min=self.eps).mul_(self.lam)
        clipped = g_norm > max_norm
        factor = torch.where(clipped, max_norm / g_norm, torch.ones_like(g_norm))
        torch._foreach_mul_(grads, [f.view(shape) for f, shape in zip(factor.split(units), shapes)])
        return ClipStats(norm, self.threshold, clipped.float().mean())


CLIPPERS: dict[str, Callable[..., Clipper]] = {
    "none": Clipper,
    "norm": NormClipper,
    "value": ValueClipper,
    "dynamic": DynamicClipper,
    "agc": AGCClipper,
}


def make_clipper(cfg, model: nn.Module) -> Clipper:
    return CLIPPERS[cfg.mode](cfg, model)
