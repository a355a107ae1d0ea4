"""One run end to end: outputs, resume after a crash, divergence, skipping finished runs."""
from __future__ import annotations

import json

import pytest
import torch

from normbench.device import use_channels_last
from normbench.training import entry
from normbench.training import optim
from normbench.config import load_config
from normbench.tracking import RunDir

from conftest import KillAfterStep, SimulatedKill, run_cli, tiny_overrides



def weights(run_dir):
    return RunDir(run_dir).load_checkpoint()["model"]


def comparable_metrics(run_dir):
    return [{k: v for k, v in rec.items() if not k.startswith("perf/")} for rec in RunDir(run_dir).read_metrics()]


@pytest.mark.slow
def test_resume_after_kill_is_identical_to_uninterrupted(tiny_cfg, tmp_path):
    straight = tiny_cfg(**{"log.out_dir": str(tmp_path / "a"), "train.epochs": 3})
    killed = tiny_cfg(**{"log.out_dir": str(tmp_path / "b"), "train.epochs": 3})
    s1 = entry.train(straight)
    assert s1["status"] == "completed" and s1["steps"] == 30
    with pytest.raises(SimulatedKill):
        entry.train(killed, progress=KillAfterStep(15))  # mid epoch 2, after epoch 1's checkpoint
    assert RunDir(killed.run_dir()).load_checkpoint()["state"]["step"] == 10
    s2 = entry.train(killed)
    assert s2["status"] == "completed" and s2["steps"] == 30
    w1, w2 = weights(straight.run_dir()), weights(killed.run_dir())
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert comparable_metrics(straight.run_dir()) == comparable_metrics(killed.run_dir())
    assert s1["final_test_acc"] == s2["final_test_acc"]


@pytest.mark.slow
def test_periodic_mid_epoch_checkpoint_resumes_identically(tiny_cfg, tmp_path):
    """log.checkpoint_every_s: a kill -9 inside a long epoch loses at most that much work, and
    the resume from a mid-epoch checkpoint is bit-identical to an uninterrupted run."""
    common = {"train.epochs": 3, "train.log_every": 2, "log.checkpoint_every_s": 1e-6}
    straight = tiny_cfg(**{"log.out_dir": str(tmp_path / "a"), **common})
    killed = tiny_cfg(**{"log.out_dir": str(tmp_path / "b"), **common})
    entry.train(straight)
    with pytest.raises(SimulatedKill):
        entry.train(killed, progress=KillAfterStep(15))
    saved_at = RunDir(killed.run_dir()).load_checkpoint()["state"]["step"]
    assert 10 < saved_at < 20 and saved_at % 2 == 0  # inside epoch 2, at a log flush
    s2 = entry.train(killed)
    assert s2["status"] == "completed" and s2["steps"] == 30
    w1, w2 = weights(straight.run_dir()), weights(killed.run_dir())
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert comparable_metrics(straight.run_dir()) == comparable_metrics(killed.run_dir())


@pytest.mark.slow
@pytest.mark.parametrize("at_step", [10, 30])  # the end of epoch 1; the end of the last epoch
def test_a_signal_in_an_epochs_last_step_leaves_its_evaluation_to_the_resumed_run(tiny_cfg, tmp_path, at_step):
    """SIGTERM while the last step of an epoch is logged: the run checkpoints at the epoch
    boundary before the epoch's evaluation; the resumed run evaluates that epoch first, so
    its metrics and final accuracy equal an uninterrupted run's."""
    import os
    import signal

    from normbench.progress import Progress

    class SignalAt(Progress):
        def update(self, step, metrics):
            if step == at_step:
                os.kill(os.getpid(), signal.SIGTERM)

    straight = tiny_cfg(**{"log.out_dir": str(tmp_path / "a"), "train.epochs": 3})
    cut = tiny_cfg(**{"log.out_dir": str(tmp_path / "b"), "train.epochs": 3})
    s1 = entry.train(straight)
    stopped = entry.train(cut, progress=SignalAt())
    assert stopped["status"] == "interrupted" and stopped["steps"] == at_step
    assert not [r for r in RunDir(cut.run_dir()).read_metrics() if r["step"] == at_step and "test/acc" in r]
    s2 = entry.train(cut)
    assert s2["status"] == "completed" and s2["steps"] == 30
    assert comparable_metrics(straight.run_dir()) == comparable_metrics(cut.run_dir())
    assert s1["final_test_acc"] == s2["final_test_acc"] and s1["best_test_acc"] == s2["best_test_acc"]


def test_completed_run_is_not_trained_again(tiny_cfg):
    cfg = tiny_cfg(**{"train.epochs": 1})
    first = entry.train(cfg)
    again = entry.train(cfg)
    assert again.get("skipped") and again["final_test_acc"] == first["final_test_acc"]
    fresh = entry.train(cfg, fresh=True)
    assert not fresh.get("skipped") and fresh["final_test_acc"] == first["final_test_acc"]


