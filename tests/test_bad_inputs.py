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
]


@pytest.mark.parametrize("case_id, files, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case_id, files, argv, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = runner.invoke(app, args)
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert needle.replace("{tmp}", str(tmp_path)) in out, out
    assert len(out.splitlines()) == 1 and "Traceback" not in out, out


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30


def test_cuda_requested_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["train", "--dry-run", "--set", "device=cuda:0"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_bn_on_one_value_per_channel_names_the_layer():
    import torch

    from normbench.errors import UserError
    from normbench.norms.batch import BatchNorm2d

    layer = BatchNorm2d(4, layer="stage3.block2.norm2")
    with pytest.raises(UserError, match="stage3.block2.norm2 sees one value per channel"):
        layer(torch.randn(1, 4, 1, 1))
