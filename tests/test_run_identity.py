"""A run folder holds one run: made on known data, trained by one process at a time, and left
behind only by a run that actually started.

* the data a run was trained on (source and a fingerprint of its files) is recorded in the
  summary and the checkpoint; a result or checkpoint made on other data is refused in one
  line by `train` and by `sweep` alike, never reused;
* `train` takes the same per-run lock as the sweep: a run held by another process is refused
  naming the holder, or waited for with --wait;
* a sweep cell's unusable folder names the sweep's own flag; a config that fails before
  training leaves no run folder behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import KillAfterStep, REPO, SimulatedKill, run_cli, tiny_overrides
from normbench.progress import Progress
from normbench.training import entry
from normbench.cli import app
from normbench.config import load_config, parse_overrides
from normbench.data import present_identity, synthetic_cifar
from normbench.errors import OtherDataError, UserError
from normbench.runlock import LOCK_NAME, RunLock
from normbench.tracking import RunDir

runner = CliRunner()



@pytest.fixture(scope="module")
def other_root(tmp_path_factory) -> Path:
    """Synthetic data of the same shape as synth_root's, with other pixels and labels."""
    root = tmp_path_factory.mktemp("other-cifar")
    synthetic_cifar(root, n_train=200, n_test=100, seed=1)
    return root


def cli_args(root: Path, out: Path, *flags: str, **extra) -> list[str]:
    sets = tiny_overrides(root, out, **extra)
    return ["train", "--no-progress", *flags, *[a for s in sets for a in ("--set", s)]]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("normbench: error:")]


# ----------------------------------------------------------------------------- the data a run was made on


def test_summary_and_checkpoint_record_the_data(tiny_cfg, synth_root, other_root):
    identity = present_identity(synth_root)
    assert identity.source == "synthetic" and identity != present_identity(other_root)
    cfg = tiny_cfg(**{"train.epochs": 1})
    summary = entry.train(cfg)
    assert summary["data_source"] == "synthetic" and summary["data_fingerprint"] == identity.fingerprint
    ckpt = RunDir(cfg.run_dir()).load_checkpoint()
    assert ckpt["data"] == {"source": "synthetic", "fingerprint": identity.fingerprint}
    # the data is not part of the config hash: the run folder's name stays what it was
    assert tiny_cfg(**{"train.epochs": 1, "data.root": str(other_root)}).run_dir() == cfg.run_dir()


def test_completed_run_is_not_passed_off_for_other_data(synth_root, other_root, tmp_path):
    out = tmp_path / "runs"
    assert runner.invoke(app, cli_args(synth_root, out, **{"train.epochs": 1})).exit_code == 0
    (run_dir,) = out.iterdir()
    before = (run_dir / "summary.json").read_bytes()
    res = runner.invoke(app, cli_args(other_root, out, **{"train.epochs": 1}))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = error_lines(res.output)
    assert f"run folder {run_dir} holds a completed run made on other data" in line
    assert present_identity(synth_root).fingerprint in line and present_identity(other_root).fingerprint in line
    assert "log.out_dir" in line and "--fresh" in line and "already completed" not in res.output
    assert (run_dir / "summary.json").read_bytes() == before
    # the same data again: still the recorded result
    res = runner.invoke(app, cli_args(synth_root, out, **{"train.epochs": 1}))
    assert res.exit_code == 0 and (run_dir / "summary.json").read_bytes() == before
    # --fresh trains it on the other data
    assert runner.invoke(app, cli_args(other_root, out, "--fresh", **{"train.epochs": 1})).exit_code == 0
    assert RunDir(run_dir).read_summary()["data_fingerprint"] == present_identity(other_root).fingerprint


def test_resume_from_a_checkpoint_made_on_other_data_is_refused(tiny_cfg, other_root):
    cfg = tiny_cfg()
    with pytest.raises(SimulatedKill):
        entry.train(cfg, progress=KillAfterStep(15))  # mid epoch 2, after epoch 1's checkpoint
    run_dir = RunDir(cfg.run_dir())
    ckpt, metrics = run_dir.checkpoint.read_bytes(), run_dir.metrics.read_bytes()
    assert not run_dir.summary.exists()
    with pytest.raises(OtherDataError, match="holds a checkpoint made on other data") as err:
        entry.train(tiny_cfg(**{"data.root": str(other_root)}))
    assert "--fresh" in str(err.value)
    assert run_dir.checkpoint.read_bytes() == ckpt and run_dir.metrics.read_bytes() == metrics
    assert not run_dir.summary.exists()
    assert entry.train(cfg)["status"] == "completed"  # on its own data it resumes


