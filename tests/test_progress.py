"""What a person reads while a run or a sweep trains: the ETA counts the evaluations still
due, the evaluation and measurement phases are shown, accuracies are in percent, the sweep
ends with its results table, and the dry run's estimate counts start-up and evaluation."""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from normbench.progress import PlainProgress, Progress, RichProgress, print_summary
from normbench.progress_eta import Eta, fmt_duration, percent


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


METRICS = {"epoch": 0.5, "train/loss": 1.23456, "train/acc": 0.4567, "perf/images_per_s": 100.0}


# ----------------------------------------------------------------------------- the ETA


def test_eta_counts_the_evaluations_still_due():
    clock = FakeClock()
    eta = Eta(clock)
    eta.start(total_steps=100, done_steps=0)
    eta.work_left(passes=2, test_images=3000)
    clock.advance(10.0)
    eta.update(50, images_per_s=100.0)  # 5 steps/s; a pass of 3,000 images at 300 img/s: 10 s
    assert eta.step_rate() == pytest.approx(5.0)
    assert eta.seconds_left() == pytest.approx(10.0 + 2 * 10.0)
    # an evaluation: the next one is due after it; its time is not training time
    eta.work_left(passes=1, test_images=3000)
    eta.begin("evaluation", "evaluating", total=3000)
    clock.advance(3.0)
    eta.advance(1000)  # a third in 3 s: 6 s left of it
    assert eta.phase_text() == "evaluating 1,000 / 3,000 test images"
    assert eta.step_rate() == pytest.approx(5.0)
    assert eta.seconds_left() == pytest.approx(10.0 + 6.0 + 10.0)
    clock.advance(6.0)
    eta.advance(3000)
    eta.end()  # it took 9 s: the next pass is counted at 9 s
    assert eta.pass_s == pytest.approx(9.0) and eta.step_rate() == pytest.approx(5.0)
    assert eta.seconds_left() == pytest.approx(10.0 + 9.0)
    # after the last step, the rest is the evaluation and the measurements
    clock.advance(10.0)
    eta.update(100)
    eta.work_left(passes=0, test_images=3000, forward_images=1500)  # train-mode evaluation: 5 s
    assert eta.seconds_left() == pytest.approx(5.0)
    eta.begin("measurements", "end-of-run measurements")
    clock.advance(2.0)
    assert eta.seconds_left() == pytest.approx(3.0)
    clock.advance(5.0)
    assert eta.seconds_left() == 0.0  # never negative


def test_eta_is_unknown_before_any_step_and_a_probe_counts_as_training():
    clock = FakeClock()
    eta = Eta(clock)
    eta.start(total_steps=10, done_steps=4)  # resumed: the earlier steps are not this process's speed
    assert eta.seconds_left() is None and fmt_duration(eta.seconds_left()) == "?"
    clock.advance(2.0)
    eta.update(6, images_per_s=50.0)
    assert eta.seconds_left() == pytest.approx(4.0)
    eta.begin("probe", "probing the loss landscape at step 6")
    clock.advance(2.0)
    assert eta.seconds_left() == pytest.approx(4 / (2 / 4))  # its time lowers the step rate
    with pytest.raises(ValueError):
        eta.begin("lunch", "away")


def test_percent_and_durations_for_people():
    assert percent(0.6588) == "65.88%" and percent(0.5, 1) == "50.0%" and percent(1) == "100.00%"
    assert percent(None) == "?" and percent(float("nan")) == "?"
    assert [fmt_duration(s) for s in (0.4, 59.6, 125, 7380, None)] == ["0s", "1m00s", "2m05s", "2h03m", "?"]


# ----------------------------------------------------------------------------- the two views


