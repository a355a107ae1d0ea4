"""Measurements for a study across batch sizes: the fixed-distance landscape probe, precise BN
in the run, FRN with a ReLU in place of TLU, and all of them on packed members."""
from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from normbench.device import prepare_kernels, use_channels_last
from normbench.progress import Progress
from normbench.training import entry
from normbench.analysis.activations import activation_layers, dead_units, probe_images
from normbench.analysis.batch_stats import accuracy, precise_bn, precise_bn_batches, precise_bn_eval
from normbench.analysis.probes import (FixedProbeResult, fixed_probe, fixed_probe_tags, probe_batch, probe_model_fixed,
                                       probe_schedule)
from normbench.config import load_config
from normbench.errors import UserError
from normbench.norms.batch_renorm import BatchRenorm2d
from normbench.training.packed import train_packed
from normbench.training.packing import pack_key, pack_models, unpack_state, why_not_packable
from normbench.tracking import RunDir
from conftest import SignalAtStep

REPO = Path(__file__).resolve().parent.parent
FIXED = {"analysis.probe_mode": "fixed"}


# ----------------------------------------------------------------------------- config


def channels_last_on_cpu(cfg) -> bool:
    """The memory format a run of ``cfg`` trains in on this CPU (as normbench.device builds it)."""
    cpu = torch.device("cpu")
    return use_channels_last(cfg, cpu, prepare_kernels(cpu))


def test_committed_run_folders_keep_their_config_hash():
    """Keys added for these measurements are out of the hash while at their defaults: every
    committed run folder is still named <name>-<hash of its config.yaml>."""
    runs = sorted(p.parent for p in (REPO / "results" / "small_batch" / "runs").glob("*/config.yaml"))
    assert len(runs) >= 100
    for run in runs[::7]:  # a spread of methods, batch sizes and seeds
        cfg = load_config(run / "config.yaml")
        assert run.name == f"{cfg.run_name}-{cfg.config_hash()}", run.name
    # a non-default value of a new key is a different run
    cfg = load_config(runs[0] / "config.yaml")
    for extra in (["analysis.probe_mode=fixed"], ["analysis.precise_bn=true"], ["analysis.probes_per_run=5"],
                  ["analysis.probe_distances=[0.1]"], ["analysis.precise_bn_batch=100"]):
        assert load_config(runs[0] / "config.yaml", extra).config_hash() != cfg.config_hash(), extra
    frn = load_config(None, ["norm.kind=frn"])
    assert load_config(None, ["norm.kind=frn", "norm.frn_activation=relu"]).config_hash() != frn.config_hash()
    assert load_config(None, ["norm.kind=frn", "norm.frn_activation=tlu"]).config_hash() == frn.config_hash()


def test_new_keys_are_validated():
    cfg = load_config(None, ["analysis.probe_mode=fixed"])
    assert cfg.analysis.probe and cfg.analysis.probe_images == 512 and cfg.analysis.probes_per_run == 20
    assert not load_config(None, ["analysis.probe_mode=fixed", "analysis.probe=false"]).analysis.probe
    assert load_config(None, ["analysis.probe_distances=[0.2, 0.05]"]).analysis.probe_distances == [0.05, 0.2]
    for bad, key in ((["analysis.probe_mode=step"], "probe_mode"),
                     (["analysis.probe_distances=[0.1, 0]"], "probe_distances"),
                     (["analysis.probe_distances=[]"], "probe_distances"),
                     (["analysis.probes_per_run=0"], "probes_per_run"),
                     (["analysis.precise_bn_batch=1"], "precise_bn_batch"),
                     (["norm.frn_activation=gelu"], "frn_activation"),
                     (["norm.kind=bn", "norm.frn_activation=relu"], "frn_activation")):
        with pytest.raises(UserError, match=key):
            load_config(None, bad)


