"""A table of bad inputs: each ends in ONE line naming the problem and exit status 2, never a
traceback. (More config-value cases are in test_config.py; this is the cross-cutting table.)"""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from normbench.cli import app

runner = CliRunner()

# (id, files to create {name: text}, argv (with {tmp} for the test folder), text the one line must contain)
CASES = [
    ("yaml-syntax", {"c.yaml": "train:\n  epochs: [1, 2\n"}, ["train", "-c", "{tmp}/c.yaml"], "line 3"),
    ("yaml-tab", {"c.yaml": "train:\n\tepochs: 2\n"}, ["train", "-c", "{tmp}/c.yaml"], "YAML syntax error"),
    ("yaml-not-mapping", {"c.yaml": "42\n"}, ["train", "-c", "{tmp}/c.yaml"], "must be a mapping"),
    ("unknown-top", {"c.yaml": "sed: 1\n"}, ["train", "-c", "{tmp}/c.yaml"], "unknown key 'sed' (did you mean 'seed'?)"),
    ("unknown-data", {}, ["train", "--set", "data.subset=10"], "unknown key 'data.subset'"),
    ("unknown-model", {}, ["train", "--set", "model.depth=20"], "unknown key 'model.depth'"),
    ("unknown-norm", {}, ["train", "--set", "norm.group=4"], "did you mean 'norm.groups'?"),
    ("unknown-optim", {}, ["train", "--set", "optim.learning_rate=0.1"], "unknown key 'optim.learning_rate'"),
    ("unknown-train", {}, ["train", "--set", "train.batchsize=4"], "did you mean 'train.batch_size'?"),
    ("unknown-clip", {}, ["train", "--set", "clip.max=1"], "unknown key 'clip.max'"),
    ("unknown-log", {}, ["train", "--set", "log.dir=x"], "unknown key 'log.dir'"),
    ("unknown-analysis", {}, ["train", "--set", "analysis.probes=1"], "unknown key 'analysis.probes'"),
    ("wrong-type-epochs", {}, ["train", "--set", "train.epochs=ten"], "train.epochs: got 'ten'"),
    ("wrong-type-lr", {}, ["train", "--set", "optim.lr=[0.1]"], "optim.lr: got [0.1]"),
    ("wrong-type-section", {"c.yaml": "train: 5\n"}, ["train", "-c", "{tmp}/c.yaml"], "train: got 5"),
    ("zero-batch", {}, ["train", "--set", "train.batch_size=0"], "train.batch_size: got 0"),
    ("negative-batch", {}, ["train", "--set", "train.batch_size=-2"], "train.batch_size: got -2"),
    ("zero-epochs", {}, ["train", "--set", "train.epochs=0"], "train.epochs: got 0"),
    ("negative-lr", {}, ["train", "--set", "optim.lr=-0.1"], "optim.lr: got -0.1"),
    ("momentum-1", {}, ["train", "--set", "optim.momentum=1.0"], "optim.momentum: got 1.0"),
    ("unknown-norm-kind", {}, ["train", "--set", "norm.kind=batch"], "norm.kind: got 'batch'"),
    ("unknown-clip-mode", {}, ["train", "--set", "clip.mode=adaptive"], "clip.mode: got 'adaptive'"),
    ("unknown-device", {}, ["train", "--set", "device=tpu"], "device: got 'tpu'"),
    ("unknown-arch", {}, ["train", "--set", "model.arch=resnet18"], "model.arch: got 'resnet18'"),
    ("gn-groups", {}, ["train", "--dry-run", "--set", "norm.kind=gn", "--set", "norm.groups=5"],
     "norm.groups=5 does not divide the 16 channels of layer stem.norm"),
    ("gn-group-size", {}, ["train", "--dry-run", "--set", "norm.kind=gn", "--set", "norm.group_size=3"],
     "norm.group_size=3 does not divide"),
    ("missing-config", {}, ["train", "-c", "{tmp}/nope.yaml"], "config file not found"),
    ("missing-base", {"c.yaml": "base: gone.yaml\n"}, ["train", "-c", "{tmp}/c.yaml"], "config file not found"),
    ("base-loop", {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, ["train", "-c", "{tmp}/a.yaml"],
     "loops back"),
    ("name-slash", {}, ["train", "--set", "name=a/b"], "name: got 'a/b'"),
    ("name-dotdot", {}, ["train", "--set", "name=..x"], "name: got '..x'"),
    ("conflicting-sets", {}, ["train", "--set", "seed=1", "--set", "seed=2"], "given twice"),
    ("set-without-equals", {}, ["train", "--set", "seed"], "expected KEY=VALUE"),
    ("set-into-value", {}, ["train", "--set", "seed.x=1"], "seed: got {'x': 1}; Input should be a valid integer"),
    ("data-root-is-a-file", {"f": "x"}, ["train", "--set", "data.root={tmp}/f/data", "--set", "device=cpu"],
     "cannot be created"),
    ("train-subset-too-small", {}, ["train", "--set", "data.train_subset=5"], "data.train_subset: got 5"),
    ("groups-and-size", {}, ["train", "--set", "norm.groups=2", "--set", "norm.group_size=2"], "not both"),
    ("probe-multipliers-empty", {}, ["train", "--set", "analysis.probe_multipliers=[]"], "analysis.probe_multipliers"),
    ("analyze-missing-run", {}, ["analyze", "{tmp}/no-run"], "{tmp}/no-run"),
    # a key given twice in one YAML mapping (plain YAML keeps the last one silently)
    ("yaml-duplicate-section", {"c.yaml": "train:\n  epochs: 3\ntrain:\n  batch_size: 4\n"},
     ["train", "-c", "{tmp}/c.yaml"], "{tmp}/c.yaml line 3: key 'train' is given twice (first at line 1)"),
    ("yaml-duplicate-nested", {"c.yaml": "seed: 1\ntrain:\n  epochs: 3\n  epochs: 4\n"},
     ["train", "-c", "{tmp}/c.yaml"], "{tmp}/c.yaml line 4: key 'epochs' is given twice (first at line 3)"),
    ("yaml-duplicate-in-base", {"b.yaml": "seed: 1\nseed: 2\n", "c.yaml": "base: b.yaml\n"},
     ["train", "-c", "{tmp}/c.yaml"], "b.yaml line 2: key 'seed' is given twice"),
    ("yaml-duplicate-in-set-value", {}, ["train", "--set", "train={epochs: 1, epochs: 2}"], "--set train: value"),
    ("sweep-duplicate-grid", {"s.yaml": "grid:\n  norm.kind: [bn]\ngrid:\n  norm.kind: [gn]\n"},
     ["sweep", "{tmp}/s.yaml", "--dry-run"], "{tmp}/s.yaml line 3: key 'grid' is given twice (first at line 1)"),
    ("sweep-duplicate-axis", {"s.yaml": "grid:\n  seed: [0]\n  seed: [1]\n"},
     ["sweep", "{tmp}/s.yaml", "--dry-run"], "{tmp}/s.yaml line 3: key 'seed' is given twice (first at line 2)"),
    # files that are not UTF-8 text
    ("config-latin-1", {"c.yaml": "# caf\xe9\nseed: 1\n".encode("latin-1")}, ["train", "-c", "{tmp}/c.yaml"],
     "{tmp}/c.yaml line 1: not UTF-8 text (byte 0xe9)"),
    ("config-latin-1-line-3", {"c.yaml": "seed: 1\n\nname: r\xe9sum\xe9\n".encode("latin-1")},
     ["train", "-c", "{tmp}/c.yaml"], "line 3: not UTF-8 text"),
    ("config-binary", {"c.yaml": bytes(range(256))}, ["train", "-c", "{tmp}/c.yaml"],
     "{tmp}/c.yaml is a binary file"),
    ("sweep-latin-1", {"s.yaml": "# \xe9\ngrid: {seed: [0]}\n".encode("latin-1")}, ["sweep", "{tmp}/s.yaml"],
     "{tmp}/s.yaml line 1: not UTF-8 text"),
    ("sweep-binary", {"s.yaml": b"\x00\x01grid"}, ["sweep", "{tmp}/s.yaml"], "{tmp}/s.yaml is a binary file"),
    # booleans, non-finite floats and out-of-range numbers
    ("bool-batch", {}, ["train", "--set", "train.batch_size=true"],
     "train.batch_size: got True; expected an integer, not a boolean"),
    ("bool-seed", {}, ["train", "--set", "seed=false"], "seed: got False; expected an integer"),
    ("bool-lr", {}, ["train", "--set", "optim.lr=true"], "optim.lr: got True; expected a number, not a boolean"),
    ("bool-optional-int", {}, ["train", "--set", "threads=true"], "threads: got True; expected an integer"),
    ("bool-in-float-list", {}, ["train", "--set", "analysis.probe_multipliers=[true, 2]"],
     "analysis.probe_multipliers: got [True, 2]; expected a list of numbers, not booleans"),
    ("bool-for-string", {}, ["train", "--set", "norm.kind=true"], "norm.kind: got True; expected a string"),
    ("sweep-bool-axis", {"s.yaml": "grid:\n  train.batch_size: [true, 2]\n"}, ["sweep", "{tmp}/s.yaml", "--dry-run"],
     "train.batch_size: got True; expected an integer, not a boolean"),
    ("lr-inf", {}, ["train", "--set", "optim.lr=.inf"], "optim.lr: got inf; Input should be a finite number"),
    ("weight-decay-inf", {}, ["train", "--set", "optim.weight_decay=.inf"], "optim.weight_decay: got inf"),
    ("clip-beta-inf", {}, ["train", "--set", "clip.beta=.inf"], "clip.beta: got inf"),
    ("eps-nan", {}, ["train", "--set", "norm.eps=.nan"], "norm.eps: got nan"),
    ("checkpoint-every-inf", {}, ["train", "--set", "log.checkpoint_every_s=.inf"], "log.checkpoint_every_s: got inf"),
    ("seed-beyond-64-bits", {}, ["train", "--dry-run", "--set", f"seed={2**64}"], f"seed: got {2**64}"),
    ("batch-1e12-int", {}, ["train", "--dry-run", "--set", "train.batch_size=1000000000000"],
     "train.batch_size: got 1000000000000"),
    ("batch-1e12-float", {}, ["train", "--dry-run", "--set", "train.batch_size=1.0e+12"],
     "train.batch_size: got 1000000000000.0"),
    ("batch-beyond-training-set", {}, ["train", "--dry-run", "--set", "train.batch_size=50001"],
     "train.batch_size: got 50001; Input should be less than or equal to 50000"),
    # a key given twice with different values, directly or through a section mapping
    ("conflict-via-section", {}, ["train", "--set", "train.epochs=1", "--set", "train={epochs: 2}"],
     "--set train.epochs given twice with different values: 1 and 2 (via --set train)"),
    ("conflict-via-section-reversed", {}, ["train", "--set", "train={epochs: 2}", "--set", "train.epochs=1"],
     "--set train.epochs given twice with different values: 2 and 1"),
    ("conflict-nested-sections", {}, ["train", "--set", "train={epochs: 2}", "--set", "train={epochs: 3}"],
     "--set train.epochs given twice with different values: 2 and 3"),
    ("conflict-bool-vs-int", {}, ["train", "--set", "seed=1", "--set", "seed=true"],
     "--set seed given twice with different values: 1 and True"),
    ("sweep-conflicting-sets", {"s.yaml": "grid: {seed: [0]}\n"},
     ["sweep", "{tmp}/s.yaml", "--dry-run", "-s", "train.epochs=1", "-s", "train={epochs: 2}"],
     "--set train.epochs given twice with different values: 1 and 2"),
    # output folders that are files or cannot be created (--dry-run included)
    ("sweep-out-dir-is-a-file", {"f": "x", "s.yaml": "out_dir: {tmp}/f\ngrid: {seed: [0]}\n"},
     ["sweep", "{tmp}/s.yaml", "--dry-run", "--no-estimate"], "sweep s.yaml out_dir: {tmp}/f is a file, not a folder"),
    ("sweep-out-dir-under-a-file", {"f": "x", "s.yaml": "out_dir: {tmp}/f/sub\ngrid: {seed: [0]}\n"},
     ["sweep", "{tmp}/s.yaml", "--dry-run", "--no-estimate"],
     "sweep s.yaml out_dir: {tmp}/f/sub cannot be created: {tmp}/f is a file"),
    ("sweep-out-flag-under-a-file", {"f": "x", "s.yaml": "grid: {seed: [0]}\n"},
     ["sweep", "{tmp}/s.yaml", "-o", "{tmp}/f/a/b"], "--out: {tmp}/f/a/b cannot be created: {tmp}/f is a file"),
    ("train-out-dir-under-a-file-dry-run", {"f": "x"}, ["train", "--dry-run", "--set", "log.out_dir={tmp}/f/runs"],
     "log.out_dir: {tmp}/f/runs cannot be created: {tmp}/f is a file"),
    ("train-out-dir-is-a-file", {"f": "x"}, ["train", "--set", "log.out_dir={tmp}/f"],
     "log.out_dir: {tmp}/f is a file, not a folder"),
    # usage errors of every command: one line, not typer's boxed panel
    ("usage-workers-0", {"s.yaml": "grid: {seed: [0]}\n"}, ["sweep", "{tmp}/s.yaml", "--workers", "0"],
     "sweep: Invalid value for '--workers' / '-w'"),
    ("usage-pack-0", {"s.yaml": "grid: {seed: [0]}\n"}, ["sweep", "{tmp}/s.yaml", "--pack", "0"],
     "sweep: Invalid value for '--pack' / '-k'"),
    ("usage-threads-negative", {"s.yaml": "grid: {seed: [0]}\n"}, ["sweep", "{tmp}/s.yaml", "-t", "-1"],
     "sweep: Invalid value for '--threads-per-worker' / '-t'"),
    ("usage-nproc-0", {}, ["train", "--nproc", "0"], "train: Invalid value for '--nproc'"),
    ("usage-unknown-flag", {}, ["train", "--epochs", "3"], "train: No such option: --epochs"),
    ("usage-missing-value", {}, ["train", "--config"], "train: Option '--config' requires an argument."),
    ("usage-missing-argument-sweep", {}, ["sweep"], "sweep: Missing argument 'SWEEP.yaml'."),
    ("usage-missing-argument-report", {}, ["report"], "report: Missing argument 'DIR'."),
    ("usage-missing-argument-analyze", {}, ["analyze"], "analyze: Missing argument"),
    ("usage-not-an-integer", {}, ["analyze", "{tmp}", "--recal-images", "many"],
     "analyze: Invalid value for '--recal-images'"),
    ("usage-data-prepare", {}, ["data", "prepare", "--root"], "data prepare: Option '--root' requires an argument."),
    ("usage-list-extra-argument", {}, ["list", "schemes"], "list: Got unexpected extra argument(s) (schemes)"),
    ("eval-no-run-folder", {}, ["eval", "{tmp}/nope"], "run folder not found: {tmp}/nope"),
    ("export-unknown-format", {}, ["export", "{tmp}", "--out", "{tmp}/o", "--format", "onnx"],
     "--format: got 'onnx'; allowed: state_dict, torchscript, export, all"),
    ("usage-unknown-command", {}, ["trian"], "No such command 'trian'."),
    ("usage-unknown-subcommand", {}, ["data", "fetch"], "data: No such command 'fetch'."),
    ("usage-unknown-top-flag", {}, ["--verbose", "train"], "normbench: error: No such option: --verbose"),
]


@pytest.mark.parametrize("case_id, files, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case_id, files, argv, needle):
    for name, text in files.items():
        if isinstance(text, bytes):
            (tmp_path / name).write_bytes(text)
        else:
            (tmp_path / name).write_text(text.replace("{tmp}", str(tmp_path)))
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = runner.invoke(app, args)
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert needle.replace("{tmp}", str(tmp_path)) in out, out
    assert len(out.splitlines()) == 1 and "Traceback" not in out, out


def _commands(group=None, path=()):
    """Every command path of the CLI, e.g. ('train',), ('data', 'prepare')."""
    import typer.main

    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, path + (name,))
        else:
            yield path + (name,)


def test_the_table_has_unique_ids_and_covers_every_command():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    covered = {tuple(a for a in case[2][:2] if not a.startswith(("-", "{"))) for case in CASES}
    missing = [" ".join(c) for c in _commands() if not any(c == cov[:len(c)] for cov in covered)]
    assert not missing, f"commands without a bad-input case: {missing}"


@pytest.mark.parametrize("command", list(_commands()), ids=" ".join)
def test_every_command_reports_an_unknown_flag_in_one_line(command):
    result = runner.invoke(app, [*command, "--no-such-flag"])
    out = result.output.strip()
    assert result.exit_code == 2, out
    name = " ".join(command)
    assert out.startswith(f"normbench: error: {name}: No such option: --no-such-flag"), out
    assert out.endswith(f"(see 'normbench {name} --help')"), out


@pytest.mark.slow
def test_usage_error_is_one_line_from_the_installed_entry_point(tmp_path):
    from conftest import run_cli

    proc = run_cli("sweep", str(tmp_path / "s.yaml"), "--workers", "0", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normbench: error: sweep: Invalid value for '--workers'"), lines


def test_bare_command_still_prints_its_help():
    result = runner.invoke(app, ["data"])
    assert "prepare" in result.output and "Usage" in result.output, result.output


def test_conflict_check_keeps_equal_values_and_merges_sections(tmp_path):
    from normbench.config import load_config, parse_overrides

    assert parse_overrides(["train.epochs=2", "train={epochs: 2, log_every: 5}", "train.epochs=2.0"]) == \
        {"train.epochs": 2, "train.log_every": 5}
    config = tmp_path / "c.yaml"
    config.write_text("train: {batch_size: 8, epochs: 3}\n")
    cfg = load_config(config, ["train={epochs: 4}"])
    assert (cfg.train.batch_size, cfg.train.epochs) == (8, 4)  # the section merges; batch_size stays
    assert load_config(config, ["train={}"]).train.batch_size == 8


def test_several_config_files_merge_left_to_right(tmp_path):
    from normbench.config import load_config

    (tmp_path / "base.yaml").write_text("optim: {lr: 0.3}\n")
    (tmp_path / "a.yaml").write_text("base: base.yaml\nseed: 3\ntrain: {epochs: 3, batch_size: 8}\n")
    (tmp_path / "b.yaml").write_text("train: {epochs: 5}\nnorm: {kind: gn}\n")
    result = runner.invoke(app, ["train", "-c", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"),
                                 "--set", "train.log_every=7", "--print-config"])
    assert result.exit_code == 0, result.output
    import yaml

    cfg = yaml.safe_load(result.output)
    assert (cfg["seed"], cfg["optim"]["lr"], cfg["norm"]["kind"]) == (3, 0.3, "gn")
    assert cfg["train"]["batch_size"] == 8 and cfg["train"]["epochs"] == 5 and cfg["train"]["log_every"] == 7
    flipped = load_config([tmp_path / "b.yaml", tmp_path / "a.yaml"])
    assert flipped.train.epochs == 3 and flipped.norm.kind == "gn"
    (tmp_path / "bad.yaml").write_text("train: {epoch: 2}\n")
    bad = runner.invoke(app, ["train", "-c", str(tmp_path / "a.yaml"), "-c", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2 and "unknown key 'train.epoch'" in bad.output and "bad.yaml" in bad.output


def test_train_help_documents_repeated_config():
    import re

    result = runner.invoke(app, ["train", "--help"])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # rich draws a box around the options
    assert "Repeatable: the files merge left to right" in text, text


def test_largest_seed_and_batch_are_accepted_and_usable(tiny_cfg):
    import torch

    from normbench.device import preflight
    from normbench.training import entry
    from normbench.config import load_config

    cfg = load_config(None, [f"seed={2**64 - 1}", "train.batch_size=50000", "optim.lr=1"])
    assert cfg.seed == 2**64 - 1 and cfg.train.batch_size == 50000 and cfg.optim.lr == 1.0
    torch.manual_seed(cfg.seed)  # the bound is what torch accepts
    entry.dry_run(tiny_cfg(seed=2**64 - 1))


def test_preflight_names_the_batch_size_when_memory_runs_out(tiny_cfg):
    import torch

    from normbench.device import preflight
    from normbench.training import entry
    from normbench.errors import UserError
    from normbench.models import build_model

    cfg = tiny_cfg()
    huge = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 10**12})})  # unvalidated
    with pytest.raises(UserError, match=r"^train\.batch_size: got 1000000000000; one forward pass .* does not fit"):
        preflight(huge, build_model(cfg), torch.device("cpu"))


def test_only_the_memory_error_becomes_a_batch_size_message(tiny_cfg):
    import torch
    from torch import nn

    from normbench.device import preflight
    from normbench.training import entry

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch in a layer")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        preflight(tiny_cfg(), Broken(), torch.device("cpu"))


def test_check_folder_creatable_creates_nothing(tmp_path):
    from normbench.errors import UserError
    from normbench.tracking import check_folder_creatable

    check_folder_creatable(tmp_path / "a" / "b", "log.out_dir")
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="^log.out_dir: .*/f/a cannot be created: .*/f is a file$"):
        check_folder_creatable(tmp_path / "f" / "a", "log.out_dir")


def test_cuda_requested_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["train", "--dry-run", "--set", "device=cuda:0"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_bn_on_one_value_per_channel_names_the_layer():
    import torch

    from normbench.errors import UserError
    from normbench.norms.batch_norm import BatchNorm2d

    layer = BatchNorm2d(4, layer="stage3.block2.norm2")
    with pytest.raises(UserError, match="stage3.block2.norm2 sees one value per channel"):
        layer(torch.randn(1, 4, 1, 1))