def test_plain_progress_prints_percent_and_the_evaluation_phase_without_flooding():
    clock, out = FakeClock(), io.StringIO()
    p = PlainProgress(every_s=10.0, stream=out, clock=clock)
    p.start("bn-b8", 100, 0, 50)
    p.work_left(1, 10000)
    clock.advance(11.0)
    p.update(10, METRICS)
    clock.advance(1.0)
    p.update(11, METRICS)  # 1 s after the last line: not printed
    p.begin_phase("evaluation", "evaluating", 10000)
    for done in range(1000, 10001, 1000):  # 2 s per 1,000 images: a line every 10 s at most
        clock.advance(2.0)
        p.advance_phase(done)
    p.end_phase()
    lines = out.getvalue().splitlines()
    assert lines[0] == "bn-b8: 100 steps (50 per epoch), starting at 0"
    assert lines[1].startswith("bn-b8: step 10/100 epoch 0.50 loss 1.2346 acc 45.7% 100 img/s eta ")
    phase_lines = [line for line in lines if "evaluating" in line]
    # 89 steps at 11 steps per 12 s of training (97 s), the rest of this evaluation (10 s, then
    # 0 s), and one more evaluation (10,000 images at 3 x 100 img/s: 33 s)
    assert phase_lines == ["bn-b8: evaluating 5,000 / 10,000 test images, eta 2m20s",
                           "bn-b8: evaluating 10,000 / 10,000 test images, eta 2m10s"], lines
    assert len(lines) == 4
    p.begin_phase("measurements", "end-of-run measurements: train-mode evaluation (10,000 test images at batch 8)")
    assert out.getvalue().splitlines()[-1].startswith("bn-b8: end-of-run measurements: train-mode evaluation")


def test_rich_progress_shows_the_phase_and_keeps_its_clocks_running():
    from rich.console import Console

    from normbench.live_columns import CountdownColumn, WallClockColumn

    clock = FakeClock()
    p = RichProgress(console=Console(file=io.StringIO(), force_terminal=True, width=200), clock=clock)
    p.start("bn-b8", 10, 0, 10)
    try:
        p.work_left(1, 3000)
        clock.advance(5.0)
        p.update(10, METRICS)  # the bar is full ...
        task = p.bar.tasks[0]
        assert "acc 45.7%" in task.fields["info"]
        p.begin_phase("evaluation", "evaluating", 3000)
        assert task.fields["info"] == "evaluating 3,000 test images"
        p.advance_phase(1000)
        assert task.fields["info"] == "evaluating 1,000 / 3,000 test images"
        clock.advance(20.0)  # ... and its clock still runs while it evaluates
        assert WallClockColumn(clock).render(task).plain == "25s"
        eta = CountdownColumn(clock).render(task).plain
        assert eta == "0s"  # 10 s per pass from the throughput, counted down over 20 s
        p.end_phase()
        assert "acc 45.7%" in task.fields["info"]
    finally:
        p.finish()


def test_summary_shows_accuracies_in_percent():
    from rich.console import Console

    out = io.StringIO()
    print_summary({"run_name": "bn-b8", "status": "completed", "final_test_acc": 0.6588, "best_test_acc": 0.6601,
                   "train_eval_gap": -0.0123, "steps": 100, "wall_time_s": 248.2}, Console(file=out, width=120))
    text = out.getvalue()
    assert "65.88%" in text and "66.01%" in text and "-1.23 points" in text and "4m08s" in text
    assert "0.6588" not in text


# ----------------------------------------------------------------------------- the training loop


class Recorder(Progress):
    """Records every call the training loop makes."""

    def __init__(self):
        self.calls: list[tuple] = []

    def start(self, *a):
        self.calls.append(("start", *a))

    def work_left(self, *a):
        self.calls.append(("work_left", *a))

    def begin_phase(self, kind, what, total=0, unit="test images"):
        self.calls.append(("begin", kind, what, total))

    def advance_phase(self, done):
        self.calls.append(("advance", done))

    def end_phase(self):
        self.calls.append(("end",))

    def message(self, text):
        self.calls.append(("message", text))


def test_the_loop_reports_each_evaluation_and_what_is_still_due(tiny_cfg):
    """Two epochs, an evaluation after each (100 synthetic test images in batches of 40), a BN
    run: the ETA hears of 2 evaluations and the train-mode evaluation at the start, of 1 then 0
    more before each evaluation, and sees every evaluation as a phase with its images done."""
    from normbench.training.entry import train

    rec = Recorder()
    summary = train(tiny_cfg(**{"train.eval_batch_size": 40}), progress=rec)
    assert summary["status"] == "completed"
    names = [c[0] for c in rec.calls]
    assert names.index("start") < names.index("work_left")
    lefts = [c[1:] for c in rec.calls if c[0] == "work_left"]
    assert lefts == [(2.0, 100, 100), (1.0, 100, 100), (0.0, 100, 100)]
    evaluations = [i for i, c in enumerate(rec.calls) if c[:2] == ("begin", "evaluation")]
    assert len(evaluations) == 2
    for i in evaluations:
        assert rec.calls[i][2:] == ("evaluating", 100)
        assert rec.calls[i + 1:i + 5] == [("advance", 40), ("advance", 80), ("advance", 100), ("end",)]
    messages = [c[1] for c in rec.calls if c[0] == "message" and "test acc" in c[1]]
    assert len(messages) == 2 and all(m.split("test acc ")[1].split(",")[0].endswith("%") for m in messages)
    final = [c for c in rec.calls if c[:2] == ("begin", "measurements")]
    assert final == [("begin", "measurements", "end-of-run measurements: train-mode evaluation "
                      "(100 test images at batch 20)", 0)]
    assert rec.calls[-1] == ("end",)


