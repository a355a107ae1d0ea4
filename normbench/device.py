"""Where a run computes: the device a config names, and the model built on it.

:func:`build_model_on` is the one place a network is built for a device: the model of the
config (seeded by the caller), moved to the device in the memory format
:func:`use_channels_last` chooses (after :func:`prepare_kernels` has built the CPU kernels). The trainer, the packed trainer, the sweep's step-time
probe and offline analysis all build their models through it.
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch
from torch import nn

from normbench.config import RunConfig
from normbench.errors import UserError


def _cuda_state() -> tuple[bool, str]:
    """(CUDA usable, why not): torch warns and says False when the driver is too old; the
    warning is the reason."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if ok:
        return True, ""
    why = next((str(w.message).splitlines()[0] for w in caught if "CUDA" in str(w.message)), "")
    return False, why or "no CUDA device or driver"


def unsupported_gpu(index: int) -> Optional[str]:
    """Why this torch build cannot run kernels on CUDA device ``index`` (None: it can): its
    compute capability is below every architecture the wheel was built for."""
    arches = [a for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    if not arches:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    lowest = min(int(a[3:]) for a in arches)
    if major * 10 + minor >= lowest:
        return None
    name = torch.cuda.get_device_name(index)
    return (f"{name} (sm_{major}{minor}) is older than this torch build supports (sm_{lowest} and newer: "
            f"{', '.join(arches)})")


def resolve_device(spec: str) -> torch.device:
    """``auto``: a CUDA GPU this torch build can drive, then MPS, then the CPU; an explicit
    device that is absent or unusable is a UserError (see :func:`device_line` for the why)."""
    if spec == "auto":
        if _cuda_state()[0] and unsupported_gpu(0) is None:
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        ok, why = _cuda_state()
        if not ok:
            raise UserError(f"device: got '{spec}' but CUDA is not available on this machine ({why}); "
                            "use device=cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device: got '{spec}' but this machine has {torch.cuda.device_count()} CUDA device(s)")
        why = unsupported_gpu(index)
        if why is not None:
            raise UserError(f"device: got '{spec}' but {why}; install a torch wheel built for it, or use device=cpu")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device: got 'mps' but MPS is not available on this machine; use device=cpu or auto")
    return torch.device(spec)


def device_line(spec: str, device: torch.device) -> str:
    """One line for the start of a run: the device chosen and why."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        what = f"{device} ({torch.cuda.get_device_name(index)}, sm_{major}{minor}; torch {torch.__version__}, " \
               f"CUDA {torch.version.cuda})"
    else:
        what = str(device)
    if spec != "auto":
        return f"device: {what} (as configured)"
    if device.type == "cuda":
        return f"device: {what} (auto: a CUDA GPU this torch build supports)"
    ok, why = _cuda_state()
    if ok:
        why = unsupported_gpu(0) or "not chosen"
    return f"device: {what} (auto: CUDA not used: {why}" + ("; MPS available)" if device.type == "mps" else ")")


def check_amp(cfg: RunConfig, device: torch.device) -> None:
    """bf16 autocast only where the device computes bf16 natively (emulated bf16 is slow and
    not what the run asks to measure)."""
    if cfg.train.amp != "bf16" or device.type != "cuda":
        return
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"train.amp: got 'bf16' but {name} has no native bf16 (it would be emulated); "
                        "use train.amp=none")


def prepare_kernels(device: torch.device) -> bool:
    """On a CPU, build the fused kernels of the CPU speed paths (or take them from the on-disk
    cache) and load them: an explicit step of building a model, since the memory format and
    the layers' paths depend on it. True when they are loaded."""
    if device.type != "cpu":
        return False
    from normbench.norms import speed

    return speed.load()


def use_channels_last(cfg: RunConfig, device: torch.device, kernels: bool) -> bool:
    """``train.channels_last``, or under ``auto``: on a CPU the scheme's measured preference
    (schemes whose channels_last speed depends on the fused CPU kernels run NCHW on a CPU
    without them; ``kernels``: whether they are loaded, see :func:`prepare_kernels`); on a GPU
    channels_last under bf16 autocast only."""
    if cfg.train.channels_last != "auto":
        return bool(cfg.train.channels_last)
    if device.type != "cpu":
        # off the CPU the CPU's measurements do not apply: channels_last where the convolutions
        # run on tensor cores (bf16 autocast), PyTorch's default NCHW in float32
        # (scripts/gpu_check.sh times both formats on the GPU it runs on)
        return cfg.train.amp == "bf16"
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
