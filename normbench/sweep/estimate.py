"""The dry run's time estimate. Each task (a cell, or a pack of cells) costs

* its remaining training steps, at the step time a short probe measured for its model, norm,
  clipping and batch size (:mod:`normbench.sweep.timing_probe`);
* every test-set evaluation its config still does (each ``train.eval_every`` epochs and after
  the last), at the measured seconds per evaluated image;
* its measurements: the train-mode evaluation (batch-dependent norms with
  ``analysis.train_mode_eval``, forwards at the run's batch), precise BN (its recalibration
  images, then a test pass), the landscape probes (fixed: forward and backward on the probe
  batch at each distance; lr: one step's worth per multiplier), dead units, histograms;
* its checkpoint writes (each epoch end, and every ``log.checkpoint_every_s`` mid-epoch);
* its start-up: loading the data (md5 check included) and building the model;

and every worker process pays the Python and torch start-up once, after the sweep process
itself has started and validated every cell (one model build each). Tasks go greedily to
the first free worker, longest first, as the executors hand them out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from normbench.config import RunConfig
from normbench.progress_eta import STEP_IN_FORWARDS
from normbench.sweep.keys import freeze
from normbench.sweep.plan import Plan
from normbench.sweep.state import safe_summary
from normbench.sweep.timing_probe import ProbeTimes, data_load, probe_times, process_start_s
from normbench.training.phases import evaluations_due_after

# A packed network's step per member is faster than a model alone: 1.27x at K = 4 and 1.44x at
# K = 8 at batch 2 (docs/performance.md, "Why packing gives no more"); the lower figure.
PACKED_STEP_GAIN = 1.27


@dataclass(frozen=True)
class CellCost:
    """Estimated seconds of one cell's remaining work, by part."""

    steps_s: float
    evaluation_s: float
    measurements_s: float
    checkpoints_s: float
    startup_s: float

    @property
    def total_s(self) -> float:
        return self.steps_s + self.evaluation_s + self.measurements_s + self.checkpoints_s + self.startup_s


def _batch_dependent(cfg: RunConfig) -> bool:
    """Whether the cell gets a train-mode evaluation and precise BN: decided from the config,
    where the run decides from its model's running statistics (a test holds the two equal)."""
    from normbench.norms import get_scheme

    return get_scheme(cfg.norm.kind).batch_dependent


