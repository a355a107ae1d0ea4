"""Whether a model is being recorded into a program (``torch.jit.trace`` or ``torch.export``).

The layers whose speed path is a hand-written autograd Function (FRN, TLU, EvoNorm-S0) compute
their plain-PyTorch reference maths while recorded: ``torch.jit.trace`` records such a Function
as a Python call that ``torch.jit.save`` refuses, and the primitives behind it keep a cache of
constant tensors keyed by shape (normbench.norms.speed.functional), which ``torch.export``
cannot key by a symbolic batch size and would fill with its fake tensors. Eager training and
``torch.compile`` (which is not ``torch.export``) never see :func:`recording` return True, so
their paths, and results, are unchanged.
"""
from __future__ import annotations

import torch


def recording() -> bool:
    """True inside ``torch.jit.trace`` and ``torch.export``; False in eager code and under
    ``torch.compile``."""
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    return bool(is_exporting is not None and is_exporting())
