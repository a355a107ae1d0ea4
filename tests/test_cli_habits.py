"""Habits every command of the command line keeps: shell completion, flags with a fixed set of
values list it, each --help ends with an example, train's --out / --device, the one line that
says what a bare `normbench train` trains, and the version in every summary."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

import normbench
from normbench.cli import app
from normbench.recipe_files import BASE_RECIPE, method_names, sweep_names

from conftest import tiny_overrides

runner = CliRunner()
WIDE = {"COLUMNS": "250"}


def invoke(*args, **kw):
    return runner.invoke(app, list(args), prog_name="normbench", **kw)


def complete(words: str) -> list[str]:
    """What bash completion offers for the last of ``words``."""
    parts = words.split(" ")
    result = invoke(env={"_NORMBENCH_COMPLETE": "complete_bash", "COMP_WORDS": words,
                         "COMP_CWORD": str(len(parts) - 1)})
    return result.output.split()


def test_root_help_offers_shell_completion():
    out = invoke("--help", env=WIDE).output
    assert "--install-completion" in out and "--show-completion" in out


def test_show_completion_prints_a_script_for_normbench(monkeypatch):
    # typer detects the user's shell from the process tree, which a test worker may not have;
    # its documented switch makes --show-completion take the shell by name instead
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = invoke("--show-completion", "bash")
    assert result.exit_code == 0, result.output
    assert "_NORMBENCH_COMPLETE=complete_bash" in result.output and "complete " in result.output


def test_completion_offers_methods_sweeps_devices_and_commands():
    assert complete("normbench train --method g") == ["ghost_bn", "gn"]
    assert complete("normbench sweep qu") == [n for n in sweep_names() if n.startswith("qu")] == ["quick"]
    assert complete("normbench train --device c") == ["cpu", "cuda"]
    assert complete("normbench sweep x --backend ") == ["local", "ray"]
    assert "list" in complete("normbench l")


def test_usage_errors_stay_one_line_with_completion_on():
    result = invoke("--show-completions", "bash")
    out = result.output.strip()
    assert result.exit_code == 2 and len(out.splitlines()) == 1, out
    assert out.startswith("normbench: error: No such option: --show-completions"), out
    result = invoke("sweep", "quick", "--backend", "spark")
    out = result.output.strip()
    assert result.exit_code == 2 and len(out.splitlines()) == 1, out
    assert "Invalid value for '--backend'" in out and "'local', 'ray'" in out, out


def _every_command(group=None, prefix=()):
    """Every command and command group the executable registers, found from the app itself."""
    import typer.main

    from normbench.cli.program import app

    group = group or typer.main.get_command(app)
    found = [list(prefix)]
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            found += _every_command(command, (*prefix, name))
        else:
            found.append([*prefix, name])
    return found


@pytest.mark.parametrize("command", _every_command(), ids=lambda c: " ".join(c) or "normbench")
def test_every_help_ends_with_an_example(command):
    result = invoke(*command, "--help", env=WIDE)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1].strip()
    assert last.startswith("Example: normbench " + " ".join(command)), last


def test_the_train_example_is_a_valid_command():
    example = invoke("train", "--help", env=WIDE).output.strip().splitlines()[-1].split("Example: normbench ")[1]
    result = invoke(*example.split(), "--print-config")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["norm"]["kind"] == "gn" and cfg["train"]["batch_size"] == 8


def test_fixed_choices_are_listed_in_help():
    assert "<" + "|".join(method_names()) + ">" in invoke("train", "--help", env=WIDE).output
    sweep_help = invoke("sweep", "--help", env=WIDE).output
    assert "<local|ray>" in sweep_help and "auto|cpu|cuda|cuda:N|mps" in sweep_help


def test_train_out_and_device_set_their_keys(tmp_path):
    result = invoke("train", "--out", str(tmp_path / "o"), "--device", "cpu", "--print-config")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["log"]["out_dir"] == str(tmp_path / "o") and cfg["device"] == "cpu"
    cfg = yaml.safe_load(invoke("train", "--out", "123", "--print-config").output)
    assert cfg["log"]["out_dir"] == "123"  # a folder name, never read as YAML
    agree = invoke("train", "--device", "cpu", "--set", "device=cpu", "--print-config")
    assert agree.exit_code == 0 and yaml.safe_load(agree.output)["device"] == "cpu"


@pytest.mark.parametrize("argv, needle", [
    (["train", "--device", "cpu", "--set", "device=mps"], "--device cpu and --set device=mps disagree"),
    (["train", "--out", "a", "--set", "log.out_dir=b"], "--out a and --set log.out_dir=b disagree"),
    (["train", "--device", "tpu"], "device: got 'tpu'; allowed: auto, cpu, cuda, cuda:N, mps"),
    (["sweep", "quick", "--dry-run", "--device", "cpu", "--set", "device=cuda"],
     "--device cpu and --set device=cuda disagree"),
])
def test_flag_and_key_mistakes_are_one_line(argv, needle):
    result = invoke(*argv)
    out = result.output.strip()
    assert result.exit_code == 2 and len(out.splitlines()) == 1, out
    assert needle in out, out


def test_train_out_names_the_flag_when_it_cannot_be_used(tmp_path):
    (tmp_path / "f").write_text("x")
    result = invoke("train", "--out", str(tmp_path / "f"), "--device", "cpu")
    assert result.exit_code == 2 and f"--out: {tmp_path / 'f'} is a file" in result.output, result.output


def test_sweep_device_reaches_every_cell(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"out_dir: {tmp_path / 'out'}\nset: {{model.width: 0.25}}\ngrid: {{seed: [0, 1]}}\n")
    assert invoke("sweep", str(sweep), "--dry-run", "--no-estimate", "--device", "cpu").exit_code == 0
    result = invoke("sweep", str(sweep), "--dry-run", "--no-estimate", "--device", "cuda")
    assert result.exit_code == 2 and "CUDA" in result.output, result.output


def test_bare_train_says_which_recipe_it_trains():
    result = invoke("train", "--dry-run", "--set", "device=cpu", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if "no --config or --method" in l)
    assert ("training the base recipe (ResNet-20, BN, batch 128, 3 epochs, lr 0.1 at batch 128 cosine, "
            "the full training set, device cpu)") in line, line
    for argv in (["--method", "bn"], ["--config", str(BASE_RECIPE)]):
        other = invoke("train", *argv, "--dry-run", "--set", "device=cpu")
        assert other.exit_code == 0 and "no --config or --method" not in other.output, other.output
    printed = invoke("train", "--print-config")
    assert "no --config" not in printed.output and yaml.safe_load(printed.output)["train"]["epochs"] == 30


def test_bare_train_trains_the_base_recipe_says_so_once_and_records_the_version(synth_root, tmp_path):
    from normbench.report.runs import collect
    from normbench.sweep.state import judge_run
    from normbench.config import load_config

    out = tmp_path / "runs"
    sets = tiny_overrides(synth_root, out, **{"train.epochs": 1})
    result = invoke("train", "--no-progress", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    assert result.output.count("no --config or --method: training the base recipe (ResNet-20 width 0.25") == 1
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["normbench_version"] == normbench.__version__ and "git_commit" in summary
    # another normbench version's summary is the same run and the same method, not another one
    copy = tmp_path / "runs2" / run_dir.name
    shutil.copytree(run_dir, copy)
    summary["normbench_version"] = "0.0.1"
    (copy / "summary.json").write_text(json.dumps(summary))
    runs = collect(tmp_path)
    assert len(runs) == 2 and len({r.method for r in runs}) == 1 and len({r.label for r in runs}) == 1
    cfg = load_config([BASE_RECIPE], tiny_overrides(synth_root, copy.parent, **{"train.epochs": 1}))
    assert cfg.run_dir() == copy and judge_run(cfg).state == "done"