def _measurements_s(cfg: RunConfig, t: ProbeTimes, n_train: int, n_test: int, done: int, total: int) -> float:
    """Seconds of the ``analysis.*`` measurements still due after step ``done`` of ``total``."""
    from normbench.analysis.probes import probe_schedule
    from normbench.evaluation import images_evaluated

    a, b = cfg.analysis, cfg.train.batch_size
    left = max(0, total - done)
    spe = max(1, total // max(1, cfg.train.epochs))
    seconds = 0.0
    if left and a.train_mode_eval and _batch_dependent(cfg):  # at the end of a completed run
        seconds += images_evaluated(n_test, b, train_mode=True) * t.train_forward_image_s
    if left and a.precise_bn and _batch_dependent(cfg):
        seconds += (min(a.precise_bn_images, n_train) + n_test) * t.eval_image_s
    if a.probe and a.probe_mode == "fixed":
        due = [s for s in probe_schedule(total, a.probes_per_run) if s >= done]
        seconds += len(due) * (1 + len(a.probe_distances)) * min(a.probe_images, n_test) * STEP_IN_FORWARDS * t.eval_image_s
    elif a.probe:
        seconds += left / a.probe_every * len(a.probe_multipliers) * t.step_s
    if a.dead_units:
        epochs_left = cfg.train.epochs - done // spe
        seconds += epochs_left * a.dead_units_images * t.train_forward_image_s
    if a.hist_every:
        seconds += left / a.hist_every * t.step_s / STEP_IN_FORWARDS
    return seconds


def cell_cost(cfg: RunConfig, t: ProbeTimes, n_train: int, n_test: int, data_load_s: float,
              done_steps: int = 0) -> CellCost:
    """The estimated cost of training ``cfg`` from step ``done_steps`` to its end (see the
    module docstring), from the probe's times and the data's sizes and load time."""
    spe = max(1, n_train // cfg.train.batch_size)
    total = spe * cfg.train.epochs
    done = min(done_steps, total)
    steps_s = (total - done) * t.step_s
    evaluation_s = evaluations_due_after(cfg, done // spe) * n_test * t.eval_image_s
    timed = steps_s == steps_s  # NaN: the cell could not be probed (its cost stays NaN, left out)
    mid_epoch = int(steps_s // cfg.log.checkpoint_every_s) if cfg.log.checkpoint_every_s and timed else 0
    checkpoints_s = (cfg.train.epochs - done // spe + mid_epoch) * t.checkpoint_s
    return CellCost(steps_s, evaluation_s, _measurements_s(cfg, t, n_train, n_test, done, total), checkpoints_s,
                    data_load_s + t.build_s)


def pack_cost(members: list[CellCost]) -> float:
    """A pack trains its members as one network: their steps at the packed gain, everything
    else member by member, the data loaded and the start paid once."""
    rest = sum(m.evaluation_s + m.measurements_s + m.checkpoints_s for m in members)
    return sum(m.steps_s for m in members) / PACKED_STEP_GAIN + rest + members[0].startup_s


def schedule(costs: list[float], workers: int, worker_start_s: float, prelude_s: float = 0.0) -> float:
    """Wall time of tasks handed, in order, each to the first free of ``workers`` workers
    that each start in ``worker_start_s``, after ``prelude_s`` (NaN costs are left out)."""
    finish = [worker_start_s] * max(1, workers)
    for cost in costs:
        if cost != cost:
            continue
        i = min(range(len(finish)), key=finish.__getitem__)
        finish[i] += cost
    return prelude_s + (max(finish) if costs else 0.0)


def estimate(plan: Plan, workers: int, log: Callable[[str], None] = lambda m: None,
             measure: Callable = probe_times, start_s: Callable[[str], float] = process_start_s,
             load: Callable = data_load) -> tuple[dict[int, float], float]:
    """Estimated seconds per task (its remaining work and its start-up) and the sweep's wall
    time with ``workers`` parallel workers. ``measure``, ``start_s`` and ``load`` take the
    measurements (:mod:`normbench.sweep.timing_probe`; replaceable in tests)."""
    probes: dict[str, ProbeTimes] = {}
    data: dict[tuple, tuple[int, int, float]] = {}
    per_task: dict[int, float] = {}
    builds: list[float] = []  # the sweep validates every cell (a forward of its model) before any worker starts
    for task in plan.tasks:
        members = []
        for cell in task.cell_tasks:
            t = _probe(cell, plan.threads, probes, measure, log)
            cfg = cell.config
            key = (str(cfg.data.resolved_root()), cfg.data.train_subset)
            if key not in data:
                data[key] = load(cfg)
            n_train, n_test, load_s = data[key]
            done = 0
            if cell.mode != "force" and plan.states.get(cell.index) == "partial":
                done = _checkpoint_step(cell.run_dir)
            members.append(cell_cost(cfg, t, n_train, n_test, load_s, done))
            builds.append(t.build_s)
        per_task[task.index] = members[0].total_s if len(members) == 1 else pack_cost(members)
    if not plan.tasks:
        return per_task, 0.0
    device = plan.tasks[0].config.device
    start = start_s(device)
    if start != start:
        log("could not time a worker's start-up; it is left out of the estimate")
        start = 0.0
    # the sweep process: its own start, the data checked once per data set, every cell validated
    prelude = start + sum(load_s for _, _, load_s in data.values()) + sum(b for b in builds if b == b)
    return per_task, schedule([per_task[t.index] for t in plan.tasks], workers, start, prelude)


def _probe(cell, threads: int, probes: dict, measure: Callable, log: Callable[[str], None]) -> ProbeTimes:
    cfg = cell.config
    key = freeze([cfg.model.model_dump(), cfg.norm.model_dump(), cfg.clip.model_dump(), cfg.train.batch_size,
                  cfg.train.eval_batch_size, cfg.train.channels_last, cfg.device])
    if key not in probes:
        log(f"probing {cfg.norm.kind} at batch {cfg.train.batch_size}")
        try:
            probes[key] = measure(cfg, threads)
        except Exception as err:  # noqa: BLE001 - the run itself will report it properly
            log(f"probe of {cell.name} failed ({type(err).__name__}: {err}); no estimate for it")
            probes[key] = ProbeTimes.unknown()
    return probes[key]


def _checkpoint_step(run_dir: Path) -> int:
    summary, _ = safe_summary(run_dir)
    if summary and summary.get("steps"):
        return int(summary["steps"])
    try:
        from normbench.tracking import RunDir

        ckpt = RunDir(run_dir).load_checkpoint()
        return int(ckpt["state"]["step"]) if ckpt else 0
    except Exception:  # noqa: BLE001 - an estimate only
        return 0