def test_lr_schedule_scales_warms_up_and_decays():
    cfg = load_config(None, ["train.batch_size=32", "optim.lr=0.1", "optim.warmup_epochs=1"])
    peak = 0.1 * 32 / 128
    lrs = [optim.lr_at(cfg, s, total_steps=100, steps_per_epoch=10) for s in range(100)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak) and lrs[-1] < peak * 0.01
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_no_decay_norm_bias_groups():
    from normbench.models import build_model

    cfg = load_config(None, ["optim.no_decay_norm_bias=true"])
    opt = optim.build_optimizer(cfg, build_model(cfg))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


@pytest.mark.slow
def test_cli_end_to_end_writes_every_output(synth_root, tmp_path):
    out = tmp_path / "runs"
    sets = tiny_overrides(synth_root, out, **{"train.epochs": 2, "clip.mode": "norm", "name": "e2e"})
    args = ["train", "--no-progress"] + [a for s in sets for a in ("--set", s)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = out.iterdir()
    assert run_dir.name.startswith("e2e-")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["data_source"] == "synthetic"
    assert summary["steps"] == 20 and 0 <= summary["final_test_acc"] <= 1
    assert summary["config"]["clip"]["mode"] == "norm" and summary["clipped_frac"] is not None
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tags = set().union(*records)
    for tag in ("train/loss", "train/acc", "test/loss", "test/acc", "opt/lr", "grad/norm",
                "grad/threshold", "grad/clipped_frac", "perf/images_per_s"):
        assert tag in tags, tag
    again = run_cli(*args)
    assert again.returncode == 0 and "already completed" in again.stdout


@pytest.mark.slow
def test_absurd_lr_diverges_with_exit_1(synth_root, tmp_path):
    sets = tiny_overrides(synth_root, tmp_path / "runs", **{"optim.lr": 1e8, "optim.warmup_epochs": 0,
                                                            "train.epochs": 3, "optim.momentum": 0.0})
    proc = run_cli("train", "--no-progress", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and isinstance(summary["diverged_step"], int)
    assert "Traceback" not in proc.stderr


def test_bf16_autocast_trains_with_fp32_norm_statistics(tiny_cfg):
    summary = entry.train(tiny_cfg(**{"train.amp": "bf16", "train.epochs": 1}))
    assert summary["status"] == "completed"
    from normbench.models import build_model

    model = build_model(tiny_cfg(**{"model.width": 0.25}))
    seen = []
    model.stem_norm_act.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
    assert seen == [torch.float32]


def test_auto_compile_only_where_measured_to_pay():
    """train.compile=auto follows the measurements recorded in the registry (the
    compile_max_batch of each scheme, scripts/bench_compile.py) and compiles only runs long
    enough to amortise the compile time."""
    cpu = torch.device("cpu")

    def mode(kind: str, batch: int, steps: int = 50_000, *extra: str):
        cfg = load_config(None, [f"norm.kind={kind}", f"train.batch_size={batch}", *extra])
        return optim.compile_mode(cfg, cpu, total_steps=steps)

    compiled_up_to = {"bn": 8, "ghost_bn": 32, "brn": 2, "gn": 2, "ln": 2, "in": 32, "ws_gn": 8, "frn": 32,
                      "evonorm_s0": 0, "nf": 2, "none": 32}
    for kind, largest in compiled_up_to.items():
        for batch in (2, 8, 32, 128):
            assert mode(kind, batch) == ("default" if batch <= largest else None), (kind, batch)
    assert mode("bn", 2, optim.AUTO_COMPILE_MIN_STEPS - 1) is None  # too short to amortise
    assert mode("bn", 2, optim.AUTO_COMPILE_MIN_STEPS) == "default"
    assert mode("frn", 2, 50_000, "train.compile=none") is None
    assert mode("bn", 128, 50_000, "train.compile=default") == "default"


def test_channels_last_for_the_groupnorm_family_only_with_the_fused_kernels():
    """Every scheme trains channels_last on CPU with the fused kernels; without them (no C++
    compiler) GN/LN/IN/WS+GN/Batch Renorm fall back to NCHW, where PyTorch's kernels are fast."""
    cpu = torch.device("cpu")
    gn, bn = load_config(None, ["norm.kind=gn"]), load_config(None, ["norm.kind=bn"])
    assert use_channels_last(gn, cpu, kernels=True) and use_channels_last(bn, cpu, kernels=True)
    assert not use_channels_last(gn, cpu, kernels=False)
    assert use_channels_last(bn, cpu, kernels=False)
    assert use_channels_last(load_config(None, ["norm.kind=gn", "train.channels_last=true"]), cpu, kernels=False)


def test_a_model_is_built_after_the_kernels_are_prepared():
    """build_model_on loads the fused kernels before it chooses the memory format (an explicit
    step), so a GN model on a CPU with a compiler is channels_last."""
    from normbench.device import build_model_on
    from normbench.norms import speed

    placed = build_model_on(load_config(None, ["norm.kind=gn", "model.width=0.5"]), torch.device("cpu"))
    assert speed.kernels_available() == speed.load()
    assert placed.channels_last == speed.load()
    conv = next(m for m in placed.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=placed.memory_format)