def test_probe_schedule_spreads_probes_over_the_run():
    assert probe_schedule(1000, 20)[:3] == [0, 53, 105] and probe_schedule(1000, 20)[-1] == 1000
    assert len(probe_schedule(1000, 20)) == 20
    assert probe_schedule(40, 5) == [0, 10, 20, 30, 40]
    assert probe_schedule(40, 1) == [40]
    assert probe_schedule(3, 20) == [0, 1, 2, 3]  # fewer steps than probes: every step once


# ----------------------------------------------------------------------------- the probe's maths


def _quadratic(n: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)
    return h, torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("distances", [[0.025, 0.05, 0.1, 0.2], [1e-3], [0.3, 0.01, 2.0]])
def test_fixed_probe_on_a_quadratic_is_the_curvature_along_the_gradient(distances):
    """L = 1/2 theta^T H theta + b^T theta: ||g(theta - t d) - g|| = t ||Hg|| / ||g|| at every t, so
    beta = ||Hg|| / ||g||, whatever the distances (nothing else, LR or batch, enters)."""
    h, b, theta = _quadratic()
    parts = [theta[:3].clone().requires_grad_(), theta[3:].clone().requires_grad_()]
    before = [p.detach().clone() for p in parts]
    res = fixed_probe(lambda: 0.5 * torch.cat(parts) @ h @ torch.cat(parts) + b @ torch.cat(parts), parts, distances)
    g = h @ theta + b
    ts = torch.tensor(sorted(distances), dtype=torch.float64)
    expected_beta = (h @ g).norm() / g.norm()
    assert res.beta.item() == pytest.approx(expected_beta.item(), rel=1e-10)
    torch.testing.assert_close(res.grad_dists, ts * expected_beta, rtol=1e-10, atol=0)
    assert res.linearity.item() == pytest.approx(1.0, rel=1e-9)
    assert res.grad_norm.item() == pytest.approx(g.norm().item(), rel=1e-12)
    d = g / g.norm()
    l0 = 0.5 * theta @ h @ theta + b @ theta
    torch.testing.assert_close(res.losses, torch.cat([l0.view(1), l0 - ts * g.norm() + 0.5 * ts**2 * (d @ h @ d)]),
                               rtol=1e-10, atol=1e-10)
    for p, q in zip(parts, before):
        assert torch.equal(p.detach(), q) and p.grad is None
    vec = res.vector()
    tags = fixed_probe_tags(distances)
    assert len(vec) == len(tags) and tags[2] == "probe/beta" and vec[2].item() == pytest.approx(expected_beta.item())


def test_fixed_probe_beta_is_the_least_squares_slope():
    res = FixedProbeResult(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), torch.zeros(4),
                           torch.tensor([1.0, 3.0, 4.0]), torch.tensor(1.0))
    assert res.beta.item() == pytest.approx((1 + 6 + 16) / (1 + 4 + 16))
    assert res.linearity.item() == pytest.approx((4.0 / 4) / (1.0 / 1))


def _model_with_renorm():
    torch.manual_seed(0)
    brn = BatchRenorm2d(4, momentum=0.1, warmup_epochs=0.0, r_max_epochs=1.0, d_max_epochs=1.0)
    brn.set_progress(5.0)  # r and d live: the train-mode output reads the running statistics
    model = nn.Sequential(nn.Conv2d(3, 4, 3), brn, nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        brn.running_mean.normal_(0.0, 0.3)
        brn.running_std.uniform_(0.5, 1.5)
    return model


def test_fixed_probe_leaves_model_grads_buffers_and_rng_untouched():
    model = _model_with_renorm()
    x, y = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), y).backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    first = probe_model_fixed(model, x, y, [0.01, 0.02, 0.04])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # incl. num_batches_tracked
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    assert torch.isfinite(first.vector()).all() and first.beta.item() > 0
    # every forward of the probe saw the same running statistics: the loss is one function of
    # theta, so probing again gives the same numbers, and L(theta) is that of a plain forward
    again = probe_model_fixed(model, x, y, [0.01, 0.02, 0.04])
    assert torch.equal(first.vector(), again.vector())
    with torch.no_grad():
        twin = copy.deepcopy(model)
        assert first.losses[0].item() == pytest.approx(nn.functional.cross_entropy(twin(x), y).item(), rel=1e-6)


