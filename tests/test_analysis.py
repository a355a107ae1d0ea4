"""normbench.analysis: the landscape probe (closed form on a quadratic, no effect on training),
the train/eval gap, precise BN, dead units, `normbench analyze` and the report plots."""
from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch
from torch import nn

from normbench.analysis.activations import activation_layers, dead_units
from normbench.analysis.batch_stats import accuracy, precise_bn, train_eval_gap
from normbench.analysis.common import unwrap
from normbench.analysis.hooks import make_analysis
from normbench.analysis.probes import landscape_probe, probe_model, snapshot_buffers
from normbench.evaluation import evaluate
from normbench.training import entry
from normbench.config import load_config
from normbench.errors import UserError
from normbench.norms import NormAct
from normbench.norms.batch_renorm import BatchRenorm2d
from normbench.tracking import RunDir

from conftest import SignalAtStep, tiny_overrides


# ----------------------------------------------------------------------------- the probe's maths


def _quadratic(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)  # SPD, spread-out spectrum
    b = torch.randn(n, generator=g, dtype=torch.float64)
    theta = torch.randn(n, generator=g, dtype=torch.float64)
    return h, b, theta


def _quadratic_loss(h, b, parts):
    theta = torch.cat(parts)
    return 0.5 * theta @ h @ theta + b @ theta


def test_probe_on_a_quadratic_matches_the_closed_form():
    h, b, theta = _quadratic()
    parts = [theta[:2].clone().requires_grad_(), theta[2:].clone().requires_grad_()]  # global over params
    before = [p.detach().clone() for p in parts]
    lr, mults = 0.03, [0.5, 1.0, 2.0, 4.0]
    res = landscape_probe(lambda: _quadratic_loss(h, b, parts), parts, lr, mults)

    g = h @ theta + b
    hg = h @ g
    l0 = 0.5 * theta @ h @ theta + b @ theta
    ts = torch.tensor([0.0] + [lr * s for s in mults], dtype=torch.float64)
    expected_losses = l0 - ts * (g @ g) + 0.5 * ts**2 * (g @ hg)
    assert torch.allclose(res.losses, expected_losses, rtol=1e-10, atol=1e-10)
    assert res.loss_range.item() == pytest.approx((expected_losses.max() - expected_losses.min()).item(), rel=1e-9)
    assert res.grad_pred.item() == pytest.approx(lr * max(mults) * hg.norm().item(), rel=1e-9)
    # ||dg|| / ||dtheta|| = ||Hg|| / ||g|| for every step along g
    assert torch.allclose(res.betas, torch.full_like(res.betas, (hg.norm() / g.norm()).item()), rtol=1e-9)
    for p, q in zip(parts, before):
        assert torch.equal(p.detach(), q) and p.grad is None  # restored bit-exact, .grad untouched


def test_probe_beta_is_the_curvature_along_an_eigenvector_gradient():
    """When g is an eigenvector of H, beta = g^T H g / ||g||^2 (the curvature along g)."""
    h, _, _ = _quadratic(seed=1)
    evals, evecs = torch.linalg.eigh(h)
    theta = evecs[:, -1].clone()  # b = 0: g = H theta = lambda_max theta
    p = theta.clone().requires_grad_()
    res = landscape_probe(lambda: 0.5 * p @ h @ p, [p], lr=0.01, multipliers=[1.0, 3.0])
    g = h @ theta
    assert res.beta.item() == pytest.approx((g @ h @ g / (g @ g)).item(), rel=1e-9)
    assert res.beta.item() == pytest.approx(evals[-1].item(), rel=1e-9)


def test_probe_model_leaves_model_grads_buffers_and_rng_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    res = probe_model(model, x, y, lr=0.1, multipliers=[0.5, 1, 2], loss=loss)
    assert torch.isfinite(res.vector()).all() and res.beta.item() > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # incl. num_batches_tracked
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())


