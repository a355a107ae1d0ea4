"""Model construction: ``build_model(cfg)`` returns the network a run config asks for."""
from __future__ import annotations

from torch import nn

from normbench.models.nf_resnet import nf_resnet

# Schemes that replace the architecture rather than a layer: name -> builder(cfg). Registered
# here, on the models' side: models import normbench.norms, never the other way round.
ARCH_OVERRIDES: dict = {"nf": nf_resnet}


def build_model(cfg) -> nn.Module:
    from normbench.models.resnet import cifar_resnet

    builder = ARCH_OVERRIDES.get(cfg.norm.kind)
    if builder is not None:
        return builder(cfg)
    return cifar_resnet(cfg)