# ----------------------------------------------------------------------------- runs


def _records(cfg, prefix=None):
    out = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in RunDir(cfg.run_dir()).read_metrics()]
    return [r for r in out if prefix is None or any(k.startswith(prefix) for k in r)]


def _weights(cfg):
    return RunDir(cfg.run_dir()).load_checkpoint()["model"]


def _solo_model(cfg, weights):
    """The model a run of ``cfg`` trains, holding ``weights`` (memory format included)."""
    from normbench.models import build_model

    fmt = torch.channels_last if channels_last_on_cpu(cfg) else torch.contiguous_format
    model = build_model(cfg).to(memory_format=fmt)
    model.load_state_dict(weights)
    return model


def _measured(**extra):
    return {**FIXED, "analysis.probes_per_run": 4, "analysis.dead_units": True, "analysis.dead_units_images": 40,
            "analysis.precise_bn": True, "analysis.precise_bn_images": 100, "analysis.precise_bn_batch": 50, **extra}


@pytest.mark.slow
def test_measurements_do_not_change_training(tiny_cfg, tmp_path):
    """Batch Renorm: its train-mode forward reads and moves the running statistics."""
    kind = "brn"
    on = tiny_cfg(**{"norm.kind": kind, "log.out_dir": str(tmp_path / "on"), **_measured()})
    off = tiny_cfg(**{"norm.kind": kind, "log.out_dir": str(tmp_path / "off"), "analysis.train_mode_eval": False})
    s_on, s_off = entry.train(on), entry.train(off)
    w_on, w_off = _weights(on), _weights(off)
    assert w_on.keys() == w_off.keys()
    for k in w_on:  # parameters and every buffer (running statistics, num_batches_tracked)
        assert torch.equal(w_on[k], w_off[k]), k
    train = [r for r in _records(on) if "train/loss" in r or "test/acc" in r]
    assert train == [r for r in _records(off) if "train/loss" in r or "test/acc" in r]
    assert s_on["final_test_acc"] == s_off["final_test_acc"]
    probes = _records(on, "probe/")
    assert [r["step"] for r in probes] == probe_schedule(20, 4) == [0, 7, 13, 20]
    assert s_on["probe_count"] == 4 and s_on["probe_mode"] == "fixed"
    betas = sorted(r["probe/beta"] for r in probes)
    assert s_on["probe_beta_median"] == pytest.approx((betas[1] + betas[2]) / 2)
    assert all(r["probe/beta"] > 0 and r["probe/grad_change_t0.2"] > r["probe/grad_change_t0.025"] > 0 for r in probes)
    assert {"test_acc_eval_mode", "test_acc_train_mode", "test_acc_precise_bn"} <= s_on.keys()
    assert s_on["precise_bn_images"] == 100 and s_on["precise_bn_batch_size"] == 50


