"""SGD over flat buffers: one fused update per parameter group instead of one per tensor.

At batch 2 a ResNet-20 step on the 2-core CPU is mostly per-call overhead, and the
optimizer side pays it once per parameter tensor (62 of them): PyTorch's fused SGD, zeroing
the gradients and the clipper's per-tensor norms cost ~0.6 ms of a ~9 ms step. Here each
parameter group's parameters, gradients and momentum buffers are views into three flat
buffers (the parameters keep their shapes and memory formats, channels_last included), so
the update is one call of PyTorch's own fused SGD kernel over one tensor, zeroing is one
fill, and the clipper's global norm is one reduction (``flat_grads``). The update rule is
torch.optim.SGD's, element by element (the same kernel; tested against it).

Semantics that differ from ``zero_grad(set_to_none=True)``: gradients are zeroed in place,
never set to None, as with PyTorch's ``zero_grad(set_to_none=False)``, so a parameter that
took no part in a step would still be decayed and carried by its momentum. Every normbench
model uses every parameter at every step (tested for every scheme). Anything that replaces
a gradient or a momentum buffer from outside (a parameter whose grad is None after
backward, ``load_state_dict``, the packed trainer writing members' buffers) is noticed at
the next step by identity checks: a replaced gradient is copied back into the flat buffer,
a None gradient makes that step PyTorch's per-tensor step (exact skip semantics), and
replaced momentum buffers are gathered into the flat one again. The state dict is the
standard SGD format (per-parameter momentum buffers), loadable by either class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


def flattenable(params: list[nn.Parameter]) -> bool:
    """All on one device and dtype, floating point, and dense (contiguous or channels_last)."""
    if not params or not hasattr(torch, "_fused_sgd_"):
        return False
    first = params[0]
    return all(p.device == first.device and p.dtype == first.dtype and p.is_floating_point()
               and (p.is_contiguous() or (p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last)))
               for p in params)


@dataclass
class FlatGroup:
    params: list[nn.Parameter]
    data: torch.Tensor  # every parameter of the group, flat
    grad: torch.Tensor
    grad_views: list[torch.Tensor]  # p.grad is grad_views[i] while the binding holds
    momentum: Optional[torch.Tensor] = None  # built at the first step (or gathered again)
    momentum_views: Optional[list[torch.Tensor]] = None


def _views(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(flat.as_strided(p.size(), p.stride(), offset))
        offset += p.numel()
    return out


def flatten_group(params: list[nn.Parameter]) -> FlatGroup:
    """Move the parameters' data into one flat buffer and bind their grads to views of another."""
    total = sum(p.numel() for p in params)
    data = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
    grad = torch.zeros_like(data)
    for p, view in zip(params, _views(data, params)):
        view.copy_(p.detach())
        p.data = view  # same Parameter object (optimizer, hooks, state keys), new storage
    grad_views = _views(grad, params)
    for p, view in zip(params, grad_views):
        if p.grad is not None:
            view.copy_(p.grad)
        p.grad = view
    return FlatGroup(params, data, grad, grad_views)


class FlatSGD(torch.optim.SGD):
    """torch.optim.SGD (fused kernel) whose groups live in flat buffers; see the module docstring."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.flat_groups = [flatten_group(group["params"]) for group in self.param_groups]

    # -- gradient bindings ---------------------------------------------------------------
    def flat_grads(self) -> Optional[list[torch.Tensor]]:
        """The flat gradient buffers (one per group), replaced gradients copied back into them;
        None if some gradient is None."""
        return [fg.grad for fg in self.flat_groups] if self._rebind_grads() else None

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (always zeroed in place)
        for fg in self.flat_groups:
            fg.grad.zero_()
            for p, view in zip(fg.params, fg.grad_views):
                if p.grad is not view:
                    p.grad = view

    def _rebind_grads(self) -> bool:
        """Copy replaced gradients back into the flat buffer; False if some gradient is None."""
        for fg in self.flat_groups:
            for p, view in zip(fg.params, fg.grad_views):
                if p.grad is None:
                    return False
                if p.grad is not view:
                    view.copy_(p.grad)
                    p.grad = view
        return True

    # -- momentum ------------------------------------------------------------------------
    def _momentum_ready(self, fg: FlatGroup) -> Optional[bool]:
        """Make fg.momentum hold the group's momentum buffers; returns is_first_step, or None
        when the parameters' states disagree (some have a buffer, some not)."""
        if fg.momentum is not None and all(self.state[p].get("momentum_buffer") is view
                                           for p, view in zip(fg.params, fg.momentum_views)):
            return False
        buffers = [self.state[p].get("momentum_buffer") for p in fg.params]
        have = [b is not None for b in buffers]
        if any(have) and not all(have):
            return None
        fg.momentum = torch.zeros_like(fg.data)
        fg.momentum_views = _views(fg.momentum, fg.params)
        for p, view, buf in zip(fg.params, fg.momentum_views, buffers):
            if buf is not None:
                view.copy_(buf)
            self.state[p]["momentum_buffer"] = view
        return not all(have)

    # -- the update ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._rebind_grads():
            for fg in self.flat_groups:
                fg.momentum = None  # PyTorch's step may create new buffers: gather them next time
            return super().step(closure)
        firsts = []
        for group, fg in zip(self.param_groups, self.flat_groups):
            first = self._momentum_ready(fg) if group["momentum"] != 0 else False
            if first is None:
                fg.momentum = None
                return super().step()
            firsts.append(first)
        for group, fg, first in zip(self.param_groups, self.flat_groups, firsts):
            torch._fused_sgd_([fg.data], [fg.grad], [fg.momentum] if group["momentum"] != 0 else [],
                              weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                              dampening=group["dampening"], nesterov=group["nesterov"],
                              maximize=group["maximize"], is_first_step=first, grad_scale=None, found_inf=None)
        return None
