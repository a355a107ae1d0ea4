"""Nothing lost, nothing silent: kills, signals, corrupt files, numerical faults, full disks."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normbench.progress import Progress
from normbench.training import entry
from normbench.errors import UserError
from normbench.tracking import RunDir

from conftest import REPO, run_cli, tiny_overrides

KILL_SEED = 20261125


def train_cmd(synth_root: Path, out: Path, **extra) -> list[str]:
    sets = tiny_overrides(synth_root, out, **{"train.epochs": 6, "name": "victim", **extra})
    return [sys.executable, "-m", "normbench", "train", "--no-progress", *[a for s in sets for a in ("--set", s)]]


def start(cmd: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def the_run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def final_state(out: Path) -> tuple[dict, list[dict], dict]:
    run_dir = the_run_dir(out)
    weights = RunDir(run_dir).load_checkpoint()["model"]
    metrics = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in RunDir(run_dir).read_metrics()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return weights, metrics, summary


def assert_same_result(ref_out: Path, out: Path) -> None:
    w1, m1, s1 = final_state(ref_out)
    w2, m2, s2 = final_state(out)
    assert s2["status"] == "completed" and s2["steps"] == s1["steps"]
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert m1 == m2
    assert s1["final_test_acc"] == s2["final_test_acc"]


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory):
    """One uninterrupted run (subprocess), and its wall time."""
    out = tmp_path_factory.mktemp("reference")
    t0 = time.perf_counter()
    proc = subprocess.run(train_cmd(synth_root, out), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, time.perf_counter() - t0


def wait_for(predicate, timeout: float = 60.0, every: float = 0.005) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_identical(synth_root, tmp_path, reference):
    ref_out, ref_wall = reference
    out = tmp_path / "runs"
    cmd = train_cmd(synth_root, out)
    rng = random.Random(KILL_SEED)
    kills = []
    # 1) a kill in the middle of a checkpoint write (the writer pauses between temp file and rename)
    proc = start(cmd, NORMBENCH_TEST_WRITE_PAUSE="0.5")
    assert wait_for(lambda: out.exists() and any(out.glob("*/.checkpoint.pt.*.tmp")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append("during checkpoint write")
    # 2) kills at randomly chosen moments: after a random number of logged steps, plus a random delay
    def logged_step() -> int:
        lines = [l for l in (the_run_dir(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]
        try:
            return json.loads(lines[-1])["step"] if lines else 0
        except ValueError:  # a line being written
            return 0

    for target in sorted(rng.sample(range(3, 57), 3)):
        proc = start(cmd)
        wait_for(lambda: logged_step() >= target or proc.poll() is not None, timeout=120)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(f"after step {target}")
        proc.wait()
    assert len(kills) == 4, kills
    final = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout + final.stderr
    assert_same_result(ref_out, out)
    assert not list(the_run_dir(out).glob(".*.tmp"))  # dead writers' temp files cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_marks_interrupted_and_resumes(synth_root, tmp_path, reference, sig, code):
    ref_out, _ = reference
    out = tmp_path / "runs"
    cmd = train_cmd(synth_root, out)
    proc = start(cmd)
    assert wait_for(lambda: out.exists() and any(out.glob("*/metrics.jsonl")))
    time.sleep(0.3)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == code, stdout
    summary = json.loads((the_run_dir(out) / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert RunDir(the_run_dir(out)).load_checkpoint()["state"]["step"] == summary["steps"]
    again = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_result(ref_out, out)


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_without_corruption(synth_root, tmp_path):
    out = tmp_path / "runs"
    proc = start(train_cmd(synth_root, out), NORMBENCH_TEST_WRITE_PAUSE="0.3")
    assert wait_for(lambda: out.exists() and any(out.glob("*/metrics.jsonl")))
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < 5
    run_dir = RunDir(the_run_dir(out))
    if run_dir.checkpoint.exists():
        run_dir.load_checkpoint()  # whole, or the previous one: never half
    if run_dir.summary.exists():
        run_dir.read_summary()


@pytest.mark.slow
def test_corrupt_checkpoint_is_named_and_fresh_recovers(synth_root, tmp_path):
    sets = tiny_overrides(synth_root, tmp_path / "runs", **{"train.epochs": 2})
    args = ["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]
    assert run_cli(*args).returncode == 0
    run_dir = the_run_dir(tmp_path / "runs")
    (run_dir / "summary.json").unlink()  # as if killed before the summary: the run resumes from the checkpoint
    ckpt = run_dir / "checkpoint.pt"
    blob = bytearray(ckpt.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    ckpt.write_bytes(bytes(blob))
    proc = run_cli(*args)
    assert proc.returncode == 2 and "checkpoint.pt is corrupt (checksum mismatch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    ckpt.write_bytes(bytes(blob[: len(blob) // 3]))  # truncated
    proc = run_cli(*args)
    assert proc.returncode == 2 and "checkpoint.pt is corrupt" in proc.stderr
    assert run_cli(*args, "--fresh").returncode == 0


@pytest.mark.slow
def test_corrupt_summary_is_named_and_fresh_recovers(synth_root, tmp_path):
    sets = tiny_overrides(synth_root, tmp_path / "runs", **{"train.epochs": 1})
    args = ["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]
    assert run_cli(*args).returncode == 0
    summary = the_run_dir(tmp_path / "runs") / "summary.json"
    summary.write_text(summary.read_text()[:40])
    proc = run_cli(*args)
    assert proc.returncode == 2 and "summary.json is corrupt" in proc.stderr
    assert run_cli(*args, "--fresh").returncode == 0


@pytest.mark.slow
def test_corrupt_data_batch_is_named(tmp_path):
    from normbench.data import synthetic_cifar

    folder = synthetic_cifar(tmp_path / "data", n_train=50, n_test=20)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:-1] + b"\x00")
    proc = run_cli("train", "--set", f"data.root={tmp_path / 'data'}", "--set", "data.allow_download=false",
                   "--set", f"log.out_dir={tmp_path / 'runs'}", "--set", "device=cpu")
    assert proc.returncode == 2 and "test_batch is corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_only_safe_loaders_are_used():
    sources = "\n".join(p.read_text() for p in (REPO / "normbench").rglob("*.py"))
    assert "yaml.load(" not in sources and "yaml.unsafe_load" not in sources
    for line in sources.splitlines():
        if "torch.load(" in line:
            assert "weights_only=True" in line, line


def test_nan_gradient_is_diverged_with_the_step(tiny_cfg, monkeypatch):
    from normbench.training.solo import SoloStepper

    original = SoloStepper.train_step

    def poisoned(self, x, y):
        original(self, x, y)
        if self.run.state.step == 6:  # the 7th step's gradient norm is NaN
            self.run.metrics.pending["norm"][-1] = torch.tensor(float("nan"))

    monkeypatch.setattr(SoloStepper, "train_step", poisoned)
    summary = entry.train(tiny_cfg())
    assert summary["status"] == "diverged" and summary["diverged_step"] == 6


def test_nonfinite_running_variance_is_caught_before_evaluation(tiny_cfg, monkeypatch):
    from normbench.training import solo
    from normbench.training.run import Run

    original = Run.flush
    evaluated = []

    def poison(self):
        self.model.stem_norm_act.norm.running_var[0] = float("inf")
        return original(self)

    monkeypatch.setattr(Run, "flush", poison)
    monkeypatch.setattr(solo, "evaluate", lambda *a, **k: evaluated.append(1) or {"loss": 0.0, "acc": 0.0})
    summary = entry.train(tiny_cfg())
    assert summary["status"] == "diverged" and "running_var" in summary["note"] and not evaluated


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (root only); unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class FillDiskAfter(Progress):
    """After ``step`` steps, fill the file system holding ``folder`` completely."""

    def __init__(self, folder: Path, step: int):
        self.folder, self.step, self.done = folder, step, False

    def update(self, step, metrics):
        if step >= self.step and not self.done:
            self.done = True
            with open(self.folder / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass


def test_disk_full_names_the_folder_and_keeps_the_last_checkpoint(tiny_cfg, small_fs):
    cfg = tiny_cfg(**{"log.out_dir": str(small_fs / "runs"), "log.tensorboard": False, "train.epochs": 3})
    with pytest.raises(UserError) as err:
        entry.train(cfg, progress=FillDiskAfter(small_fs, step=13))  # epoch 1's checkpoint is on disk
    assert str(cfg.run_dir()) in str(err.value) and "No space left" in str(err.value)
    ckpt = RunDir(cfg.run_dir()).load_checkpoint()
    assert ckpt["state"]["step"] == 10
    (small_fs / "filler").unlink()
    assert entry.train(cfg)["status"] == "completed"


@pytest.mark.slow
def test_read_only_output_folder_is_named(tiny_cfg, small_fs):
    (small_fs / "runs").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    sets = tiny_overrides(Path(tiny_cfg().data.root), small_fs / "runs")
    proc = run_cli("train", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 2 and str(small_fs / "runs") in proc.stderr and "Traceback" not in proc.stderr
