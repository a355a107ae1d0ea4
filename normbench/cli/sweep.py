"""``normbench sweep``: train every cell of a sweep file (thin: parse flags, call
:mod:`normbench.sweep`, print, set the exit status: 0 ok; 1 some cell failed, diverged or did
not finish; 2 a user mistake, one line; 130 / 143 interrupted)."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from normbench.cli.app import DEVICE_METAVAR, app, complete_device, console, fail, flag_overrides
from normbench.errors import UserError


class Backend(str, Enum):
    """Where the cells train: local worker processes, or tasks of a Ray cluster."""

    local = "local"
    ray = "ray"


def _complete_sweep(incomplete: str) -> list[str]:
    """Shell completion of the sweep argument: the example sweeps' names (files complete as usual)."""
    from normbench.recipe_files import sweep_names

    return [name for name in sweep_names() if name.startswith(incomplete)]


@app.command(epilog="Example: normbench sweep quick --dry-run   (an example sweep by name; "
                    "or a file: normbench sweep my_sweep.yaml --workers 2)")
def sweep(
    sweep_arg: str = typer.Argument(..., metavar="SWEEP.yaml", autocompletion=_complete_sweep,
                                    help="The sweep file (base config, grid, rules), or the name of an example "
                                         "sweep (normbench list shows them); a file of that name wins."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: the file's out_dir, "
                                       "relative to the current folder)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key in every cell: a.b=value. Repeatable."),
    device: Optional[str] = typer.Option(None, "--device", metavar=DEVICE_METAVAR, autocompletion=complete_device,
                                         help="Device of every cell (the config's `device`)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells, their state and an estimated wall time."),
    no_estimate: bool = typer.Option(False, "--no-estimate", help="With --dry-run: skip the throughput probe."),
    force: bool = typer.Option(False, "--force", help="Retrain every cell from scratch, finished ones included."),
    rerun_failed: bool = typer.Option(False, "--rerun-failed", help="Retrain failed and diverged cells from scratch."),
    backend_choice: Backend = typer.Option(Backend.local, "--backend", help="local (worker processes) or ray."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (e.g. HOST:6379 or auto); "
                                          "default: start a local Ray instance."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1,
                                          help="Parallel cells (default: one per core, at most 8; one per GPU)."),
    threads: Optional[int] = typer.Option(None, "--threads-per-worker", "-t", min=1,
                                          help="Torch threads per cell (default: cores / workers; fewer cells than workers get the spare cores)."),
    gpus_per_cell: float = typer.Option(0.0, "--gpus-per-cell", min=0.0, help="Ray: num_gpus of each cell's task."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Plain log lines instead of the live view."),
    pack: int = typer.Option(1, "--pack", "-k", min=1, help="Train up to K cells that differ only in seed as one "
                             "packed network (grouped convolutions); each keeps its own run folder."),
    pack_max_batch: Optional[int] = typer.Option(None, "--pack-max-batch", min=1, help="With --pack: pack only cells "
                                                 "whose batch size is at most this (e.g. 8)."),
) -> None:
    """Train every cell of a sweep: skip finished cells, resume partial ones, record failures."""
    from normbench import sweep as sw

    if force and rerun_failed:
        fail("--force already retrains failed cells; give only one of --force and --rerun-failed")
    backend = backend_choice.value
    if address and backend != "ray":
        fail("--address is for --backend ray")
    try:
        from normbench.config import parse_overrides
        from normbench.recipe_files import sweep_file

        sweep_path = sweep_file(sweep_arg)
        spec = sw.load_sweep(sweep_path, out, parse_overrides(flag_overrides(set_, [("--device", "device", device)])))
        if backend == "local" or address is None:  # cells train on this machine: their devices must exist here
            sw.check_devices(spec.cells)
        if backend == "ray" and gpus_per_cell == 0 and any(c.cfg.device.startswith("cuda") for c in spec.cells):
            raise UserError("--gpus-per-cell: cells train on cuda but their Ray tasks would see no GPU; "
                            "give each a share, e.g. --gpus-per-cell 1")
        if not dry_run:  # before planning: a recorded cell counts as done only on the data it was made on
            sw.ensure_data(spec, log=lambda m: typer.echo(m, err=True))
        n_workers, n_threads = sw.local_layout(0, workers, threads, spec.cells)
        plan = sw.plan_sweep(spec, n_threads, force=force, rerun_failed=rerun_failed, pack=pack,
                             pack_max_batch=pack_max_batch)
        spare = sw.local_layout(len(plan.tasks), workers, threads, spec.cells)[1]
        if backend == "local" and spare != n_threads:  # fewer cells than workers: spare cores as threads
            n_threads = spare
            plan = sw.plan_sweep(spec, n_threads, force=force, rerun_failed=rerun_failed, pack=pack,
                             pack_max_batch=pack_max_batch)
        if dry_run:
            _print_dry_run(plan, n_workers, backend, no_estimate)
            return
        display = sw.make_display(no_progress)
        sw.write_manifest(spec)
        n_skip, n_train = len(plan.skipped), sum(len(t.cell_tasks) for t in plan.tasks)
        n_tasks = len(plan.tasks)
        packs = f" as {n_tasks} task{'s' if n_tasks != 1 else ''} (seeds packed)" if n_train != n_tasks else ""
        display.message(f"sweep {sweep_path.name}: {len(spec.cells)} cells in {spec.out_dir}; {n_train} to "
                        f"train{packs}, {n_skip} already recorded; backend {backend}"
                        + (f", {min(n_workers, max(1, len(plan.tasks)))} worker(s)" if backend == "local" else "")
                        + f" × {n_threads} thread(s)")
        if backend == "ray":
            executor = sw.RayExecutor(address, n_threads, gpus_per_cell, display,
                                      local_cpus=sw.ray_local_cpus(n_workers, n_threads, gpus_per_cell,
                                                                   sw.cuda_device_count()))
        else:
            gpus = sw.worker_gpus(spec.cells, os.environ.get("CUDA_VISIBLE_DEVICES"), sw.cuda_device_count())
            executor = sw.LocalExecutor(n_workers, n_threads, display, gpus=gpus)
        display.begin(len(plan.tasks), {t.index: t.cost for t in plan.tasks}, out_dir=spec.out_dir)
        ran = False
        try:
            results = executor.run(plan.tasks)
            ran = True
        finally:
            display.end(show_results=ran)  # after an error, its one line is all that is said
    except UserError as err:
        fail(str(err))
        return
    code = _print_outcome(plan, results, executor.interrupted, executor.exit_code)
    raise typer.Exit(code)


def _print_dry_run(plan, workers: int, backend: str, no_estimate: bool) -> None:
    from rich.table import Table

    from normbench import sweep as sw

    per_task, total = {}, None
    if plan.tasks and not no_estimate:
        per_task, total = sw.estimate(plan, workers, log=lambda m: typer.echo(m, err=True))
    tasks = {m.index: m for t in plan.tasks for m in t.cell_tasks}
    action_of = {"new": "train", "partial": "resume", "running": "wait (locked)", "failed": "retrain",
                 "diverged": "retrain", "done": "retrain", "other-data": "retrain"}
    table = Table(title=f"sweep {plan.sweep.path.name}: {len(plan.sweep.cells)} cells → {plan.sweep.out_dir}",
                  title_justify="left")
    for col in ("#", "cell", "state", "action", "est.", "run dir"):
        table.add_column(col, justify="right" if col in ("#", "est.") else "left", overflow="fold")
    for cell in plan.sweep.cells:
        state = plan.states[cell.index]
        task = tasks.get(cell.index)
        action = action_of[state] if task else "skip"
        if task and task.mode == "force" and state in ("partial", "running"):
            action = "retrain"
        est = sw.fmt_duration(per_task[cell.index]) if cell.index in per_task else ""
        table.add_row(str(cell.index), cell.name, state, action, est, cell.run_dir.name)
    out = console()
    out.print(table)
    counts: dict[str, int] = {}
    for state in plan.states.values():
        counts[state] = counts.get(state, 0) + 1
    out.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; {len(plan.tasks)} to train",
                  highlight=False)
    unknown = sum(1 for v in per_task.values() if v != v)
    if total is not None:
        if unknown:
            out.print(f"{unknown} cell(s) could not be probed and are not in the estimate", highlight=False)
        how = f"{min(workers, len(plan.tasks))} worker(s) × {plan.threads} thread(s)" if backend == "local" else \
            f"{workers} parallel task(s) of {plan.threads} CPU(s)"
        out.print(f"estimated wall time: {sw.fmt_duration(total)} with {how} (timed steps and evaluations per model "
                      "and batch in this process, with start-up, every evaluation and checkpoint writes counted; "
                      "parallel workers share memory bandwidth, so expect somewhat more)",
                      highlight=False)