# ----------------------------------------------------------------------------- the sweep's view


def test_plain_sweep_view_runs_on_wall_time_and_shows_phases():
    from normbench.sweep.display import PlainSweepDisplay

    clock, out = FakeClock(), io.StringIO()
    d = PlainSweepDisplay(stream=out, every_s=30.0, clock=clock)
    d.begin(2)
    d.started(0, "bn-b8-seed0", 100, 0)
    d.step(0, 100, eta=40.0)
    d.phase(0, 100, "evaluating 3,000 / 10,000 test images", eta=40.0)
    clock.advance(31.0)  # no event for 31 s: the cell is evaluating
    d.tick()
    status = out.getvalue().splitlines()[-1]
    assert status.startswith("[sweep] 0/2 done, 1 running, 0 failed/diverged, elapsed 31s, eta ")
    assert status.endswith("; bn-b8-seed0: evaluating 3,000 / 10,000 test images")
    d.phase(0, 100, None, eta=0.0)
    clock.advance(31.0)
    d.tick()
    assert "evaluating" not in out.getvalue().splitlines()[-1] and "elapsed 1m02s" in out.getvalue()


def test_sweep_eta_waits_for_the_running_cells_own_etas():
    """Near the end the sweep's ETA is no less than what its last running cell still has to
    do (its evaluations included), even when its steps are all done."""
    from normbench.sweep.display import SweepCounts

    clock = FakeClock()
    c = SweepCounts(clock)
    c.total = 1
    c.start(0, "bn", 100, 0)
    clock.advance(60.0)
    c.progress(0, 100, eta=30.0)  # every step done after 60 s, 30 s of evaluation left
    assert c.eta() == pytest.approx(30.0)
    clock.advance(10.0)
    assert c.eta() == pytest.approx(20.0)


def _fake_sweep(out: Path) -> None:
    """A sweep folder: manifest and run folders as the engine leaves them (no training)."""
    cells = []
    runs = [("bn", 8, 0, "completed", 0.61), ("bn", 8, 1, "completed", 0.65), ("gn", 8, 0, "diverged", None),
            ("gn", 8, 1, "completed", 0.5)]
    for i, (kind, batch, seed, status, acc) in enumerate(runs):
        run_dir = out / f"{kind}-b{batch}-s{seed}-0000000{i}"
        run_dir.mkdir(parents=True)
        config = {"seed": seed, "norm": {"kind": kind}, "clip": {"mode": "none"}, "train": {"batch_size": batch},
                  "model": {"arch": "resnet20", "width": 1}}
        (run_dir / "summary.json").write_text(json.dumps({"status": status, "final_test_acc": acc,
                                                          "best_test_acc": acc, "config": config}))
        cells.append({"index": i, "name": run_dir.name[:-9], "values": {}, "run_dir": str(run_dir)})
    cells.append({"index": 4, "name": "ln-b8-s0", "values": {}, "run_dir": str(out / "ln-b8-s0-00000004")})
    (out / "sweep.json").write_text(json.dumps({"cells": cells}))


def test_the_sweep_ends_with_its_results_table(tmp_path):
    from normbench.sweep.display import PlainSweepDisplay
    from normbench.sweep.tasks import CellResult

    _fake_sweep(tmp_path / "out")
    out = io.StringIO()
    d = PlainSweepDisplay(stream=out)
    d.begin(1)
    run_dir = next((tmp_path / "out").glob("bn-b8-s1-*"))
    d.finished(CellResult(index=1, name="bn-b8-seed1", run_dir=str(run_dir), outcome="trained", status="completed",
                          final_test_acc=0.65))
    d.end()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/1] bn-b8-seed1: completed, test acc 65.00%"
    table = lines[lines.index("results: final test accuracy (mean and range over seeds)") + 1:]
    assert table[0].split() == ["method", "batch", "seeds", "done", "test", "acc", "status"]
    assert table[1].split() == ["BN", "8", "2/2", "63.00%", "(61.00–65.00)", "completed"]
    assert table[2].split() == ["GN", "8", "1/2", "50.00%", "1", "completed,", "1", "diverged"]
    assert table[3] == "1 cell(s) not started"