def test_summary_without_a_fingerprint_is_accepted_as_legacy_when_its_source_matches(tiny_cfg, tmp_path):
    from normbench import report

    cfg = tiny_cfg(**{"train.epochs": 1})
    entry.train(cfg)
    run_dir = RunDir(cfg.run_dir())
    legacy = run_dir.read_summary()
    del legacy["data_fingerprint"]  # as written before fingerprints were recorded
    run_dir.summary.write_text(json.dumps(legacy))
    again = entry.train(cfg)
    assert again.get("skipped") and again["final_test_acc"] == legacy["final_test_acc"]
    run_dir.summary.write_text(json.dumps({**legacy, "data_source": "official"}))
    with pytest.raises(OtherDataError, match=r"holds a completed run made on other data \(official data;"):
        entry.train(cfg)
    # reports read such summaries as before
    (run,) = report.collect(tmp_path / "runs")
    assert run.status == "completed" and run.summary["final_test_acc"] == legacy["final_test_acc"]


def _write_sweep(path: Path, root: Path, out: Path, epochs: int = 1) -> Path:
    tiny = {"data.root": str(root), "data.allow_download": False, "model.width": 0.25, "train.epochs": epochs,
            "train.batch_size": 20, "train.log_every": 5, "optim.warmup_epochs": 0.5, "device": "cpu",
            "log.tensorboard": False}
    path.write_text(yaml.safe_dump({"out_dir": str(out), "set": tiny, "grid": {"norm.kind": ["bn"]}}))
    return path


def test_sweep_cell_on_other_data_is_refused_like_train(tmp_path, synth_root, other_root):
    import dataclasses

    from normbench import sweep as sw
    from normbench.sweep.cell import run_cell

    out = tmp_path / "out"
    path = _write_sweep(tmp_path / "s.yaml", synth_root, out)
    spec = sw.load_sweep(path)
    (task,) = sw.plan_sweep(spec, 1).tasks
    assert run_cell(task).status == "completed"
    run_dir = task.run_dir
    before = (run_dir / "summary.json").read_bytes()

    other = sw.load_sweep(path, overrides=parse_overrides([f"data.root={other_root}"]))
    (cell,) = other.cells
    assert cell.run_dir == run_dir and sw.cell_state(cell) == "other-data"
    assert sw.cell_state(spec.cells[0]) == "done"
    for kwargs in ({}, {"rerun_failed": True}):
        with pytest.raises(UserError, match="sweep cell 0 'bn-b20-s0': run folder .* made on other data") as err:
            sw.plan_sweep(other, 1, **kwargs)
        assert "--force" in str(err.value) and "--out" in str(err.value) and "--fresh" not in str(err.value)
    res = runner.invoke(app, ["sweep", str(path), "--set", f"data.root={other_root}", "--workers", "1"])
    assert res.exit_code == 2 and len(error_lines(res.output)) == 1 and "other data" in res.output, res.output
    # a worker that finds it so under the lock (the data changed after planning) leaves it alone
    stale = dataclasses.replace(task, config=other.cells[0].cfg.model_copy(update={"threads": 1}))
    result = run_cell(stale)
    assert result.outcome == "refused" and "--force" in result.error
    assert (run_dir / "summary.json").read_bytes() == before
    # --force retrains it on the new data
    (forced,) = sw.plan_sweep(other, 1, force=True).tasks
    assert run_cell(forced).status == "completed"
    assert json.loads((run_dir / "summary.json").read_text())["data_fingerprint"] == \
        present_identity(other_root).fingerprint
    assert sw.cell_state(cell) == "done" and sw.cell_state(spec.cells[0]) == "other-data"


# ----------------------------------------------------------------------------- one process per run


def _hold_lock(lock_path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from normbench.runlock import RunLock;"
        "l = RunLock(sys.argv[2]); assert l.try_acquire(); print('held', flush=True); time.sleep(120)"),
        str(REPO), str(lock_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _try_lock_elsewhere(lock_path: Path) -> bool:
    out = subprocess.run([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1]); from normbench.runlock import RunLock;"
        "print(RunLock(sys.argv[2]).try_acquire())"), str(REPO), str(lock_path)],
        capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_run_lock_is_reentrant_within_a_process_and_exclusive_across(tmp_path):
    path = tmp_path / LOCK_NAME
    outer, inner = RunLock(path), RunLock(path)
    assert outer.try_acquire() and inner.try_acquire()  # e.g. a sweep worker, then the engine
    assert not _try_lock_elsewhere(path)
    inner.release()
    assert not _try_lock_elsewhere(path)  # the outer hold remains
    outer.release()
    assert _try_lock_elsewhere(path)


class ReleaseWhenWaiting(Progress):
    """Kills the lock's holder as soon as the run says it is waiting for it."""

    def __init__(self, holder: subprocess.Popen):
        self.holder, self.messages = holder, []

    def message(self, text):
        self.messages.append(text)
        if text.startswith("waiting for") and self.holder.poll() is None:
            self.holder.send_signal(signal.SIGKILL)
            self.holder.wait()


