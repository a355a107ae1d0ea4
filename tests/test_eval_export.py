"""`normbench eval` and `normbench export`: a trained run's test accuracy from its checkpoint, and
its network as a state dict, TorchScript and a torch.export program."""
from __future__ import annotations

import json
import operator
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_overrides
from normbench.cli import app
from normbench.config import load_config
from normbench.eval_run import evaluate_run
from normbench.export import FILES, FORMATS, export_model, export_run
from normbench.models import build_model
from normbench.norms import available_norms
from normbench.tracking import RunDir
from normbench.training import entry

# torch.jit's trace / load announce their deprecation; the files are checked by running them
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

TIGHT = 1e-5  # float32 logits of an untrained-size network: programs agree to ~1e-7 (measured)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    """Two finished tiny runs (one epoch on the synthetic data): BN, and EvoNorm-S0 (which runs
    its fused kernels and channels_last on a CPU); {kind: (config, summary)}."""
    out = tmp_path_factory.mktemp("trained")
    runs = {}
    for kind, extra in (("bn", {}), ("evonorm_s0", {"norm.groups": 2})):
        cfg = load_config(None, tiny_overrides(synth_root, out, **{"norm.kind": kind, "train.epochs": 1, **extra}))
        summary = entry.train(cfg)
        assert summary["status"] == "completed"
        runs[kind] = (cfg, summary)
    return runs


def copy_run(trained, kind: str, tmp_path):
    """A copy of a trained run's folder (to damage)."""
    cfg, _ = trained[kind]
    dest = tmp_path / cfg.run_dir().name
    shutil.copytree(cfg.run_dir(), dest)
    return dest


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("kind", ["bn", "evonorm_s0"])
def test_eval_equals_the_summary_final_accuracy_exactly(trained, kind):
    cfg, summary = trained[kind]
    result = evaluate_run(cfg.run_dir(), log=lambda m: None)
    running = result["results"]["running"]
    assert running["acc"] == summary["final_test_acc"]
    assert running["loss"] == summary["final_test_loss"]
    assert running["images"] == 100 and running["batch_size"] == cfg.train.eval_batch_size
    assert result["final_weights"] and result["step"] == summary["steps"] == result["total_steps"]
    assert result["data_matches_run"] is True and result["summary_final_test_acc"] == summary["final_test_acc"]


def test_eval_cli_text_and_json_in_both_modes(trained):
    cfg, summary = trained["bn"]
    text = invoke("eval", cfg.run_dir(), "--mode", "both")
    assert text.exit_code == 0, text.output
    percent = f"{100 * summary['final_test_acc']:.2f}%"
    assert f"eval mode (running statistics), batch 500: {percent} of 100 images in" in text.output
    assert "train mode (each batch's own statistics), batch 20:" in text.output
    assert "final weights (completed)" in text.output and "the run's data" in text.output

    js = invoke("eval", cfg.run_dir(), "--mode", "train", "--batch-size", "30", "--json")
    assert js.exit_code == 0, js.output
    result = json.loads(js.output)
    assert list(result["results"]) == ["train"]
    train = result["results"]["train"]
    assert train["images"] == 90 and train["batch_size"] == 30  # full batches of 30 only
    assert 0 <= train["acc"] <= 1 and train["acc_percent"] == pytest.approx(100 * train["acc"])
    assert train["seconds"] > 0


def test_eval_on_another_data_root_says_so(trained, tmp_path):
    from normbench.data import synthetic_cifar

    cfg, _ = trained["bn"]
    other = tmp_path / "other-data"
    synthetic_cifar(other, n_train=50, n_test=40, seed=7)
    result = evaluate_run(cfg.run_dir(), data_root=other, log=lambda m: None)
    assert result["data_matches_run"] is False and result["data_root"] == str(other)
    assert result["results"]["running"]["images"] == 40
    text = invoke("eval", cfg.run_dir(), "--data-root", other)
    assert text.exit_code == 0 and "NOT the data the run was trained on" in text.output


@pytest.mark.slow
def test_eval_of_packed_members(synth_root, tmp_path):
    """A packed member's folder holds its own weights (unpacked at every checkpoint). Its summary
    was measured on the packed network, whose grouped convolutions round differently: equal up
    to an image that rounding may flip."""
    from normbench.training.packed import train_packed

    cfgs = [load_config(None, tiny_overrides(synth_root, tmp_path / "runs", **{"seed": s, "train.epochs": 1}))
            for s in range(2)]
    for cfg, summary in zip(cfgs, train_packed(cfgs)):
        assert summary["packed_members"] == 2
        result = evaluate_run(cfg.run_dir(), log=lambda m: None)
        assert result["final_weights"]
        assert result["results"]["running"]["acc"] == pytest.approx(summary["final_test_acc"], abs=0.011)