def test_fixed_probe_is_the_same_for_every_batch_size_and_lr(tiny_cfg, tmp_path):
    """Two runs that differ in batch size and LR start from the same weights (same seed): their
    probes of those weights agree exactly; the step's size is not part of the measurement."""
    one = {**FIXED, "analysis.probes_per_run": 2, "train.epochs": 1}
    a = tiny_cfg(**{**one, "log.out_dir": str(tmp_path / "a")})
    b = tiny_cfg(**{**one, "log.out_dir": str(tmp_path / "b"), "train.batch_size": 10, "optim.lr": 0.03})
    entry.train(a)
    entry.train(b)
    pa, pb = _records(a, "probe/"), _records(b, "probe/")
    assert [r["step"] for r in pa] == [0, 10] and [r["step"] for r in pb] == [0, 20]
    assert {k: v for k, v in pa[0].items() if k.startswith("probe/")} == \
        {k: v for k, v in pb[0].items() if k.startswith("probe/")}
    assert pa[-1]["probe/beta"] != pb[-1]["probe/beta"]  # different training: different weights
    # the last record is the probe of the final weights: recomputed from the checkpoint of run a
    # with run b's data pipeline, it is the same number
    from normbench.data import Normalizer, load_cifar10

    model = _solo_model(b, _weights(a))
    data = load_cifar10(b.data, log=lambda m: None)
    x, y = probe_batch(data, Normalizer(torch.device("cpu"), channels_last_on_cpu(b)), 512)
    assert len(y) == 100  # the synthetic test set (512 asked)
    again = probe_model_fixed(model, x, y, b.analysis.probe_distances).vector().tolist()
    assert dict(zip(fixed_probe_tags(b.analysis.probe_distances), again)) == \
        {k: v for k, v in pa[-1].items() if k.startswith("probe/")}



@pytest.mark.slow
def test_fixed_probes_survive_an_interruption(tiny_cfg, tmp_path):
    extra = {**FIXED, "analysis.probes_per_run": 8, "train.log_every": 2, "norm.kind": "brn"}
    straight = tiny_cfg(**{"log.out_dir": str(tmp_path / "a"), **extra})
    broken = tiny_cfg(**{"log.out_dir": str(tmp_path / "b"), **extra})
    entry.train(straight)
    first = entry.train(broken, progress=SignalAtStep(12))
    assert first["status"] == "interrupted" and first["steps"] == 12
    ckpt = RunDir(broken.run_dir()).load_checkpoint()["analysis"]
    assert [s for s, _ in ckpt["pending_probes"]] == [11] and ckpt["last_probe_step"] == 11
    again = entry.train(broken)
    assert again["status"] == "completed"
    assert _records(straight) == _records(broken)
    assert [r["step"] for r in _records(broken, "probe/")] == probe_schedule(20, 8)


# ----------------------------------------------------------------------------- precise BN


def _direct_precise_bn_accuracy(cfg, weights, images: int, batch: int) -> tuple[float, dict]:
    """Precise BN written out: per BN layer, the mean over batches of the per-channel mean and
    unbiased variance of its input (train-mode forwards of the un-augmented first images), then
    test accuracy with those statistics."""
    from normbench.data import Normalizer, load_cifar10
    from normbench.models import build_model

    model = build_model(cfg)
    model.load_state_dict(weights)
    data = load_cifar10(cfg.data, log=lambda m: None)
    norm = Normalizer(torch.device("cpu"), False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    sums = {n: [0, 0] for n in layers}

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0].double()
            sums[name][0] = sums[name][0] + x.mean((0, 2, 3))
            sums[name][1] = sums[name][1] + x.var((0, 2, 3), unbiased=True)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    model.train()
    with torch.no_grad():
        for start in range(0, images, batch):
            model(norm(data.train_x[start:start + batch]))
    for h in handles:
        h.remove()
    k = images // batch
    stats = {}
    with torch.no_grad():
        for n, m in layers.items():
            m.running_mean.copy_(sums[n][0] / k)
            m.running_var.copy_(sums[n][1] / k)
            stats[n] = (m.running_mean.clone(), m.running_var.clone())
        model.eval()
        pred = torch.cat([model(norm(data.test_x[s:s + 25])).argmax(1) for s in range(0, len(data.test_y), 25)])
    return (pred == data.test_y).double().mean().item(), stats


