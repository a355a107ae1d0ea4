"""Where a run computes: the device a config names, and the model built on it.

:func:`build_model_on` is the one place a network is built for a device: the model of the
config (seeded by the caller), moved to the device in the memory format
:func:`use_channels_last` chooses (after :func:`prepare_kernels` has built the CPU kernels). The trainer, the packed trainer, the sweep's step-time
probe and offline analysis all build their models through it.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from normbench.config import RunConfig
from normbench.errors import UserError


def resolve_device(spec: str) -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU; an explicit device that is absent is a UserError."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device: got '{spec}' but CUDA is not available on this machine; use device=cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device: got '{spec}' but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device: got 'mps' but MPS is not available on this machine; use device=cpu or auto")
    return torch.device(spec)


def prepare_kernels(device: torch.device) -> bool:
    """On a CPU, build the fused kernels of the CPU speed paths (or take them from the on-disk
    cache) and load them: an explicit step of building a model, since the memory format and
    the layers' paths depend on it. True when they are loaded."""
    if device.type != "cpu":
        return False
    from normbench.norms import speed

    return speed.load()


def use_channels_last(cfg: RunConfig, device: torch.device, kernels: bool) -> bool:
    """``train.channels_last``, or under ``auto`` the scheme's measured preference; schemes whose
    channels_last speed depends on the fused CPU kernels run NCHW on a CPU without them
    (``kernels``: whether they are loaded, see :func:`prepare_kernels`)."""
    if cfg.train.channels_last != "auto":
        return bool(cfg.train.channels_last)
    from normbench.norms import get_scheme

    scheme = get_scheme(cfg.norm.kind)
    if scheme.channels_last_needs_kernels and device.type == "cpu" and not kernels:
        return False  # PyTorch's GroupNorm kernel is 2-3x slower on channels_last input
    return scheme.prefers_channels_last


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


class PlacedModel(NamedTuple):
    model: nn.Module
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.channels_last)


def build_model_on(cfg: RunConfig, device: torch.device, check_batch: bool = False) -> PlacedModel:
    """The config's network on ``device`` in its memory format. The caller seeds torch first
    (the initial weights come from the global generator). ``check_batch``: run one forward at
    the run's batch size on a copy first (:func:`preflight`), so a shape or memory error names
    the config key before anything is trained."""
    from normbench.models import build_model

    model = build_model(cfg)
    if check_batch:
        preflight(cfg, model, device)
    channels_last = use_channels_last(cfg, device, prepare_kernels(device))
    return PlacedModel(model.to(device, memory_format=memory_format(channels_last)), channels_last)


def preflight(cfg: RunConfig, model: nn.Module, device: torch.device) -> None:
    """One forward at the run's batch size on a copy of the model: shape errors surface now."""
    probe = copy.deepcopy(model).to(device).train()
    try:
        with torch.no_grad():
            probe(torch.zeros(cfg.train.batch_size, 3, 32, 32, device=device))
    except (torch.OutOfMemoryError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in text and "out of memory" not in text:
            raise
        raise UserError(f"train.batch_size: got {cfg.train.batch_size}; one forward pass at this batch size "
                        f"does not fit in the memory of {device}") from None