@pytest.mark.slow
def test_train_refuses_a_run_another_process_trains_and_waits_when_asked(tmp_path, synth_root):
    from normbench import sweep as sw
    from normbench.sweep.cell import run_cell
    from normbench.sweep.spec import Cell
    from normbench.sweep.tasks import CellTask

    out = tmp_path / "runs"
    cfg = load_config(None, tiny_overrides(synth_root, out, **{"train.epochs": 1}))
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    holder = _hold_lock(run_dir / LOCK_NAME)
    try:
        res = runner.invoke(app, cli_args(synth_root, out, **{"train.epochs": 1}))
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        (line,) = error_lines(res.output)
        assert f"run folder {run_dir} is being trained by {holder.pid}@" in line and "--wait" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing read, nothing written
        # a sweep worker sees the same lock: it defers the cell, naming the holder
        task = CellTask(index=0, name="cell", config=cfg, mode="normal", wait=False)
        result = run_cell(task)
        assert result.outcome == "locked" and result.holder.startswith(f"{holder.pid}@")
        assert sw.cell_state(Cell(0, "cell", {}, cfg)) == "running"
        # asked to wait, the run starts once the holder is gone
        progress = ReleaseWhenWaiting(holder)
        summary = entry.train(cfg, wait=True, progress=progress)
        assert summary["status"] == "completed" and not summary.get("skipped")
        assert progress.messages[0].startswith(f"waiting for {holder.pid}@")
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert "--wait" in runner.invoke(app, ["train", "--help"]).output


# ----------------------------------------------------------------------------- failures and their remedies


def test_sweep_cell_with_a_corrupt_checkpoint_names_the_sweep_flag(tmp_path, synth_root):
    from normbench import sweep as sw
    from normbench.sweep.cell import run_cell

    path = _write_sweep(tmp_path / "s.yaml", synth_root, tmp_path / "out", epochs=2)
    spec = sw.load_sweep(path)
    (task,) = sw.plan_sweep(spec, 1).tasks
    assert run_cell(task).status == "completed"
    run_dir = RunDir(task.run_dir)
    run_dir.summary.unlink()  # killed before its summary: the cell resumes from the checkpoint
    blob = bytearray(run_dir.checkpoint.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    run_dir.checkpoint.write_bytes(bytes(blob))
    (task,) = sw.plan_sweep(spec, 1).tasks
    result = run_cell(task)
    assert result.status == "failed" and "checkpoint.pt is corrupt" in result.error
    for text in (result.error, run_dir.read_summary()["note"], run_dir.error_log.read_text()):
        assert "--rerun-failed" in text and "--fresh" not in text
    assert "--rerun-failed" in runner.invoke(app, ["sweep", "--help"]).output  # a flag the sweep has
    # a corrupt summary says the same
    run_dir.summary.write_text("{")
    problem = sw.safe_summary(run_dir.path)[1]
    assert "summary.json is corrupt" in problem and "--rerun-failed" in problem and "--fresh" not in problem
    # and the flag does recover it
    (task,) = sw.plan_sweep(spec, 1, rerun_failed=True).tasks
    assert run_cell(task).status == "completed"


def test_config_that_fails_on_a_layer_leaves_no_run_folder(tmp_path, synth_root):
    out = tmp_path / "runs"
    res = runner.invoke(app, cli_args(synth_root, out, **{"norm.kind": "gn", "norm.groups": 3}))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = error_lines(res.output)
    assert "norm.groups=3 does not divide" in line
    assert not out.exists()  # neither the run folder nor the out_dir it would have made
    out.mkdir()
    assert runner.invoke(app, cli_args(synth_root, out, **{"norm.kind": "gn", "norm.groups": 3})).exit_code == 2
    assert list(out.iterdir()) == []  # an existing out_dir stays, empty


def test_missing_data_leaves_no_run_folder_but_a_started_run_keeps_its_own(tmp_path, synth_root):
    out = tmp_path / "runs"
    partial = tmp_path / "partial" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    (partial / "data_batch_1").write_bytes((synth_root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    res = runner.invoke(app, cli_args(tmp_path / "partial", out))
    assert res.exit_code == 2 and len(error_lines(res.output)) == 1 and "is missing" in res.output, res.output
    assert not out.exists()
    # a run that started and was then stopped keeps its folder (it resumes from it)
    cfg = load_config(None, tiny_overrides(synth_root, out))
    with pytest.raises(SimulatedKill):
        entry.train(cfg, progress=KillAfterStep(15))
    assert (cfg.run_dir() / "config.yaml").exists() and (cfg.run_dir() / "checkpoint.pt").exists()