def test_eval_bad_inputs_are_one_line_with_exit_2(trained, tmp_path):
    bn_cfg, _ = trained["bn"]
    evo_cfg, _ = trained["evonorm_s0"]
    assert_one_line_error(invoke("eval", tmp_path / "nope"), "run folder not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("eval", tmp_path / "empty"), "not a run folder (no config.yaml)")
    assert_one_line_error(invoke("eval", bn_cfg.run_dir(), "--mode", "best"), "--mode", "running, train, both")

    no_ckpt = tmp_path / "no-ckpt"
    no_ckpt.mkdir()
    shutil.copy(bn_cfg.run_dir() / "config.yaml", no_ckpt)
    assert_one_line_error(invoke("eval", no_ckpt), "has no checkpoint.pt")

    corrupt = copy_run(trained, "bn", tmp_path / "corrupt")
    blob = (corrupt / "checkpoint.pt").read_bytes()
    (corrupt / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    assert_one_line_error(invoke("eval", corrupt), "checkpoint.pt is corrupt")

    summary_broken = copy_run(trained, "bn", tmp_path / "summary")
    (summary_broken / "summary.json").write_text("{not json")
    assert_one_line_error(invoke("eval", summary_broken), "summary", "is corrupt")

    swapped = copy_run(trained, "bn", tmp_path / "swapped")  # another config's checkpoint put in its place
    shutil.copy(evo_cfg.run_dir() / "checkpoint.pt", swapped / "checkpoint.pt")
    assert_one_line_error(invoke("eval", swapped), "does not fit the model", "another config")
    assert_one_line_error(invoke("eval", bn_cfg.run_dir(), "--checkpoint", evo_cfg.run_dir() / "checkpoint.pt"),
                          "--checkpoint", "belongs to another config")
    assert_one_line_error(invoke("eval", bn_cfg.run_dir(), "--checkpoint", tmp_path / "missing.pt"),
                          "--checkpoint: file not found")

    edited = copy_run(trained, "bn", tmp_path / "edited")  # same shapes, another config
    text = (edited / "config.yaml").read_text()
    assert "eps: null" in text
    (edited / "config.yaml").write_text(text.replace("eps: null", "eps: 0.001", 1))
    assert_one_line_error(invoke("eval", edited), "is not the config this run was trained with")

    stale = copy_run(trained, "bn", tmp_path / "stale")  # a completed run whose checkpoint is not its last
    state = RunDir(stale).load_checkpoint()
    state["state"]["step"] = 3
    RunDir(stale).save_checkpoint(state)
    assert_one_line_error(invoke("eval", stale), "at step 3", "not this run's final checkpoint")


# ----------------------------------------------------------------------------- export


def test_export_cli_writes_every_file_and_they_round_trip(trained, tmp_path):
    cfg, summary = trained["evonorm_s0"]
    out = tmp_path / "exported"
    result = invoke("export", cfg.run_dir(), "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("model.pt", "model.torchscript.pt", "model.pt2", "config.yaml", "export.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["scheme"] == "evonorm_s0" and manifest["final_test_acc"] == summary["final_test_acc"]
    assert manifest["normbench_version"] and "git_commit" in manifest and manifest["final_weights"]
    assert set(manifest["formats"]) == set(FORMATS)
    assert all("error" not in r and r["max_abs_diff"] <= TIGHT for r in manifest["formats"].values())
    exported_cfg = load_config(out / "config.yaml")
    assert exported_cfg.config_hash() == cfg.config_hash()

    trained_net = build_model(cfg)
    trained_net.load_state_dict(RunDir(cfg.run_dir()).load_checkpoint()["model"])
    plain = build_model(exported_cfg)
    plain.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = trained_net.eval()(x)
        assert torch.equal(plain.eval()(x), ref)
        scripted = torch.jit.load(out / "model.torchscript.pt")
        program = torch.export.load(out / "model.pt2").module()
        assert (scripted(x) - ref).abs().max() <= TIGHT
        assert (program(x) - ref).abs().max() <= TIGHT


def test_a_format_that_fails_is_one_line_and_the_others_are_written(trained, tmp_path, monkeypatch):
    import normbench.export as ex

    def broken(model):
        raise RuntimeError("cannot record this network\nsecond line")

    monkeypatch.setattr(ex, "torchscript_blob", broken)
    cfg, _ = trained["bn"]
    out = tmp_path / "partial"
    out.mkdir()
    (out / "model.torchscript.pt").write_bytes(b"an earlier export's file")
    result = CliRunner().invoke(app, ["export", str(cfg.run_dir()), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "torchscript: model.torchscript.pt not written for bn: RuntimeError: cannot record this network" \
        in result.output and "second line" not in result.output
    assert (out / "model.pt").is_file() and (out / "model.pt2").is_file()
    assert not (out / "model.torchscript.pt").exists()  # not left beside this export's files
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["formats"]["torchscript"] == {"error": "RuntimeError: cannot record this network"}


def test_export_bad_inputs_are_one_line_with_exit_2(trained, tmp_path):
    cfg, _ = trained["bn"]
    assert_one_line_error(invoke("export", cfg.run_dir(), "--out", tmp_path / "o", "--format", "onnx"),
                          "--format", "onnx", "state_dict, torchscript, export")
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(invoke("export", cfg.run_dir(), "--out", tmp_path / "a-file"), "--out", "is a file")
    assert_one_line_error(invoke("export", tmp_path / "nope", "--out", tmp_path / "o"), "run folder not found")
    assert_one_line_error(invoke("export", cfg.run_dir(), "--out", cfg.run_dir()), "is the run folder")
    assert not (tmp_path / "o").exists()


def test_export_run_selects_formats(trained, tmp_path):
    cfg, _ = trained["bn"]
    manifest = export_run(cfg.run_dir(), tmp_path / "sd", ["state_dict"])
    assert list(manifest["formats"]) == ["state_dict"]
    assert sorted(p.name for p in (tmp_path / "sd").iterdir()) == ["config.yaml", "export.json", "model.pt"]


def perturbed_model(kind: str) -> torch.nn.Module:
    """A network of the scheme whose parameters and running statistics are all away from their
    initial values (so that every term of the eval-mode forward shows in its output)."""
    cfg = load_config(None, [f"norm.kind={kind}", "model.width=0.5", "device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = 0.1 * torch.randn(t.shape, generator=g)
            if "running_var" in name or "running_std" in name:
                t.copy_(1.0 + noise.abs())
            else:
                t.add_(noise)
    return model.eval(), cfg


FAST_SCHEMES = {"bn", "frn"}  # evonorm_s0: the export CLI test above records a trained one


@pytest.mark.parametrize("kind", [k if k in FAST_SCHEMES else pytest.param(k, marks=pytest.mark.slow)
                                  for k in available_norms()])
def test_every_scheme_exports_in_every_format(kind, tmp_path):
    from normbench.norms.speed import native

    model, cfg = perturbed_model(kind)
    native_before = native.ENABLED
    results = export_model(model, lambda: build_model(cfg), tmp_path, FORMATS,
                           lambda path, blob: path.write_bytes(blob))
    assert native.ENABLED == native_before
    assert all("error" not in results[f] for f in FORMATS), results
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # neither recorded nor checked size
    with torch.no_grad():
        ref = model(x)
        fresh = build_model(cfg)
        fresh.load_state_dict(torch.load(tmp_path / FILES["state_dict"], weights_only=True))
        assert torch.equal(fresh.eval()(x), ref)
        scripted = torch.jit.load(tmp_path / FILES["torchscript"])
        assert (scripted(x) - ref).abs().max() <= TIGHT
        program = torch.export.load(tmp_path / FILES["export"])
        assert (program.module()(x) - ref).abs().max() <= TIGHT
    # PyTorch operators only: no Python call (a custom autograd Function), no C++ kernel
    assert "PythonOp" not in str(scripted.inlined_graph)
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls and all(isinstance(t, torch._ops.OpOverload) or t is operator.getitem for t in calls), calls


# ----------------------------------------------------------------------------- the recording branch


def layers_with_a_recording_branch():
    from normbench.norms.evonorm import EvoNormS0
    from normbench.norms.filter_response import TLU, FilterResponseNorm2d

    return {"evonorm_s0": EvoNormS0(8, groups=2), "evonorm_s0 no act": EvoNormS0(8, groups=2, apply_act=False),
            "frn+tlu": FilterResponseNorm2d(8), "frn learned eps": FilterResponseNorm2d(8, learn_eps=True, tlu=False),
            "tlu": TLU(8)}


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_recorded_layers_compute_the_eager_function_in_float64(native_on, channels_last, monkeypatch):
    """While recorded, EvoNorm-S0, FRN and TLU run their plain-PyTorch reference; in float64 it
    is the eager (training) path's function to rounding, with the kernels on and off."""
    from normbench.norms.speed import native

    monkeypatch.setattr(native, "ENABLED", native_on)
    g = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name, layer in layers_with_a_recording_branch().items():
        layer = layer.double().eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            x = (3.0 * torch.randn(4, 8, 6, 6, generator=g, dtype=torch.float64) + 1.0).contiguous(memory_format=fmt)
            eager = layer(x)
            traced = torch.jit.trace(layer, x, check_trace=False)(x)
        assert (traced - eager).abs().max() <= 1e-12, name


def test_the_training_path_does_not_take_the_recording_branch():
    """Eager calls and torch.compile see recording() False: training runs the speed path."""
    from normbench.norms import speed
    from normbench.norms.evonorm import EvoNormS0
    from normbench.norms.tracing import recording

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(recording())
            return x + 1

    probe, x = Probe(), torch.randn(2, 3)
    probe(x)
    torch.compile(probe, backend="eager")(x)
    torch.jit.trace(probe, x, check_trace=False)
    assert seen == [False, False, True]

    layer = EvoNormS0(8, groups=2)
    x = torch.randn(3, 8, 5, 5)
    assert torch.equal(layer(x), speed.evonorm_s0(x, layer.v, layer.weight, layer.bias, 2, layer.eps))


def test_help_ends_with_an_example():
    for command in ("eval", "export"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        tail = [line.strip() for line in result.output.strip().splitlines()][-2:]
        assert any(line.startswith(f"Example: normbench {command} ") for line in tail), tail
