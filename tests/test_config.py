"""Config loading, overrides and every error path: one line naming the key, exit status 2."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from normbench.cli import app
from normbench.config import load_config, parse_overrides
from normbench.errors import UserError

from conftest import REPO

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_base_chain(tmp_path):
    write(tmp_path, "norm: {kind: gn}\ntrain: {batch_size: 4}\n", "base.yaml")
    child = write(tmp_path, "base: base.yaml\ntrain: {epochs: 3}\n")
    cfg = load_config(child, ["seed=7"])
    assert (cfg.norm.kind, cfg.train.batch_size, cfg.train.epochs, cfg.seed) == ("gn", 4, 3, 7)
    assert cfg.run_name == "gn-b4"


def test_set_values_are_yaml():
    assert parse_overrides(["a.b=1", "c=[1, 2]", "d=true", "e=gn", "f="]) == \
        {"a.b": 1, "c": [1, 2], "d": True, "e": "gn", "f": None}


def test_hash_ignores_log_and_name_but_not_results():
    a = load_config(None, ["name=x", "log.out_dir=/a"])
    b = load_config(None, ["name=y", "log.out_dir=/b", "threads=1"])
    c = load_config(None, ["seed=1"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


@pytest.mark.parametrize("sets, needle", [
    (["norm.knd=gn"], "unknown key 'norm.knd' (did you mean 'norm.kind'?)"),
    (["trian.epochs=2"], "unknown key 'trian' (did you mean 'train'?)"),
    (["train.batch_size=0"], "train.batch_size: got 0"),
    (["train.batch_size=-4"], "train.batch_size: got -4"),
    (["train.epochs=0"], "train.epochs: got 0"),
    (["train.batch_size=two"], "train.batch_size: got 'two'"),
    (["norm.kind=batchnorm"], "norm.kind: got 'batchnorm'; unknown norm 'batchnorm'"),
    (["clip.mode=nrm"], "clip.mode: got 'nrm'; allowed: 'none', 'norm'"),
    (["model.arch=resnet21"], "model.arch: got 'resnet21'"),
    (["device=gpu"], "device: got 'gpu'; allowed: auto, cpu, cuda, cuda:N, mps"),
    (["name=../evil"], "name: got '../evil'"),
    (["name=a/b"], "name: got 'a/b'"),
    (["norm.groups=4", "norm.group_size=2"], "not both"),
    (["seed=1", "seed=2"], "--set seed given twice with different values"),
    (["train=3", "train.epochs=2"], "'train' is a value, not a section"),
    (["=3"], "expected KEY=VALUE"),
    (["optim.lr=[1"], "not valid YAML"),
])
def test_bad_values_are_one_line_exit_2(sets, needle):
    args = ["train", "--print-config"]
    for s in sets:
        args += ["--set", s]
    code, out = cli(*args)
    assert code == 2, out
    assert needle in out, out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out


def test_groups_not_dividing_a_layer_names_the_layer():
    code, out = cli("train", "--dry-run", "--set", "norm.kind=gn", "--set", "norm.groups=3", "--set", "device=cpu")
    assert code == 2 and "norm.groups=3 does not divide the 16 channels of layer stem.norm" in out


def test_missing_file_and_yaml_syntax_error(tmp_path):
    code, out = cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in out
    bad = write(tmp_path, "norm:\n  kind: gn\n train: {epochs: 2\n")
    code, out = cli("train", "--config", str(bad))
    assert code == 2 and "YAML syntax error" in out and "line 3" in out, out
    listy = write(tmp_path, "- a\n- b\n", "list.yaml")
    code, out = cli("train", "--config", str(listy))
    assert code == 2 and "must be a mapping" in out


def test_cuda_on_a_machine_without_it():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out = cli("train", "--dry-run", "--set", "device=cuda")
    assert code == 2 and "CUDA is not available" in out


def test_print_config_and_dry_run():
    code, out = cli("train", "--print-config", "--set", "norm.kind=gn")
    assert code == 0 and "kind: gn" in out
    code, out = cli("train", "--dry-run", "--set", "device=cpu")
    assert code == 0 and "269,722 parameters" in out


def test_help_is_fast_and_does_not_import_torch():
    """--help costs little CPU because it imports none of the heavy modules. Measured in CPU
    seconds, not wall time: on a busy machine (a study training, parallel test workers) the
    wall time grows with the contention, the work does not."""
    import resource

    code = ("import sys, time; t=time.process_time(); sys.argv=['normbench','--help']\n"
            "from normbench.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
            "print('CPU', time.process_time()-t)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0, out.stderr
    whole = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert whole < 1.5  # interpreter start included; the import + help itself is below:
    assert float(out.stdout.split("CPU")[-1]) < 0.5
