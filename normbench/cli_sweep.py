"""`normbench sweep` (train a grid of runs) and `normbench report` (tables and plots of runs).

Both stay thin: parse flags, call :mod:`normbench.sweep` / :mod:`normbench.report`, print,
set the exit status (0 ok; 1 some cell failed or diverged; 2 a user mistake, one line;
130 interrupted).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from normbench.cli import app, fail
from normbench.errors import UserError


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., metavar="SWEEP.yaml", help="The sweep file (base config, grid, rules)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: the file's out_dir)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key in every cell: a.b=value. Repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells, their state and an estimated wall time."),
    no_estimate: bool = typer.Option(False, "--no-estimate", help="With --dry-run: skip the throughput probe."),
    force: bool = typer.Option(False, "--force", help="Retrain every cell from scratch, finished ones included."),
    rerun_failed: bool = typer.Option(False, "--rerun-failed", help="Retrain failed and diverged cells from scratch."),
    backend: str = typer.Option("local", "--backend", help="local (worker processes) or ray."),
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
    if backend not in ("local", "ray"):
        fail(f"--backend: got '{backend}'; allowed: local, ray")
    if address and backend != "ray":
        fail("--address is for --backend ray")
    try:
        from normbench.config import parse_overrides

        spec = sw.load_sweep(sweep_file, out, parse_overrides(set_))
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
        n_skip = len(plan.skipped)
        display.message(f"sweep {sweep_file.name}: {len(spec.cells)} cells in {spec.out_dir}; {len(plan.tasks)} to "
                        f"train, {n_skip} already recorded; backend {backend}"
                        + (f", {min(n_workers, max(1, len(plan.tasks)))} worker(s)" if backend == "local" else "")
                        + f" × {n_threads} thread(s)")
        if backend == "ray":
            executor = sw.RayExecutor(address, n_threads, gpus_per_cell, display,
                                      local_cpus=n_workers * n_threads)
        else:
            executor = sw.LocalExecutor(n_workers, n_threads, display, cuda_devices=sw.cuda_device_count()
                                        if any(c.cfg.device != "cpu" for c in spec.cells) else 0)
        display.begin(len(plan.tasks), {t["index"]: t["cost"] for t in plan.tasks})
        try:
            results = executor.run(plan.tasks)
        finally:
            display.end()
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
    tasks = {m["index"]: m for t in plan.tasks for m in t.get("pack", [t])}
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
        if task and task["mode"] == "force" and state in ("partial", "running"):
            action = "retrain"
        est = sw.fmt_duration(per_task[cell.index]) if cell.index in per_task else ""
        table.add_row(str(cell.index), cell.name, state, action, est, cell.run_dir.name)
    console = _console()
    console.print(table)
    counts: dict[str, int] = {}
    for state in plan.states.values():
        counts[state] = counts.get(state, 0) + 1
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; {len(plan.tasks)} to train",
                  highlight=False)
    unknown = sum(1 for v in per_task.values() if v != v)
    if total is not None:
        if unknown:
            console.print(f"{unknown} cell(s) could not be probed and are not in the estimate", highlight=False)
        how = f"{min(workers, len(plan.tasks))} worker(s) × {plan.threads} thread(s)" if backend == "local" else \
            f"{workers} parallel task(s) of {plan.threads} CPU(s)"
        console.print(f"estimated wall time: {sw.fmt_duration(total)} with {how} (from a short throughput probe in "
                      "this process; parallel workers share memory bandwidth, so expect somewhat more)",
                      highlight=False)


def _print_outcome(plan, results: list[dict], interrupted: bool, interrupt_code: int = 130) -> int:
    from rich.table import Table

    from normbench import sweep as sw

    console = _console()
    results = [m for r in results for m in r.get("members", [r])]  # a packed task reports each member
    trained = [r for r in results if r["outcome"] == "trained"]
    locked = [r for r in results if r["outcome"] == "locked"]
    final = {c.index: sw.cell_state(c) for c in plan.sweep.cells}
    counts: dict[str, int] = {}
    for state in final.values():
        counts[state] = counts.get(state, 0) + 1
    console.print(f"sweep {'interrupted' if interrupted else 'finished'}: {len(trained)} cell(s) trained or resumed this time; "
                  "now " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), highlight=False)
    for r in locked:
        console.print(f"{r['name']}: still locked by {r.get('holder')}", highlight=False)
    refused = [r for r in results if r["outcome"] == "refused"]
    for r in refused:
        console.print(f"{r['name']}: not trained: {r.get('error')}", highlight=False)
    bad = [c for c in plan.sweep.cells if final[c.index] in ("failed", "diverged")]
    if bad:
        table = Table(title="failed or diverged cells", title_justify="left")
        for col in ("cell", "status", "step", "note", "log"):
            table.add_column(col, overflow="fold")
        for cell in bad:
            summary, problem = sw._safe_summary(cell.run_dir)
            summary = summary or {}
            step = summary.get("diverged_step") if summary.get("status") == "diverged" else summary.get("steps")
            note = (summary.get("note") or problem or "")[:240]  # long enough for a remedy after a path
            table.add_row(cell.name, final[cell.index], "" if step is None else str(step), note,
                          str(sw.log_path(cell.run_dir)))
        console.print(table)
    if interrupted:
        return interrupt_code
    if refused:
        return 2
    return 1 if bad else 0


@app.command()
def report(
    folder: Path = typer.Argument(..., metavar="DIR", help="A sweep folder or any folder of runs."),
    format_: List[str] = typer.Option([], "--format", "-f", help="Also write report.md / .csv / .json: md, csv, "
                                      "json (repeatable or a comma list)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the --format files (default DIR)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw accuracy vs batch size to this PNG file."),
    error: bool = typer.Option(False, "--error", help="Report test error (100 - accuracy) instead of accuracy."),
    metric: str = typer.Option("final", "--metric", help="final (end of training) or best (best evaluation)."),
    small_batch: Optional[int] = typer.Option(None, "--small-batch", help="Batch effect: this batch size minus "
                                              "--ref-batch, paired by seed (default: the smallest batch)."),
    ref_batch: Optional[int] = typer.Option(None, "--ref-batch", help="Reference batch of the batch effect "
                                            "(default 32, or the largest batch when no run has 32)."),
) -> None:
    """Tables (method × batch size, mean with a 95% interval over seeds) and plots from run summaries."""
    from normbench import report as rp

    try:
        formats = rp.parse_formats(format_)
        if metric not in rp.METRICS:
            raise UserError(f"--metric: got '{metric}'; allowed: {', '.join(rp.METRICS)}")
        if plot is not None and plot.suffix.lower() != ".png":
            raise UserError(f"--plot: got '{plot}'; give a file name ending in .png")
        runs = rp.collect(folder, warn=lambda m: typer.echo(f"normbench: warning: {m}", err=True))
        if not runs:
            raise UserError(f"report: no runs under {folder} (no summary.json found)")
        columns, plots_hook = rp.analysis_columns()
        result = rp.build_report(runs, metric=metric, error=error, extra_columns=columns,
                                 small_batch=small_batch, ref_batch=ref_batch)
        rp.render_terminal(result, _console())
        written = rp.write_files(result, formats, out or folder) if formats else []
        if plot is not None:
            written.append(rp.plot(result, plot))
            from normbench.report_plots import plot_curves

            curves = plot.parent / "accuracy_curves.png"
            written.append(plot_curves(result, curves if curves != plot else plot.with_name("accuracy_epochs.png")))
            if plots_hook is not None:
                summaries = [{**r.summary, "_dir": str(r.path)} for r in runs if r.summary]
                written += list(plots_hook(summaries, plot.parent) or [])
    except UserError as err:
        fail(str(err))
        return
    for path in written:
        if path is not None:
            typer.echo(f"wrote {path}")
