"""A sweep's TensorBoard view, made when the sweep starts (before any worker): the HParams
experiment at its folder (the union of the values its cells take), and an HParams entry for
each of its recorded runs that has none.

Run folders recorded before runs wrote their own entries hold instead, in one small events
file under ``tb/`` (``SummaryWriter.add_hparams``), an experiment of their own with only their
own values, and an entry without its real status. TensorBoard shows one experiment per log
folder and may pick any run's (its fast loader does not prefer the root's), so such a file
would hide the sweep's domains again. It is set aside, renamed ``tb/superseded-hparams.<...>``
(kept; TensorBoard reads only files whose name holds "tfevents"), and the run gets an entry
written from its ``summary.json`` and ``metrics.jsonl``. Only settled runs are touched
(completed, diverged, failed); an interrupted run writes its own entry when it resumes.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

from normbench.errors import UserError
from normbench.hparams import STATUS, config_hparams, domains, final_metrics, runtime_hparams
from normbench.tensorboard_hparams import RUN_HPARAMS_SUFFIX, hparams_files, write_experiment, write_run_hparams
from normbench.tracking import RunDir, read_summary

SUPERSEDED_PREFIX = "superseded-hparams."
SETTLED = ("completed", "diverged", "failed")
# add_hparams writes a file of a few hundred bytes; a run's scalar file is read only below this.
SMALL_EVENTS_FILE = 64 * 1024


def write_sweep_experiment(out_dir: Path, cfgs: Iterable) -> None:
    """The experiment of a sweep at its folder, over the cells that log to TensorBoard; then
    an entry for each of their recorded runs that has none (:func:`adopt_recorded_run`)."""
    cfgs = [cfg for cfg in cfgs if cfg.log.tensorboard]
    if not cfgs:
        return
    write_experiment(out_dir, domains(config_hparams(cfg) for cfg in cfgs))
    for cfg in cfgs:
        adopt_recorded_run(RunDir(cfg.run_dir()))


def run_experiment_files(tb: Path) -> list[Path]:
    """The small events files in a run's ``tb/`` that declare an experiment of their own."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    found = []
    for path in sorted(Path(tb).glob("*tfevents*")):
        if path.name.endswith(RUN_HPARAMS_SUFFIX) or path.stat().st_size > SMALL_EVENTS_FILE:
            continue
        try:
            tags = {v.tag for event in EventFileLoader(str(path)).Load() for v in event.summary.value}
        except Exception:  # noqa: BLE001 - an unreadable file declares nothing TensorBoard could use
            continue
        if metadata.EXPERIMENT_TAG in tags:
            found.append(path)
    return found


def last_train_loss(run_dir: RunDir) -> Optional[float]:
    """The last finite ``train/loss`` of a run's metrics.jsonl."""
    if not run_dir.metrics.exists():
        return None
    for line in reversed(run_dir.metrics.read_text().splitlines()):
        try:
            loss = json.loads(line).get("train/loss")
        except ValueError:
            continue
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            return float(loss)
    return None


def adopt_recorded_run(run_dir: RunDir) -> bool:
    """Give a settled run without an HParams entry one, from its summary, and set aside the
    experiment file of its own it may hold. True when it did; a run it cannot read is left."""
    from normbench.config import RunConfig

    if not run_dir.tb.is_dir() or hparams_files(run_dir.tb, RUN_HPARAMS_SUFFIX):
        return False
    try:
        summary = read_summary(run_dir.summary)
        cfg = RunConfig.model_validate(summary["config"]) if summary else None
    except Exception:  # noqa: BLE001 - a corrupt or outdated summary: nothing to show from it
        return False
    status = summary.get("status") if summary else None
    if cfg is None or status not in SETTLED:
        return False
    world = summary.get("world_size") or 1
    resolved = runtime_hparams(summary.get("device"), summary.get("compiled"), bool(summary.get("channels_last")),
                               world)
    values = {**config_hparams(cfg, world), **resolved, STATUS: status}
    metrics = final_metrics(status, summary.get("last_eval") or {}, summary.get("best_test_acc") or 0.0,
                            last_train_loss(run_dir))
    try:
        started = run_dir.summary.stat().st_mtime - (summary.get("wall_time_s") or 0.0)
        write_run_hparams(run_dir.tb, values, status, metrics, int(summary.get("steps") or 0), started)
        for path in run_experiment_files(run_dir.tb):
            os.replace(path, path.with_name(SUPERSEDED_PREFIX + path.name.split("tfevents.", 1)[-1]))
    except (UserError, OSError):  # a read-only run folder: the sweep goes on; the dashboard may miss it
        return False
    return True
