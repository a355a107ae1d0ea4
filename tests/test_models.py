"""The CIFAR ResNets: sizes, shapes, registry plumbing."""
from __future__ import annotations

import pytest
import torch

from normbench.config import load_config
from normbench.models import build_model
from normbench.norms import available_norms


@pytest.mark.parametrize("arch, blocks", [("resnet20", 9), ("resnet32", 15), ("resnet56", 27)])
def test_depths(arch, blocks):
    model = build_model(load_config(None, [f"model.arch={arch}"]))
    assert len(model.blocks) == blocks
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_resnet20_has_027m_parameters():
    n = sum(p.numel() for p in build_model(load_config(None, [])).parameters())
    assert 0.26e6 < n < 0.28e6  # He et al. 2016: 0.27 M


def test_width_multiplier_and_no_conv_bias():
    model = build_model(load_config(None, ["model.width=2"]))
    assert model.fc.in_features == 128
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_zero_init_last():
    model = build_model(load_config(None, ["norm.zero_init_last=true"]))
    assert all(float(b.norm2.norm.weight.detach().abs().sum()) == 0 for b in model.blocks)


@pytest.mark.parametrize("kind", available_norms())
def test_every_parameter_gets_a_gradient_every_step(kind):
    """FlatSGD zeroes gradients instead of setting them to None (normbench.flat_sgd), which
    equals torch's SGD only if every parameter takes part in every step."""
    torch.manual_seed(0)
    model = build_model(load_config(None, [f"norm.kind={kind}", "model.width=0.5"]))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("kind", available_norms())
def test_batch_dependent_schemes_are_exactly_those_with_running_statistics(kind):
    """The sweep's estimate decides from the config (``batch_dependent``) which cells get a
    train-mode evaluation and precise BN; the run decides from the model's buffers. They
    must agree for every scheme."""
    from normbench.norms import get_scheme
    from normbench.training.phases import has_running_stats

    model = build_model(load_config(None, [f"norm.kind={kind}", "model.width=0.5"]))
    assert has_running_stats(model) == get_scheme(kind).batch_dependent