def _renorm_model():
    """Conv -> Batch Renorm (limits fully relaxed, running statistics away from the batch's) -> head,
    float64, after one training step: returns (model, x, y, loss, buffers before the step)."""
    torch.manual_seed(0)
    brn = BatchRenorm2d(4, momentum=0.1, warmup_epochs=0.0, r_max_epochs=1.0, d_max_epochs=1.0)
    brn.set_progress(5.0)  # r_max 3, d_max 5: r and d are live
    model = nn.Sequential(nn.Conv2d(3, 4, 3), brn, nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()
    with torch.no_grad():
        brn.running_mean.normal_(0.0, 0.3)
        brn.running_std.uniform_(0.5, 1.5)
    x, y = torch.randn(6, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    before = snapshot_buffers(model)
    loss = nn.functional.cross_entropy(model(x), y)  # moves the running statistics
    loss.backward()
    return model, x, y, loss, before


def test_probe_of_batch_renorm_uses_the_statistics_its_gradient_saw():
    """Batch Renorm's train-mode output reads its running statistics. With the pre-step buffers
    the probe's beta converges as the step shrinks (to ||Hg|| / ||g||); with the statistics the
    step's forward (and each probe forward) moved, ||g_s - g|| stays finite as the step goes to 0
    and beta grows like 1 / lr: the artefact the buffers argument removes."""
    model, x, y, loss, before = _renorm_model()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.buffers()))

    def beta(lr, buffers):
        return probe_model(model, x, y, lr, [1.0], loss=loss, buffers=buffers).beta.item()

    fixed = [beta(lr, before) for lr in (1e-3, 1e-5)]
    stale = [beta(lr, None) for lr in (1e-3, 1e-5)]
    assert fixed[1] == pytest.approx(fixed[0], rel=0.05)
    assert stale[1] > 30 * stale[0]
    # recomputing g and L_0 on the copy (the data-parallel path) reproduces the step's loss
    again = probe_model(model, x, y, 1e-3, [1.0], use_model_grads=False, buffers=before)
    assert again.losses[0].item() == pytest.approx(loss.item(), rel=1e-12)
    assert again.beta.item() == pytest.approx(fixed[0], rel=1e-6)


@pytest.mark.slow
def test_training_hands_the_probe_the_buffers_from_before_the_step(tiny_cfg, monkeypatch):
    from normbench.analysis import hooks

    seen = []
    real = hooks.probe_model

    def spy(model, *args, buffers=None, **kw):
        now = [b.detach().clone() for b in unwrap(model).buffers()]
        seen.append((buffers, now))
        return real(model, *args, buffers=buffers, **kw)

    monkeypatch.setattr(hooks, "probe_model", spy)
    cfg = tiny_cfg(**{"norm.kind": "brn", "analysis.probe_every": 4, "train.epochs": 1})
    entry.train(cfg)
    assert len(seen) == 3  # steps 0, 4, 8 of 10
    for buffers, now in seen:
        assert buffers is not None and len(buffers) == len(now)
        # the step's forward moved the running statistics after the snapshot was taken
        assert not all(torch.equal(a, b) for a, b in zip(buffers, now))


# ----------------------------------------------------------------------------- config and wiring


def test_config_probe_switches(tiny_cfg):
    cfg = load_config(None, ["analysis.probe_every=7"])
    assert cfg.analysis.probe and cfg.analysis.probe_every == 7
    cfg = load_config(None, ["analysis.probe=true"])
    assert cfg.analysis.probe and cfg.analysis.probe_every == 100
    assert not load_config(None, ["analysis.probe_every=null"]).analysis.probe
    with pytest.raises(UserError, match="probe_multipliers"):
        load_config(None, ["analysis.probe_multipliers=[1, -2]"])
    # nothing on: no Analysis (the step pays nothing); BN's train/eval gap alone: no per-step work
    assert make_analysis(tiny_cfg(**{"norm.kind": "gn", "norm.groups": 2}), None) is None
    assert make_analysis(tiny_cfg(**{"analysis.train_mode_eval": False}), None) is None
    bn = make_analysis(tiny_cfg(), None)
    assert bn is not None and bn.gap and not bn.wants_steps