@pytest.mark.slow
def test_a_real_sweep_prints_percent_and_its_results_table(tmp_path, synth_root):
    from test_sweep import write_sweep

    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"norm.kind": ["bn"], "seed": [0, 1]}, root=synth_root, out_dir=str(out),
                       tb=False)
    res = run_cli("sweep", str(path), "--workers", "2", "--threads-per-worker", "1", "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    accs = [json.loads(p.read_text())["final_test_acc"] for p in out.glob("*/summary.json")]
    lines = res.stdout.splitlines()
    header = lines.index("results: final test accuracy (mean and range over seeds)")
    row = lines[header + 2].split()
    assert row[:3] == ["BN", "20", "2/2"] and row[-1] == "completed" and len(accs) == 2
    assert row[3] == percent(sum(accs) / 2)
    assert any(line.startswith("[") and "test acc " in line and line.split("test acc ")[1].split(",")[0].endswith("%")
               for line in lines)
    log = next(out.glob("*/train.log")).read_text()
    assert "test acc " in log and "%" in log.split("test acc ")[1].split("\n")[0]
    # run again: nothing left to train, and the table still says what the sweep holds
    again = run_cli("sweep", str(path), "--workers", "2", "--threads-per-worker", "1", "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    lines = again.stdout.splitlines()
    header = lines.index("results: final test accuracy (mean and range over seeds)")
    assert lines[header + 2].split() == row


# ----------------------------------------------------------------------------- the dry run's estimate


def _plan(tmp_path, **set_):
    import yaml

    from normbench.sweep.plan import plan_sweep
    from normbench.sweep.spec import load_sweep
    from test_sweep import write_sweep

    path = write_sweep(tmp_path / "s.yaml", {"norm.kind": ["bn", "gn"]}, out_dir=str(tmp_path / "out"), tb=False)
    spec = yaml.safe_load(path.read_text())
    spec["set"].update(set_)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return plan_sweep(load_sweep(path, preflight=False), threads=1)


def test_the_estimate_counts_start_up_every_evaluation_and_the_measurements(tmp_path):
    from normbench.sweep.estimate import cell_cost, estimate
    from normbench.sweep.timing_probe import ProbeTimes

    plan = _plan(tmp_path, **{"train.epochs": 3, "train.eval_every": 1, "train.batch_size": 10,
                              "log.checkpoint_every_s": 1000})
    bn = next(t for t in plan.tasks if t.config.norm.kind == "bn").config
    gn = next(t for t in plan.tasks if t.config.norm.kind == "gn").config
    times = ProbeTimes(step_s=0.1, eval_image_s=0.001, train_forward_image_s=0.01, build_s=0.5, checkpoint_s=0.2)
    cost = cell_cost(bn, times, n_train=500, n_test=1000, data_load_s=2.0)
    assert cost.steps_s == pytest.approx(150 * 0.1)  # 50 steps per epoch, 3 epochs
    assert cost.evaluation_s == pytest.approx(3 * 1000 * 0.001)  # after every epoch
    assert cost.measurements_s == pytest.approx(1000 * 0.01)  # BN: the train-mode evaluation at batch 10
    assert cost.checkpoints_s == pytest.approx(3 * 0.2)
    assert cost.startup_s == pytest.approx(2.5)  # data load + model build
    assert cell_cost(gn, times, 500, 1000, 2.0).measurements_s == 0.0  # GN has no train/eval gap
    resumed = cell_cost(bn, times, 500, 1000, 2.0, done_steps=100)  # 2 epochs done: one evaluation left
    assert resumed.evaluation_s == pytest.approx(1000 * 0.001) and resumed.steps_s == pytest.approx(5.0)
    fewer = cell_cost(bn.model_copy(update={"train": bn.train.model_copy(update={"eval_every": 3})}), times, 500, 1000,
                      2.0)
    assert fewer.evaluation_s == pytest.approx(1000 * 0.001)
    precise = bn.model_copy(update={"analysis": bn.analysis.model_copy(update={"precise_bn": True,
                                                                                "precise_bn_images": 400})})
    assert cell_cost(precise, times, 500, 1000, 2.0).measurements_s == pytest.approx(10.0 + (400 + 1000) * 0.001)

    measured = []
    per_task, total = estimate(plan, workers=2, measure=lambda cfg, threads: measured.append(cfg.norm.kind) or times,
                               start_s=lambda device: 4.0, load=lambda cfg: (500, 1000, 2.0))
    assert sorted(measured) == ["bn", "gn"]
    bn_s, gn_s = (per_task[t.index] for t in sorted(plan.tasks, key=lambda t: t.config.norm.kind))
    assert bn_s == pytest.approx(cost.total_s)
    # the sweep process (start, data check, two validations), then two workers in parallel, each started first
    assert total == pytest.approx(4.0 + 2.0 + 2 * 0.5 + 4.0 + max(bn_s, gn_s))
    _, one_worker = estimate(plan, workers=1, measure=lambda cfg, threads: times, start_s=lambda d: 4.0,
                             load=lambda cfg: (500, 1000, 2.0))
    assert one_worker == pytest.approx(4.0 + 2.0 + 1.0 + 4.0 + bn_s + gn_s)


def test_check_estimate_reads_the_dry_runs_estimate():
    spec = importlib.util.spec_from_file_location("check_estimate", REPO / "scripts" / "check_estimate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [mod.parse_duration(t) for t in ("42s", "3m05s", "2h07m", "1m00s")] == [42, 185, 7620, 60]
    with pytest.raises(ValueError):
        mod.parse_duration("?")
    out = "probing bn at batch 8\n...\nestimated wall time: 6m09s with 2 worker(s) × 1 thread(s) (from ...)\n"
    assert mod.estimate_from(out) == 369
    with pytest.raises(ValueError):
        mod.estimate_from("no estimate here")


def test_a_cell_that_could_not_be_probed_is_left_out_of_the_estimate_not_a_crash(tmp_path):
    from normbench.sweep.estimate import cell_cost, estimate
    from normbench.sweep.timing_probe import ProbeTimes

    plan = _plan(tmp_path, **{"train.epochs": 2, "train.batch_size": 10})  # checkpoint_every_s: the default 300
    bn = next(t for t in plan.tasks if t.config.norm.kind == "bn").config
    cost = cell_cost(bn, ProbeTimes.unknown(), n_train=500, n_test=1000, data_load_s=2.0)
    assert cost.total_s != cost.total_s  # NaN: unknown, not a number made up
    times = ProbeTimes(step_s=0.1, eval_image_s=0.001, train_forward_image_s=0.01, build_s=0.5, checkpoint_s=0.2)
    per_task, total = estimate(plan, workers=1,
                               measure=lambda cfg, threads: ProbeTimes.unknown() if cfg.norm.kind == "bn" else times,
                               start_s=lambda device: 4.0, load=lambda cfg: (500, 1000, 2.0))
    by_norm = {t.config.norm.kind: per_task[t.index] for t in plan.tasks}
    assert by_norm["bn"] != by_norm["bn"] and by_norm["gn"] > 0 and total == total


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_reports_the_whole_jobs_images_on_every_rank(world_size, monkeypatch):
    import torch

    from normbench import distributed
    from normbench.evaluation import evaluate

    class Data:
        test_x = torch.zeros(50, 3, 4, 4)
        test_y = torch.zeros(50, dtype=torch.long)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t, ctx: t)  # this process stands in for rank 0
    seen = []
    evaluate(model, Data(), lambda x: x, 8, dist_ctx=distributed.DistContext(rank=0, world_size=world_size),
             on_images=seen.append)
    assert seen == sorted(seen) and seen[-1] == 50, seen  # rank 0 ends at the whole test set
    assert seen[0] == min(50, 8 * world_size)


def test_both_sweep_views_count_a_refused_cell_as_failed():
    import io

    from normbench.sweep.display import PlainSweepDisplay, RichSweepDisplay
    from normbench.sweep.tasks import CellResult
    from rich.console import Console

    refused = CellResult(index=0, name="bn-b2-s0", run_dir="/nonexistent/bn-b2-s0", outcome="refused",
                         error="it holds a run made on other data")
    plain = PlainSweepDisplay(stream=io.StringIO())
    rich = RichSweepDisplay(console=Console(file=io.StringIO(), width=120))
    for view in (plain, rich):
        view.begin(2)
        view.started(0, "bn-b2-s0", 10, 0)
        view.finished(refused)
        assert view.c.failed == 1, type(view).__name__
        view.end(show_results=False)
