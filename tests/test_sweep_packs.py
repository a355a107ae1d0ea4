"""A sweep's packed cells under the sweep's modes and faults: `--force` retrains finished
members, `--rerun-failed` retrains failed members from scratch, a member another process
holds is waited for while the rest train, and a worker killed mid-cell fails the sweep with a
line saying how to resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from normbench.sweep.cell import ATTEMPT_MARK, run_cell
from normbench.sweep.tasks import CellTask, PackTask
from normbench.tracking import RunDir
from test_packed import whole_and_cut_packs
from test_sweep import summaries, write_sweep


def pack_of(cfgs, mode="normal", since=0.0) -> PackTask:
    members = tuple(CellTask(i, c.run_name, c, mode=mode, since=since) for i, c in enumerate(cfgs))
    return PackTask(members, cost=1.0)


def weights(cfg) -> dict:
    return RunDir(cfg.run_dir()).load_checkpoint()["model"]


def test_force_retrains_every_finished_member_of_a_pack(tiny_cfg):
    cfgs = [tiny_cfg(seed=s, **{"train.epochs": 1}) for s in range(2)]
    first = run_cell(pack_of(cfgs))
    assert [r.status for r in first.members] == ["completed", "completed"]
    stamps = [(c.run_dir() / "summary.json").stat().st_mtime_ns for c in cfgs]
    again = run_cell(pack_of(cfgs))  # a plain sweep leaves finished members alone
    assert [r.outcome for r in again.members] == ["skipped", "skipped"]
    forced = run_cell(pack_of(cfgs, mode="force", since=time.time()))
    assert [(r.outcome, r.status) for r in forced.members] == [("trained", "completed")] * 2
    assert all((c.run_dir() / "summary.json").stat().st_mtime_ns > t for c, t in zip(cfgs, stamps))
    assert all(json.loads((c.run_dir() / "summary.json").read_text())["packed_members"] == 2 for c in cfgs)


@pytest.mark.slow
def test_a_damaged_member_fails_alone_and_rerun_failed_retrains_it_from_scratch(tiny_cfg, tmp_path):
    """A pack cut mid-training, then one member's checkpoint damaged: that member is recorded
    failed (naming --rerun-failed) and the other resumes and completes without it; a plain
    sweep leaves the failure alone; --rerun-failed retrains the damaged member from step 0,
    ending bit-identical to the same run trained once, uninterrupted (resuming would meet the
    damaged checkpoint again)."""
    from normbench.training.entry import train

    whole, cut, first = whole_and_cut_packs(tiny_cfg, tmp_path)
    assert [s["status"] for s in first] == ["interrupted", "interrupted"]
    ckpt = cut[0].run_dir() / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])  # truncated
    healthy_steps = [r.get("step") for r in RunDir(cut[1].run_dir()).read_metrics()]

    after = run_cell(pack_of(cut))
    assert [r.status for r in after.members] == ["failed", "completed"], [r.note for r in after.members]
    assert "--rerun-failed" in after.members[0].note, after.members[0].note
    assert after.members[0].steps == first[0]["steps"] > 0  # how far it had got, not step 0
    assert "checkpoint" in RunDir(cut[0].run_dir()).error_log.read_text()
    resumed = [r.get("step") for r in RunDir(cut[1].run_dir()).read_metrics()]
    assert resumed[: len(healthy_steps)] == healthy_steps and len(resumed) > len(healthy_steps)  # resumed, not redone
    assert [r.outcome for r in run_cell(pack_of(cut)).members] == ["skipped", "skipped"]  # recorded: left alone

    rerun = run_cell(pack_of(cut, mode="rerun"))
    assert [(r.outcome, r.status) for r in rerun.members] == [("trained", "completed"), ("skipped", "completed")]
    once = tiny_cfg(seed=0, **{"log.out_dir": str(tmp_path / "once"), "train.epochs": 2, "train.log_every": 2})
    train(once)
    wa, wb = weights(once), weights(cut[0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_member_resumed_on_other_data_is_refused_untouched_and_the_other_trains(tiny_cfg, tmp_path):
    """A member whose checkpoint was made on other data: refused, its results (everything
    but the attempt's train.log) left byte for byte as they were; the other member resumes
    and completes without it."""
    _, cut, _ = whole_and_cut_packs(tiny_cfg, tmp_path)
    run_dir = RunDir(cut[0].run_dir())
    state = run_dir.load_checkpoint()
    state["data"] = {**state.get("data", {}), "fingerprint": "0" * 16}
    run_dir.save_checkpoint(state)
    before = {p.name: p.read_bytes() for p in cut[0].run_dir().iterdir() if p.is_file() and p.name not in (".lock", "train.log")}

    after = run_cell(pack_of(cut))
    assert [(r.outcome, r.status) for r in after.members] == [("refused", None), ("trained", "completed")], \
        [(r.outcome, r.status, r.note) for r in after.members]
    assert "other data" in after.members[0].error
    assert {p.name: p.read_bytes() for p in cut[0].run_dir().iterdir() if p.is_file() and p.name not in (".lock", "train.log")} == before


def test_a_pack_whose_every_member_is_damaged_fails_every_member(tiny_cfg, tmp_path):
    cfgs = [tiny_cfg(seed=s, **{"train.epochs": 2}) for s in range(2)]
    for c in cfgs:
        RunDir(c.run_dir()).create()
        (c.run_dir() / "checkpoint.pt").write_bytes(b"not a checkpoint")
    after = run_cell(pack_of(cfgs))
    assert [r.status for r in after.members] == ["failed", "failed"], [r.note for r in after.members]
    assert all("corrupt" in r.note for r in after.members), [r.note for r in after.members]


def test_a_member_left_alone_by_the_pack_keeps_its_own_decision(tiny_cfg):
    """A pack of which one member is left to train alone: under --force that member is
    retrained from scratch although it is recorded complete (alone, so not packed)."""
    cfgs = [tiny_cfg(seed=s, **{"train.epochs": 1}) for s in range(2)]
    run_cell(pack_of(cfgs))
    summary = cfgs[0].run_dir() / "summary.json"
    stamp = summary.stat().st_mtime_ns
    steps = [r.get("step") for r in RunDir(cfgs[0].run_dir()).read_metrics()]
    lone = run_cell(PackTask((CellTask(0, cfgs[0].run_name, cfgs[0], mode="force", since=time.time()),), cost=1.0))
    assert [(r.outcome, r.status) for r in lone.members] == [("trained", "completed")]
    assert summary.stat().st_mtime_ns > stamp and json.loads(summary.read_text()).get("packed_members") is None
    assert [r.get("step") for r in RunDir(cfgs[0].run_dir()).read_metrics()] == steps  # one run's records, not two


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_pack_whose_lead_another_process_holds_trains_the_rest_then_waits_for_it(tmp_path, synth_root):
    from normbench.sweep.spec import load_sweep

    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"seed": [0, 1, 2]}, root=synth_root, out_dir=str(out), tb=False)
    cells = load_sweep(path, preflight=False).cells
    lead = cells[0].run_dir
    lead.mkdir(parents=True)
    others = [c.run_dir / "summary.json" for c in cells[1:]]
    # another process holds the lead's lock until the other two members are recorded
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from normbench.runlock import RunLock\n"
         f"lock = RunLock(Path({str(lead / '.lock')!r})); assert lock.try_acquire(); print('held', flush=True)\n"
         f"while not all(Path(p).exists() for p in {[str(p) for p in others]!r}): time.sleep(0.1)\n"
         "lock.release()"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run_cli("sweep", str(path), "--pack", "3", "--workers", "1", "--threads-per-worker", "1",
                      "--no-progress")
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert "3 to train as 1 task (seeds packed)" in res.stdout, res.stdout
    assert f"[wait] {cells[0].name}: being trained by" in res.stdout, res.stdout
    runs = summaries(out)
    assert sorted(s["status"] for s in runs.values()) == ["completed"] * 3
    assert runs[cells[0].run_dir.name].get("packed_members") is None  # trained alone once its lock was free
    assert [runs[c.run_dir.name]["packed_members"] for c in cells[1:]] == [2, 2]
    finished = [line for line in res.stdout.splitlines() if line.startswith("[") and "completed" in line]
    assert sorted(line.split()[1].rstrip(":") for line in finished) == sorted(c.name for c in cells), res.stdout
    assert finished[-1].startswith("[2/2]"), res.stdout  # the waited-for member is a task of its own


@pytest.mark.slow
def test_a_worker_killed_mid_cell_fails_the_sweep_and_the_cell_resumes(tmp_path, synth_root):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"seed": [0]}, root=synth_root, out_dir=str(out), tb=False)
    path.write_text(path.read_text().replace("train.epochs: 1", "train.epochs: 30"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sweep = subprocess.Popen([sys.executable, "-m", "normbench", "sweep", str(path), "--workers", "1",
                              "--threads-per-worker", "1", "--no-progress"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        logs = lambda: [p for p in out.glob("*/train.log") if "step" in p.read_text().split(ATTEMPT_MARK)[-1]]
        _wait_for(logs, 120, "the cell to train")
        line = next(l for l in logs()[0].read_text().splitlines() if ATTEMPT_MARK in l)
        os.kill(int(line.split("(pid ")[1].split()[0]), signal.SIGKILL)
        text = sweep.communicate(timeout=120)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, text
    assert "not finished (worker process died (exit code -9) while training this cell); run the sweep again " \
           "to resume it" in text, text
    again = run_cli("sweep", str(path), "--workers", "1", "--threads-per-worker", "1", "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [s["status"] for s in summaries(out).values()] == ["completed"]


def test_a_crashed_pack_reports_every_member(tiny_cfg):
    from normbench.sweep.tasks import CellResult

    cfgs = [tiny_cfg(seed=s) for s in range(3)]
    result = CellResult.crashed(pack_of(cfgs), "worker process died (exit code -9) while training this cell")
    assert [(r.index, r.status, r.error[:20]) for r in result.cell_results] == \
        [(i, "failed", "worker process died ") for i in range(3)]
    assert [r.name for r in result.cell_results] == [c.run_name for c in cfgs]


def test_the_view_counts_a_locked_member_as_a_task_to_come_and_says_when_it_will_not(tiny_cfg):
    import io

    from normbench.sweep.display import PlainSweepDisplay
    from normbench.sweep.tasks import CellResult

    cfgs = [tiny_cfg(seed=s) for s in range(2)]
    task = pack_of(cfgs)
    members = [CellResult.of(task.members[0], "locked", holder="1234@host"),
               CellResult.of(task.members[1], "trained", {"status": "completed", "final_test_acc": 0.5})]
    result = CellResult.of(task.members[0], "locked", holder="1234@host").with_members("trained", members)
    for waits, total, said in [(True, 2, "will wait for it at the end"),
                               (False, 1, "not waited for: the sweep is stopping")]:
        out = io.StringIO()
        view = PlainSweepDisplay(stream=out)
        view.begin(1)
        view.finished(result, waits=waits)
        lines = out.getvalue().splitlines()
        assert lines[0] == f"[wait] {cfgs[0].run_name}: being trained by 1234@host; {said}", lines
        assert lines[1].startswith(f"[1/{total}] {cfgs[1].run_name}: completed, test acc 50.00%"), lines
