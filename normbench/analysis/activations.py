"""Activations of a trained model: dead units at each activation's floor, and the per-channel
statistics of every norm layer's input (histograms)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from normbench.analysis.common import preserved_rng, twin_of


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
