"""Sweeps: a grid of run configs from one YAML file, trained by local processes or by Ray.

One job per module, each using only the ones above it:

* :mod:`~normbench.sweep.keys`: dotted config keys (check, look up, nest, flatten).
* :mod:`~normbench.sweep.spec`: the sweep file -> validated cells (grid, rules, run names,
  :func:`load_sweep`, the model preflight).
* :mod:`~normbench.sweep.state`: what a cell's run folder holds (:func:`judge_run`, the one
  place that decides "complete" and "made on other data"), and the per-cell lock.
* :mod:`~normbench.sweep.tasks`: the task (one cell or a pack) and result objects the
  executors pass to their workers.
* :mod:`~normbench.sweep.cell`: running a task in a worker (lock, re-check, train).
* :mod:`~normbench.sweep.layout`: local workers and threads per worker.
* :mod:`~normbench.sweep.plan`: which cells to train, in which order, packed how; the
  manifest; the data made ready first.
* :mod:`~normbench.sweep.timing_probe`, :mod:`~normbench.sweep.estimate`: the dry run's
  time estimate (the measurements, then the schedule).
* :mod:`~normbench.sweep.display`: the progress views; :mod:`~normbench.sweep.results`: the
  results table printed at the end.
* :mod:`~normbench.sweep.signals`, :mod:`~normbench.sweep.local`,
  :mod:`~normbench.sweep.ray_backend`: the two executors (``LocalExecutor``: N spawned
  worker processes; ``RayExecutor``: every task a Ray task) and their interrupt handling.

Below, the names the ``normbench sweep`` command uses.
"""
from normbench.sweep.display import fmt_duration, make_display
from normbench.sweep.estimate import estimate
from normbench.sweep.layout import cuda_device_count, local_layout, ray_local_cpus, worker_gpus
from normbench.sweep.local import LocalExecutor
from normbench.sweep.plan import ensure_data, plan_sweep, write_manifest
from normbench.sweep.ray_backend import RayExecutor
from normbench.sweep.spec import check_devices, load_sweep
from normbench.sweep.state import cell_state, log_path, safe_summary

__all__ = ["LocalExecutor", "RayExecutor", "cell_state", "check_devices", "cuda_device_count", "ensure_data", "estimate",
           "fmt_duration", "load_sweep", "local_layout", "log_path", "make_display", "plan_sweep", "ray_local_cpus",
           "safe_summary", "worker_gpus", "write_manifest"]
