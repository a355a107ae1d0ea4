"""``normbench train``: one run from a config (resumed if interrupted, skipped if complete),
or the same under torchrun with ``--nproc``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import typer

from normbench.cli.app import app, fail
from normbench.errors import UserError


@app.command()
def train(
    config: List[Path] = typer.Option([], "--config", "-c", help="YAML run config. Repeatable: the files merge "
                                      "left to right, a later file overriding an earlier one key by key; "
                                      "--set overrides come last."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key: a.b=value (value is YAML). Repeatable."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the config and build the model; no training."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard any previous results of this config and start over."),
    wait: bool = typer.Option(False, "--wait", help="If another process is training this run, wait for it to "
                              "finish, then continue (default: refuse at once, naming it)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (plain log lines only)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes (launches torchrun; "
                              "train.batch_size is per process)."),
) -> None:
    """Train one run; resume it if it was interrupted; skip it if it already completed."""
    if nproc > 1:
        try:
            _check_processes(nproc, config, set_)
        except UserError as err:
            fail(str(err))
        _launch_torchrun(nproc, config, set_, fresh, no_progress, wait)
        return
    try:
        from normbench.config import dump_config, load_config

        cfg = load_config(config, set_)
        if print_config:
            typer.echo(dump_config(cfg), nl=False)
            return
        if dry_run:
            from normbench.training.entry import dry_run as do_dry_run

            typer.echo(do_dry_run(cfg))
            return
        from normbench.training.entry import train as run_training
        from normbench.progress import make_progress, print_summary
        from normbench.tracking import check_folder_creatable

        check_folder_creatable(cfg.log.out_dir, "log.out_dir")
        summary = run_training(cfg, fresh=fresh, progress=make_progress(no_progress), wait=wait)
    except UserError as err:
        fail(str(err))
        return
    print_summary(summary)
    if "exit_code" in summary:
        raise typer.Exit(summary["exit_code"])
    if summary["status"] != "completed":
        raise typer.Exit(1)


def _check_processes(nproc: int, config, set_) -> None:
    """Before launching: the config is valid, and on CUDA there is a GPU for every process."""
    from normbench.config import load_config
    from normbench.device import resolve_device

    device = resolve_device(load_config(config, set_).device)
    if device.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise UserError(f"--nproc: got {nproc} but this machine has {torch.cuda.device_count()} CUDA "
                            "device(s); one process per GPU")


def _launch_torchrun(nproc: int, config, set_, fresh: bool, no_progress: bool, wait: bool = False) -> None:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    import subprocess

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "normbench", "train"]
    for path in config:
        args += ["--config", str(path)]
    for item in set_:
        args += ["--set", item]
    args += ["--fresh"] * fresh + ["--no-progress"] * no_progress + ["--wait"] * wait
    code = subprocess.call(args)
    if code not in (0, 1, 2, 130, 143):
        fail(f"torchrun with {nproc} processes ended with status {code} (a process failed; see above)", code)
    raise typer.Exit(code)
