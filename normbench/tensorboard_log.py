"""A run's TensorBoard log in ``<run dir>/tb``: scalars, histograms and its HParams entry.

Scalars are written as they are given, except accuracies: a person reads them in percent, so
an accuracy tag is written as ``<tag>_percent`` with the value x 100 and a description saying
so (``test/acc`` -> ``test/acc_percent``; :func:`percent_tag`), and a difference of two
accuracies, in percentage points, as ``<tag>_points`` (``gap/train_eval_gap`` ->
``gap/train_eval_gap_points``). ``metrics.jsonl`` and ``summary.json`` keep fractions under the
original names.

The HParams entry (:mod:`normbench.tensorboard_hparams`) is begun when the run starts (its
values are added to the experiment of its log root, if that has one; a resumed run's earlier
entry is removed) and written when it ends, with how it ended and its final metrics. A
TensorBoard file that cannot be written (a full disk, a read-only ``tb/``) costs the run its
TensorBoard entry, never its result: those methods return a line to show instead of raising.
Disabled (``log.tensorboard: false``, or a rank other than 0), every method does nothing.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from normbench.errors import UserError
from normbench.hparams import STATUS, Value

# Differences of two accuracies: written in percentage points.
ACCURACY_DIFFERENCES = ("gap/train_eval_gap",)


def percent_tag(tag: str) -> Optional[str]:
    """The tag an accuracy scalar is written under x 100, None for other scalars. An accuracy
    is a tag whose last part has ``acc`` as one of its words (``test/acc``,
    ``gap/test_acc_train_mode``): ``<tag>_percent``; a difference of accuracies
    (:data:`ACCURACY_DIFFERENCES`) is in percentage points: ``<tag>_points``."""
    if tag in ACCURACY_DIFFERENCES:
        return f"{tag}_points"
    if "acc" in tag.rsplit("/", 1)[-1].split("_"):
        return f"{tag}_percent"
    return None


def percent_description(tag: str) -> str:
    unit = "percentage points" if tag in ACCURACY_DIFFERENCES else "percent (0-100)"
    return f"{tag} in {unit}; metrics.jsonl and summary.json keep it as a fraction"


class TensorBoardLog:
    """TensorBoard scalars, histograms and the HParams entry in ``run/tb``; a no-op when
    disabled."""

    def __init__(self, folder: Path, enabled: bool, purge_step: Optional[int] = None):
        self.folder = Path(folder)
        self.writer = None
        self.hparams: Optional[dict[str, Value]] = None
        self.started = time.time()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if not isinstance(value, (int, float)) or value != value:  # skip NaN and non-numbers
                continue
            shown = percent_tag(tag)
            if shown is None:
                self.writer.add_scalar(tag, value, step)
            else:
                self._add_described(shown, 100.0 * value, step, percent_description(tag))

    def _add_described(self, tag: str, value: float, step: int, description: str) -> None:
        """A scalar with a description TensorBoard shows (``add_scalar`` takes none), written
        through the writer's public ``file_writer`` (set while the writer is open)."""
        from normbench.tensorboard_hparams import scalar_summary

        self.writer.file_writer.add_summary(scalar_summary(tag, value, description), step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values, step)

    def begin_hparams(self, hparams: dict[str, Value], log_root: Path, elapsed_s: float = 0.0) -> Optional[str]:
        """Remember the run's values for its entry (the run began ``elapsed_s`` of run time
        ago: a resumed run's earlier processes); add them to the experiment of ``log_root`` if
        that has one and lacks them. Returns a line to show when that failed."""
        if self.writer is None:
            return None
        from normbench.tensorboard_hparams import RUN_HPARAMS_SUFFIX, join_experiment, remove_files

        self.hparams = dict(hparams)
        self.started = time.time() - elapsed_s
        notes = []
        try:
            remove_files(self.folder, RUN_HPARAMS_SUFFIX)  # a resumed run is running again
        except OSError as err:
            notes.append(f"cannot remove this run's earlier HParams entry in {self.folder}: {err.strerror or err}")
        try:
            join_experiment(Path(log_root), self.hparams)
        except UserError as err:
            notes.append(f"this run's values are not in the experiment of {log_root}: {err}")
        return f"TensorBoard: {'; '.join(notes)}" if notes else None

    def end_hparams(self, status: str, metrics: dict[str, float], step: int) -> Optional[str]:
        """Write the HParams entry: the run's values and ``status``, its metrics at ``step``
        (once: later calls do nothing). Returns a line to show when it could not be written."""
        if self.writer is None or self.hparams is None:
            return None
        from normbench.tensorboard_hparams import write_run_hparams

        hparams, self.hparams = self.hparams, None
        try:
            write_run_hparams(self.folder, {**hparams, STATUS: status}, status, metrics, step, self.started)
        except (UserError, OSError) as err:
            return f"TensorBoard: this run's HParams entry was not written: {err}"
        return None

    def close(self) -> Optional[str]:
        """Flush and close the event file (once: later calls do nothing). Returns a line to
        show when the last events could not be written."""
        writer, self.writer = self.writer, None
        if writer is None:
            return None
        try:
            writer.flush()
            writer.close()
        except OSError as err:
            return f"TensorBoard: the last events of {self.folder} were not written: {err.strerror or err}"
        return None