# ----------------------------------------------------------------------------- runs


def _weights(cfg):
    return RunDir(cfg.run_dir()).load_checkpoint()["model"]


def _train_metrics(cfg):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in RunDir(cfg.run_dir()).read_metrics() if "train/loss" in r or "test/acc" in r]


@pytest.mark.slow
def test_probe_histograms_and_dead_units_do_not_change_training(tiny_cfg, tmp_path):
    on = tiny_cfg(**{"log.out_dir": str(tmp_path / "on"), "analysis.probe_every": 2, "analysis.hist_every": 3,
                     "analysis.dead_units": True, "analysis.dead_units_images": 40})
    off = tiny_cfg(**{"log.out_dir": str(tmp_path / "off"), "analysis.train_mode_eval": False})
    s_on, s_off = entry.train(on), entry.train(off)
    w_on, w_off = _weights(on), _weights(off)
    assert w_on.keys() == w_off.keys()
    for k in w_on:  # parameters and every buffer (running stats, num_batches_tracked)
        assert torch.equal(w_on[k], w_off[k]), k
    assert _train_metrics(on) == _train_metrics(off)
    assert s_on["final_test_acc"] == s_off["final_test_acc"]

    records = RunDir(on.run_dir()).read_metrics()
    probes = [r for r in records if "probe/beta" in r]
    assert [r["step"] for r in probes] == list(range(0, 20, 2))
    assert all(r["probe/loss_range"] >= 0 and r["probe/beta"] > 0 and r["probe/grad_pred"] > 0 for r in probes)
    assert all(r["probe/loss_min"] <= r["probe/loss_max"] for r in probes)
    dead = [r for r in records if "dead/all" in r]
    assert [r["epoch"] for r in dead] == [1, 2] and "dead/stem_norm_act" in dead[0]
    assert s_on["probe_count"] == 10 and s_on["probe_beta_mean"] > 0
    assert 0.0 <= s_on["dead_unit_frac"] <= 1.0 and "blocks.0.act" in s_on["dead_units_by_layer"]
    assert s_on["test_acc_train_mode"] is not None and s_off["train_eval_gap"] is None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(on.run_dir()).tb), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert "probe/beta" in acc.Tags()["scalars"] and "dead/all" in acc.Tags()["scalars"]
    hist = acc.Tags()["histograms"]
    assert "act/stem_norm_act/mean" in hist and "act/blocks.8.norm2/std" in hist
    assert [e.step for e in acc.Histograms("act/stem_norm_act/mean")] == list(range(0, 20, 3))



@pytest.mark.slow
def test_pending_probes_survive_an_interruption(tiny_cfg, tmp_path):
    extra = {"analysis.probe_every": 2, "train.log_every": 2}
    straight = tiny_cfg(**{"log.out_dir": str(tmp_path / "a"), **extra})
    broken = tiny_cfg(**{"log.out_dir": str(tmp_path / "b"), **extra})
    entry.train(straight)
    first = entry.train(broken, progress=SignalAtStep(14))
    assert first["status"] == "interrupted" and first["steps"] == 14
    pending = RunDir(broken.run_dir()).load_checkpoint()["analysis"]["pending_probes"]
    assert [s for s, _ in pending] == [10, 12]  # probed after the epoch-1 flush, not yet written
    assert entry.train(broken)["status"] == "completed"

    def records(cfg):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in RunDir(cfg.run_dir()).read_metrics()]

    assert records(straight) == records(broken)


# ----------------------------------------------------------------------------- train/eval gap


@pytest.fixture(scope="module")
def bn_b2_run(synth_root, tmp_path_factory):
    """One finished BN run at batch 2 (1 epoch of the synthetic data) with the probe on."""
    out = tmp_path_factory.mktemp("bn-b2")
    cfg = load_config(None, tiny_overrides(synth_root, out, **{"train.batch_size": 2, "train.epochs": 1,
                                                                "analysis.probe_every": 10, "optim.lr": 0.05}))
    summary = entry.train(cfg)
    assert summary["status"] == "completed"
    return cfg, summary