def _print_outcome(plan, results: list, interrupted: bool, interrupt_code: int = 130) -> int:
    from rich.table import Table

    from normbench import sweep as sw

    out = console()
    results = [m for r in results for m in r.cell_results]  # a packed task reports each member
    trained = [r for r in results if r.outcome == "trained"]
    locked = [r for r in results if r.outcome == "locked"]
    final = {c.index: sw.cell_state(c) for c in plan.sweep.cells}
    counts: dict[str, int] = {}
    for state in final.values():
        counts[state] = counts.get(state, 0) + 1
    out.print(f"sweep {'interrupted' if interrupted else 'finished'}: {len(trained)} cell(s) trained or resumed this time; "
                  "now " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), highlight=False)
    for r in locked:
        out.print(f"{r.name}: still locked by {r.holder}", highlight=False)
    refused = [r for r in results if r.outcome == "refused"]
    for r in refused:
        out.print(f"{r.name}: not trained: {r.error}", highlight=False)
    unfinished = [r for r in trained if final.get(r.index) in ("new", "partial")]
    for r in unfinished:  # its worker died, or the sweep machinery failed: the folder resumes
        out.print(f"{r.name}: not finished ({r.error or r.status or 'stopped early'}); run the sweep again to "
                  "resume it", highlight=False)
    bad = [c for c in plan.sweep.cells if final[c.index] in ("failed", "diverged")]
    if bad:
        table = Table(title="failed or diverged cells", title_justify="left")
        for col in ("cell", "status", "step", "note", "log"):
            table.add_column(col, overflow="fold")
        for cell in bad:
            summary, problem = sw.safe_summary(cell.run_dir)
            summary = summary or {}
            step = summary.get("diverged_step") if summary.get("status") == "diverged" else summary.get("steps")
            note = (summary.get("note") or problem or "")[:240]  # long enough for a remedy after a path
            table.add_row(cell.name, final[cell.index], "" if step is None else str(step), note,
                          str(sw.log_path(cell.run_dir)))
        out.print(table)
    if interrupted:
        return interrupt_code
    if refused:
        return 2
    return 1 if bad or unfinished else 0