def test_precise_bn_in_the_run_matches_a_direct_computation(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"log.out_dir": str(tmp_path / "bn"), "analysis.precise_bn": True, "train.epochs": 1,
                      "analysis.precise_bn_images": 150, "analysis.precise_bn_batch": 40})
    s = entry.train(cfg)
    assert s["precise_bn_images"] == 120 and s["precise_bn_batch_size"] == 40  # 3 whole batches of 40
    expected, stats = _direct_precise_bn_accuracy(cfg, _weights(cfg), 120, 40)
    assert s["test_acc_precise_bn"] == expected
    # the statistics themselves, through the library function on the trained weights
    from normbench.data import Normalizer, load_cifar10
    from normbench.models import build_model

    model = build_model(cfg)
    model.load_state_dict(_weights(cfg))
    data = load_cifar10(cfg.data, log=lambda m: None)
    batches = precise_bn_batches(data, Normalizer(torch.device("cpu"), False), 150, 40)
    twin, used = precise_bn(model, batches)
    assert used == 3
    for name, (mean, var) in stats.items():
        layer = twin.get_submodule(name)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)
    # next to the running-statistics and the train-mode accuracies; changes no other field
    assert s["test_acc_eval_mode"] == s["final_test_acc"] and s["test_acc_train_mode"] is not None
    records = _records(cfg, "gap/")
    assert any(r.get("gap/test_acc_precise_bn") == expected for r in records)


def test_precise_bn_is_none_without_running_statistics(tiny_cfg):
    from normbench.data import Normalizer, load_cifar10
    from normbench.models import build_model

    cfg = tiny_cfg(**{"norm.kind": "gn", "norm.groups": 2})
    out = precise_bn_eval(build_model(cfg), load_cifar10(cfg.data, log=lambda m: None),
                          Normalizer(torch.device("cpu"), False), 100, 50, 50)
    assert out == {"test_acc_precise_bn": None}


# ----------------------------------------------------------------------------- FRN + ReLU


def _frn_norm_act(relu: bool, channels: int = 5):
    from normbench.norms import get_scheme

    cfg = load_config(None, ["norm.kind=frn"] + (["norm.frn_activation=relu"] if relu else []))
    return get_scheme("frn").norm_act(cfg.norm, channels, True, "test")


@pytest.mark.parametrize("native_on", [True, False])
def test_frn_with_relu_is_frn_without_tlu_then_relu(monkeypatch, native_on):
    """y = gamma x / sqrt(mean_HW x^2 + eps) + beta (Singh & Krishnan 2019, Eq. 1-3), then
    max(y, 0), on the fused-kernel path and the PyTorch path, forward and backward."""
    from normbench.norms.speed import native

    if native_on and native.library() is None:
        pytest.skip("the fused kernels do not build here")
    monkeypatch.setattr(native, "ENABLED", native_on)
    torch.manual_seed(0)
    layer = _frn_norm_act(relu=True).double()
    assert layer.norm.tau is None and isinstance(layer.act, nn.ReLU)  # no TLU anywhere
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    assert native.applies(x) == native_on
    out = layer(x)
    w, b = (p.detach().clone().requires_grad_() for p in (layer.norm.weight, layer.norm.bias))
    xr = x.detach().clone().requires_grad_()
    ref = torch.relu(w.view(1, -1, 1, 1) * xr / torch.sqrt(xr.pow(2).mean((2, 3), keepdim=True) + layer.norm.eps)
                     + b.view(1, -1, 1, 1))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (out == 0).any() and (out > 0).any()
    gz = torch.randn_like(out)
    out.backward(gz)
    ref.backward(gz)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.norm.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.norm.bias.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_frn_relu_network_has_relu_floors_and_dead_units_at_zero():
    from normbench.models import build_model

    model = build_model(load_config(None, ["model.width=0.25", "norm.kind=frn", "norm.frn_activation=relu"]))
    assert not [n for n, _ in model.named_parameters() if "tau" in n]
    layers = activation_layers(model)
    assert len(layers) == 1 + 9 + 9  # stem, each block's first FRN + ReLU, each post-add ReLU
    assert all(floor == 0.0 and not isinstance(floor, torch.Tensor) for _, _, floor in layers)
    tlu = build_model(load_config(None, ["model.width=0.25", "norm.kind=frn"]))
    assert all(isinstance(floor, torch.Tensor) for _, _, floor in activation_layers(tlu))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.stem_norm_act.norm.bias[:2] = -100.0  # y < 0 everywhere: ReLU outputs its floor 0
    out = dead_units(model, x, batch_size=2)
    assert out["stem_norm_act"] == 0.5  # 2 of 4 channels
    with torch.no_grad():
        model.stem_norm_act.norm.bias[:2] = 0.0
    assert dead_units(model, x, batch_size=2)["stem_norm_act"] == 0.0