def test_train_eval_gap_nonzero_for_bn_at_batch_2(bn_b2_run):
    _, s = bn_b2_run
    assert s["test_acc_eval_mode"] == s["final_test_acc"]
    assert s["train_eval_gap"] == pytest.approx(s["test_acc_train_mode"] - s["test_acc_eval_mode"])
    assert s["train_eval_gap"] != 0.0


def test_train_eval_gap_zero_for_group_norm(tiny_cfg):
    from normbench.data import Normalizer, load_cifar10
    from normbench.models import build_model

    cfg = tiny_cfg(**{"norm.kind": "gn", "norm.groups": 2, "train.batch_size": 2})
    torch.manual_seed(0)
    model = build_model(cfg)
    data = load_cifar10(cfg.data, log=lambda m: None)
    result = train_eval_gap(model, data, Normalizer(torch.device("cpu"), False), 2, 50)
    assert result["train_eval_gap"] == 0.0 and result["test_acc_eval_mode"] == result["test_acc_train_mode"]


def test_train_mode_evaluation_touches_no_running_statistics(tiny_cfg):
    """evaluate(train_mode=True) restores running mean/var (it lets
    num_batches_tracked advance); analysis accuracy() runs it on a copy: nothing changes."""
    from normbench.data import Normalizer, load_cifar10
    from normbench.models import build_model

    cfg = tiny_cfg(**{"train.batch_size": 4})
    model = build_model(cfg)
    data = load_cifar10(cfg.data, log=lambda m: None)
    norm = Normalizer(torch.device("cpu"), False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, data, norm, 4, train_mode=True)
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, before[k]), k
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy(model, data, norm, 4, train_mode=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_precise_bn_is_the_cumulative_average_of_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    xs = [torch.randn(3, 3, 8, 8) * 2 + 1 for _ in range(5)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin, used = precise_bn(model, xs)
    ref = copy.deepcopy(model).train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # PyTorch's cumulative moving average
    with torch.no_grad():
        for x in xs:
            ref(x)
    assert used == 5 and not twin.training
    for (k, a), b in zip(twin.state_dict().items(), ref.state_dict().values()):
        if "running" in k:
            assert torch.allclose(a, b, atol=1e-6), k
    assert all(m.momentum == 0.1 for m in twin.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------------------- dead units


class StandInTLU(nn.Module):
    def __init__(self, tau):
        super().__init__()
        self.tau = nn.Parameter(tau)

    def forward(self, x):
        return torch.maximum(x, self.tau.view(1, -1, 1, 1))


def test_dead_units_on_a_hand_built_network():
    relu = NormAct(nn.Identity(), nn.ReLU())
    no_act = NormAct(nn.Identity(), None)  # a block's second norm: not an activation layer
    tlu = StandInTLU(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    model = nn.Sequential(relu, no_act, tlu)
    x = torch.randn(6, 4, 3, 3).abs() + 0.1  # all positive
    x[:, 0] = -x[:, 0]  # channel 0: always negative -> dead after ReLU
    x[:, 1] = 0.0  # channel 1: exactly 0 -> at ReLU's floor -> dead
    x[0, 2, 0, 0] = -5.0  # channel 2: one negative value; still alive
    # after ReLU: ch0 = 0, ch1 = 0, ch2 >= 0 (mostly > 0), ch3 > 0; TLU floors 0.5, -1, 0, 2
    x[:, 3] = x[:, 3].clamp(max=1.9)  # channel 3 stays below tau = 2 -> dead at the TLU
    names = [n for n, _, _ in activation_layers(model)]
    assert names == ["0", "2"]
    out = dead_units(model, x, batch_size=2)
    assert out["0"] == 0.5  # ReLU: channels 0 and 1
    assert out["2"] == 0.5  # TLU: ch0 (0 -> 0.5 = tau) and ch3 (<= 1.9 -> 2 = tau); ch1: 0 > tau = -1
    assert out["all"] == (2 + 2) / 8
    assert not any(m._forward_hooks for m in model.modules())  # hooks lived on a copy


def test_dead_units_floor_detection():
    from normbench.analysis.activations import activation_floor

    assert activation_floor(nn.ReLU()) == 0.0
    assert activation_floor(nn.GELU()) is None
    tau = torch.zeros(3)
    assert activation_floor(StandInTLU(tau)) is not None

    class ScaledReLU(nn.Module):
        def forward(self, x):
            return 1.7 * torch.relu(x)

    assert activation_floor(ScaledReLU()) == 0.0


def test_dead_units_see_the_tlu_floors_of_an_frn_network():
    from normbench.models import build_model
    from normbench.norms import available_norms

    if "frn" not in available_norms():
        pytest.skip("frn is not registered in this checkout")
    model = build_model(load_config(None, ["model.width=0.25", "norm.kind=frn"]))
    layers = activation_layers(model)
    assert len(layers) == 1 + 9 + 9  # stem, each block's first FRN+TLU, each post-add TLU
    assert all(isinstance(floor, torch.Tensor) for _, _, floor in layers)
    x = torch.randn(4, 3, 32, 32)
    assert dead_units(model, x, batch_size=2)["all"] < 1.0
    fused = [name for name, _, _ in layers if "norm_act" in name]
    with torch.no_grad():
        for name, _, floor in layers:
            if name in fused:
                floor.fill_(1e6)  # the fused FRN+TLU outputs are all clamped to tau (shape (C,))
    out = dead_units(model, x, batch_size=2)
    assert len(fused) == 10 and all(out[name] == 1.0 for name in fused)


# ----------------------------------------------------------------------------- analyze + report


def test_analyze_command_updates_the_summary(bn_b2_run, tmp_path):
    from typer.testing import CliRunner

    from normbench.cli import app

    cfg, trained = bn_b2_run
    run = cfg.run_dir()
    result = CliRunner().invoke(app, ["analyze", str(run), "--recalibrate", "--recal-batch-size", "10"])
    assert result.exit_code == 0, result.output
    assert "precise BN" in result.output and "train - eval gap" in result.output
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "completed" and s["final_test_acc"] == trained["final_test_acc"]  # rest kept
    assert s["test_acc_eval_mode"] == pytest.approx(trained["test_acc_eval_mode"])
    assert s["test_acc_train_mode"] == pytest.approx(trained["test_acc_train_mode"])
    assert 0.0 <= s["test_acc_precise_bn"] <= 1.0 and s["precise_bn_images"] == 200
    assert 0.0 <= s["dead_unit_frac"] <= 1.0

    bad = CliRunner().invoke(app, ["analyze", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "run folder not found" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_report_columns_and_plots(bn_b2_run, tmp_path):
    from normbench.report.analysis_plots import plots
    from normbench.report.summary_keys import summary_columns
    from normbench.tracking import read_summary

    keys = [k for k, _ in summary_columns()]
    assert {"test_acc_eval_mode", "test_acc_train_mode", "train_eval_gap", "test_acc_precise_bn",
            "dead_unit_frac"} <= set(keys)
    cfg, _ = bn_b2_run
    real = {**read_summary(cfg.run_dir() / "summary.json"), "_dir": str(cfg.run_dir())}
    fake = []
    for b, gap in ((8, 0.02), (32, 0.005)):
        conf = json.loads(json.dumps(real["config"]))
        conf["train"]["batch_size"] = b
        fake.append({"status": "completed", "config": conf, "train_eval_gap": gap,
                     "test_acc_eval_mode": 0.5, "test_acc_train_mode": 0.5 + gap})
    gn = json.loads(json.dumps(real["config"]))
    gn["norm"]["kind"] = "gn"
    fake.append({"status": "completed", "config": gn, "train_eval_gap": None})
    paths = plots([real, *fake], tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["analysis_bn_gap.png", "analysis_probe.png",
                                             "analysis_probe_vs_batch.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert plots([fake[-1]], tmp_path / "none") == []
