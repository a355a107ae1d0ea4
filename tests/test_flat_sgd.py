"""FlatSGD (normbench.flat_sgd) against torch.optim.SGD, the reference it must equal."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normbench.flat_sgd import FlatSGD, flattenable


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return net.double().to(memory_format=torch.channels_last)


def groups_of(net: nn.Module) -> list[dict]:
    params = list(net.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": 5e-4},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def train(net, opt, data, set_to_none=True, lr_schedule=None):
    for i, (x, y) in enumerate(data):
        if lr_schedule:
            for group in opt.param_groups:
                group["lr"] = lr_schedule[i]
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def assert_same(net_a, net_b, opt_a, opt_b, atol=1e-12):
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)
        buf_a = opt_a.state[a].get("momentum_buffer")
        buf_b = opt_b.state[b].get("momentum_buffer")
        assert (buf_a is None) == (buf_b is None), name
        if buf_a is not None:
            torch.testing.assert_close(buf_a, buf_b, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("nesterov", [False, True])
def test_flat_sgd_equals_torch_sgd(nesterov):
    ref, flat = small_net(), small_net()
    kw = {"lr": 0.1, "momentum": 0.9, "nesterov": nesterov}
    opt_ref = torch.optim.SGD(groups_of(ref), fused=True, **kw)
    opt_flat = FlatSGD(groups_of(flat), **kw)
    data, lrs = batches(6), [0.1, 0.2, 0.05, 0.1, 0.3, 0.01]
    train(ref, opt_ref, data, lr_schedule=lrs)
    train(flat, opt_flat, data, lr_schedule=lrs)
    assert_same(ref, flat, opt_ref, opt_flat)
    # the parameters really live in the flat buffers, memory formats kept
    conv = flat[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    fg = opt_flat.flat_groups[0]
    assert fg.data.data_ptr() <= conv.data_ptr() < fg.data.data_ptr() + fg.data.numel() * 8
    assert opt_flat.flat_grads() is not None


def test_no_momentum_and_flattenable():
    ref, flat = small_net(), small_net()
    opt_ref = torch.optim.SGD(groups_of(ref), lr=0.1, momentum=0.0, fused=True)
    opt_flat = FlatSGD(groups_of(flat), lr=0.1, momentum=0.0)
    train(ref, opt_ref, batches(3))
    train(flat, opt_flat, batches(3))
    assert_same(ref, flat, opt_ref, opt_flat)
    assert not flattenable([])
    assert not flattenable([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    assert not flattenable([nn.Parameter(torch.zeros(4, 3).t())])  # neither contiguous nor channels_last


def test_state_dict_round_trip_both_ways():
    """Checkpoint after 3 steps; resume in FlatSGD and in torch's SGD: all continue alike."""
    net, ref = small_net(), small_net()
    kw = {"lr": 0.1, "momentum": 0.9}
    opt, opt_ref = FlatSGD(groups_of(net), **kw), torch.optim.SGD(groups_of(ref), fused=True, **kw)
    data = batches(6)
    train(net, opt, data[:3])
    train(ref, opt_ref, data[:3])
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())

    resumed_flat, resumed_torch = small_net(), small_net()
    resumed_flat.load_state_dict(saved_net)
    resumed_torch.load_state_dict(saved_net)
    opt_rf = FlatSGD(groups_of(resumed_flat), **kw)
    opt_rf.load_state_dict(saved_opt)
    opt_rt = torch.optim.SGD(groups_of(resumed_torch), fused=True, **kw)
    opt_rt.load_state_dict(saved_opt)
    for n, o in ((net, opt), (ref, opt_ref), (resumed_flat, opt_rf), (resumed_torch, opt_rt)):
        train(n, o, data[3:])
    assert_same(ref, net, opt_ref, opt)
    assert_same(ref, resumed_flat, opt_ref, opt_rf)
    assert_same(ref, resumed_torch, opt_ref, opt_rt)


def test_replaced_and_missing_gradients_follow_torch_semantics():
    """A gradient set to None skips its parameter (as torch's SGD does); a gradient replaced
    by another tensor is used; a momentum buffer written from outside is used."""
    ref, flat = small_net(), small_net()
    kw = {"lr": 0.1, "momentum": 0.9}
    opt_ref, opt_flat = torch.optim.SGD(groups_of(ref), fused=True, **kw), FlatSGD(groups_of(flat), **kw)
    data = batches(4)
    train(ref, opt_ref, data[:2])
    train(flat, opt_flat, data[:2])
    x, y = data[2]
    for net, opt in ((ref, opt_ref), (flat, opt_flat)):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        net[-1].bias.grad = None  # skipped this step
        net[0].weight.grad = net[0].weight.grad * 0.5  # replaced
        opt.step()
    assert_same(ref, flat, opt_ref, opt_flat)
    for net, opt in ((ref, opt_ref), (flat, opt_flat)):
        opt.state[net[3].weight]["momentum_buffer"] = torch.full_like(net[3].weight, 0.01)
    train(ref, opt_ref, data[3:])
    train(flat, opt_flat, data[3:])
    assert_same(ref, flat, opt_ref, opt_flat)
    assert opt_flat.flat_grads() is not None  # zero_grad bound every gradient to its view again


def test_training_uses_flat_sgd_and_the_clipper_reads_flat_grads(tiny_cfg):
    from normbench.training.optim import build_optimizer
    from normbench.models import build_model

    cfg = tiny_cfg(**{"clip.mode": "norm", "clip.max_norm": 0.5})
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, FlatSGD)
    assert type(build_optimizer(cfg, build_model(cfg), flat=False)) is torch.optim.SGD
    from normbench.clip import make_clipper

    clipper = make_clipper(cfg.clip, model)
    clipper.grad_source = opt.flat_grads
    opt.zero_grad()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    per_tensor = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    stats = clipper()
    torch.testing.assert_close(stats.norm, per_tensor)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    torch.testing.assert_close(after, torch.minimum(per_tensor, torch.tensor(0.5)))