def test_frn_relu_packs_and_its_packed_forward_equals_the_members(tiny_cfg):
    from normbench.models import build_model

    cfgs = [tiny_cfg(seed=s, **{"norm.kind": "frn", "norm.frn_activation": "relu"}) for s in range(2)]
    assert why_not_packable(cfgs[0]) is None
    models = [build_model(c) for c in cfgs]
    packed = pack_models(models)
    xs = [torch.randn(4, 3, 32, 32) for _ in models]
    out = packed(torch.cat(xs, 1))
    for k, (m, x) in enumerate(zip(models, xs)):
        torch.testing.assert_close(out[:, k], m(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- packing


def test_packable_measurements(tiny_cfg):
    assert why_not_packable(tiny_cfg(**_measured())) is None
    assert "lr-mode" in why_not_packable(tiny_cfg(**{"analysis.probe": True}))
    assert "histograms" in why_not_packable(tiny_cfg(**{"analysis.hist_every": 5}))


def test_measurements_of_an_unpacked_member_equal_those_of_the_same_weights_alone(tiny_cfg):
    """Unpacking is an exact copy, so every measurement of a packed member (probe, dead units,
    precise BN, train-mode accuracy) is bit-equal to that of the same weights in a solo model."""
    from normbench.data import Normalizer, load_cifar10
    from normbench.models import build_model

    cfgs = [tiny_cfg(seed=s) for s in range(2)]
    models = [build_model(c) for c in cfgs]
    data = load_cifar10(cfgs[0].data, log=lambda m: None)
    norm = Normalizer(torch.device("cpu"), False)
    packed = pack_models(models)
    with torch.no_grad():  # move the packed weights and running statistics away from the members'
        packed.train()(torch.randn(6, 6, 32, 32))
        for p in packed.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, y = probe_batch(data, norm, 512)
    for k, cfg in enumerate(cfgs):
        member = build_model(cfg)
        member.load_state_dict(unpack_state(packed.state_dict(), member.state_dict(), k, 2))
        alone = copy.deepcopy(member)
        assert torch.equal(probe_model_fixed(member, x, y, [0.05, 0.1]).vector(),
                           probe_model_fixed(alone, x, y, [0.05, 0.1]).vector())
        xd = probe_images(data, norm, 40, 20)
        assert dead_units(member, xd, 20) == dead_units(alone, xd, 20)
        assert precise_bn_eval(member, data, norm, 100, 50, 50) == precise_bn_eval(alone, data, norm, 100, 50, 50)
        assert accuracy(member, data, norm, 20, True) == accuracy(alone, data, norm, 20, True)


@pytest.mark.slow
def test_packed_members_measure_like_runs_alone(tiny_cfg, tmp_path):
    """Each packed member is measured on its own model, unpacked from the packed network: its
    probes, dead units, precise BN and train-mode accuracy are exactly those of its weights in
    a solo model, taken at the steps a run alone takes them (the weights themselves follow the
    run alone up to rounding: tests/test_packed.py). At step 0 the weights are the same as
    alone, and so is every probe value."""
    from normbench.data import Normalizer, load_cifar10

    common = _measured()
    packed = [tiny_cfg(seed=s, **{"log.out_dir": str(tmp_path / "packed"), "log.checkpoint_every_s": 1e-6}, **common)
              for s in range(2)]
    alone = tiny_cfg(seed=1, **{"log.out_dir": str(tmp_path / "alone")}, **common)
    assert len({pack_key(c) for c in packed}) == 1 and why_not_packable(packed[0]) is None
    sa = entry.train(alone)
    sp = train_packed(packed)
    assert all(p["status"] == "completed" and p["packed_members"] == 2 for p in sp)
    ra, rp = _records(alone, "probe/"), _records(packed[1], "probe/")
    assert rp[0] == ra[0] and [r["step"] for r in rp] == [r["step"] for r in ra] == [0, 7, 13, 20]
    dead_epochs = [r["epoch"] for r in _records(packed[1], "dead/")]
    assert dead_epochs == [r["epoch"] for r in _records(alone, "dead/")] == [1, 2]
    assert sp[1].keys() - {"packed_members"} == sa.keys()
    data = load_cifar10(alone.data, log=lambda m: None)
    for cfg, summary in zip(packed, sp):
        model = _solo_model(cfg, _weights(cfg))  # the member's final weights, alone
        norm = Normalizer(torch.device("cpu"), channels_last_on_cpu(cfg))
        x, y = probe_batch(data, norm, cfg.analysis.probe_images)
        last = _records(cfg, "probe/")[-1]
        vec = probe_model_fixed(model, x, y, cfg.analysis.probe_distances).vector().tolist()
        assert dict(zip(fixed_probe_tags(cfg.analysis.probe_distances), vec)) == \
            {k: v for k, v in last.items() if k.startswith("probe/")}
        dead = dead_units(model, probe_images(data, norm, 40, 20), 20)
        assert summary["dead_unit_frac"] == dead.pop("all") and summary["dead_units_by_layer"] == dead
        pb = precise_bn_eval(model, data, norm, 100, 50, 50)
        assert summary["test_acc_precise_bn"] == pb["test_acc_precise_bn"] and summary["precise_bn_images"] == 100
        assert summary["test_acc_train_mode"] == accuracy(model, data, norm, 20, True)


@pytest.mark.slow
def test_a_packed_probe_reads_the_packed_weights_of_its_step(tiny_cfg, tmp_path):
    """Before a probe the packed network is unpacked into the members: the probe of step 3 is
    that of the packed weights after 3 packed steps, not of a member's stale own copy."""
    from normbench.data import EpochPlan, load_cifar10
    from normbench.training.loop import probe_due
    from normbench.training.packed import PackedStepper
    from normbench.training.run import Run

    cfgs = [tiny_cfg(seed=s, **{**FIXED, "analysis.probes_per_run": 21, "log.out_dir": str(tmp_path)})
            for s in range(2)]
    data = load_cifar10(cfgs[0].data, log=lambda m: None)
    members = [Run(c, RunDir(c.run_dir()), Progress(), data=data) for c in cfgs]
    assert members[0].analysis.probe_steps == list(range(21))
    packed = PackedStepper(members)
    plans = [EpochPlan(len(data.train_y), c.train.batch_size, c.seed, 0, True, torch.device("cpu")) for c in cfgs]
    for i in range(3):
        probe_due(packed)
        packed.step(plans, i)
    probe_due(packed)
    for k, (cfg, m) in enumerate(zip(cfgs, members)):
        assert [s for s, _ in m.analysis.pending_probes] == [0, 1, 2, 3]
        solo = _solo_model(cfg, unpack_state(packed.model.state_dict(), m.model.state_dict(), k, 2))
        x, y = probe_batch(data, m.normalize, 512)
        expected = probe_model_fixed(solo, x, y, cfg.analysis.probe_distances).vector()
        assert torch.equal(m.analysis.pending_probes[-1][1], expected)
        assert not torch.equal(m.analysis.pending_probes[-1][1], m.analysis.pending_probes[0][1])
