"""Model construction: ``build_model(cfg)`` returns the network a run config asks for."""
from __future__ import annotations

from torch import nn

# Schemes that replace the architecture rather than a layer: name -> builder(cfg).
# The normalizer-free ResNet registers itself here (see nf_resnet.py).
ARCH_OVERRIDES: dict = {}


def build_model(cfg) -> nn.Module:
    from normbench.models.resnet import cifar_resnet

    builder = ARCH_OVERRIDES.get(cfg.norm.kind)
    if builder is not None:
        return builder(cfg)
    return cifar_resnet(cfg)
