"""The speed paths of the normalization layers, behind one seam.

Each layer family (normbench/norms/<family>.py) holds the maths as readable PyTorch and makes
one call into this package for its computation; what runs behind that call is only faster, never
different maths (tests/test_norms_speed.py checks every path against the family's reference):

* ``native``: fused C++ CPU kernels (native/fused.cpp), one call per layer and direction,
  bound through ctypes from one declaration (native/binding.py);
* ``functional``: primitives built on PyTorch's per-channel kernels (the CPU fast path of the
  hand-written autograd Functions when the C++ kernels are off);
* ``per_sample`` / ``chunked``: the custom autograd Functions (hand-written backward passes)
  that call either of the two.

The calls, one per family (the layer passes its tensors, or itself where the call updates its
running statistics):

* :func:`group_norm`: GN / LN / IN (+ ReLU) in the fused kernels; None where they do not apply
  (the layer then runs PyTorch's GroupNorm kernel);
* :func:`filter_response_norm`, :func:`tlu`, :func:`evonorm_s0`: the layer's hand-written
  autograd Function, on every device;
* :func:`ghost_batch_norm`, :func:`batch_renorm`: a training step of the layer (chunked
  BatchNorm statistics), which hands the batch statistics to ``layer.update_running`` unless a
  fused kernel moved the running statistics itself.

Switches: ``NORMBENCH_NATIVE=0`` (or ``native.ENABLED = False``) turns the C++ kernels off;
``functional.FAST_KERNELS = False`` turns the CPU fast path of the primitives off (generic
broadcasting ops). Under ``torch.compile`` tracing the kernels stand down and the PyTorch
paths run. Building the kernels is the explicit step :func:`load`.
"""
from __future__ import annotations

from typing import Optional

import torch

from normbench.norms.speed import functional, native
from normbench.norms.speed.chunked import (KERNEL_PATH_MAX_NUMEL, ChunkedBatchNormFn, ChunkedLayer, Chunks,
                                           batch_renorm, ghost_batch_norm, renorm_through_bn_kernel)
from normbench.norms.speed.per_sample import EvoNormS0Fn, FRNFn, GroupNormFn, TLUFn

__all__ = ["functional", "native", "load", "kernels_available", "group_norm", "filter_response_norm", "tlu",
           "evonorm_s0", "ghost_batch_norm", "batch_renorm", "renorm_through_bn_kernel", "ChunkedLayer", "Chunks",
           "ChunkedBatchNormFn", "GroupNormFn", "FRNFn", "TLUFn", "EvoNormS0Fn", "KERNEL_PATH_MAX_NUMEL"]


def load() -> bool:
    """Build the fused C++ kernels (or take them from the on-disk cache) and load them into this
    process, once: True when they are available. A missing compiler or a failed build gives
    one warning on stderr and False (the PyTorch paths then run); so does ``NORMBENCH_NATIVE=0``,
    silently. Callers that choose between paths (the engine's memory format, the benchmarks,
    the tests) call this first; a layer that meets a tensor the kernels could take before anyone
    did takes the same step then (native.applies)."""
    return native.library() is not None


def kernels_available() -> bool:
    """Whether the fused kernels are loaded (never builds them)."""
    return native.loaded()


def group_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], groups: int,
               eps: float, relu: bool) -> Optional[torch.Tensor]:
    """GroupNorm (+ ReLU when ``relu``) through the fused kernels, or None where they do not apply."""
    if native.applies(x):
        return GroupNormFn.apply(x, weight, bias, groups, eps, relu)
    return None


def filter_response_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tau: Optional[torch.Tensor],
                         eps) -> torch.Tensor:
    """FRN, then the TLU max(y, tau) when ``tau`` is given; ``eps`` a float or a learned tensor."""
    return FRNFn.apply(x, weight, bias, tau, eps)


def tlu(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """max(x, tau), tau per channel."""
    return TLUFn.apply(x, tau)


def evonorm_s0(x: torch.Tensor, v: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, groups: int,
               eps: float) -> torch.Tensor:
    """EvoNorm-S0 (``v`` None: group-std scaling only)."""
    return EvoNormS0Fn.apply(x, v, weight, bias, groups, eps)
