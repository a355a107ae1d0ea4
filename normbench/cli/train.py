"""``normbench train``: one run from a method recipe and/or config files (resumed if
interrupted, skipped if complete), or the same under torchrun with ``--nproc``."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from normbench.cli.app import DEVICE_METAVAR, app, complete_device, fail, flag_overrides
from normbench.errors import UserError
from normbench.recipe_files import BASE_RECIPE, method_names, method_recipe

# The method recipes shipped in the package (normbench/recipes/methods/<name>.yaml), as --method's choices.
Method = Enum("Method", {name: name for name in method_names()}, type=str)

EXAMPLE = "Example: normbench train --method gn --set train.batch_size=8"


@app.command(epilog=EXAMPLE)
def train(
    method: Optional[Method] = typer.Option(None, "--method", "-m", help="Start from this method's recipe "
                                            "(normbench list shows them); --config files and --set apply on top."),
    config: List[Path] = typer.Option([], "--config", "-c", help="YAML run config. Repeatable: the files merge "
                                      "left to right, a later file overriding an earlier one key by key; "
                                      "--set overrides come last. Neither --config nor --method: the base recipe."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key: a.b=value (value is YAML). Repeatable."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Output folder: log.out_dir "
                                       "(the run folder goes inside it)."),
    device: Optional[str] = typer.Option(None, "--device", metavar=DEVICE_METAVAR, autocompletion=complete_device,
                                         help="Device to train on (the config's `device`)."),
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
    base_only = method is None and not config  # neither given: the base recipe, said in one line
    try:
        paths, source = _config_files(method.value if method else None, config)
        sets = flag_overrides(set_, [("--device", "device", device), ("--out", "log.out_dir", out and str(out))])
        if nproc > 1:
            cfg = _check_processes(nproc, paths, sets, source)
            if base_only:
                _print_defaults_note(cfg)
            _launch_torchrun(nproc, paths, sets, fresh, no_progress, wait)
            return
        from normbench.config import dump_config, load_config

        cfg = load_config(paths, sets, source=source)
        if print_config:
            typer.echo(dump_config(cfg), nl=False)
            return
        if dry_run:
            from normbench.training.entry import dry_run as do_dry_run

            report = do_dry_run(cfg)
            if base_only:
                _print_defaults_note(cfg)
            typer.echo(report)
            return
        from normbench.training.entry import train as run_training
        from normbench.progress import make_progress, print_summary
        from normbench.tracking import check_folder_creatable

        check_folder_creatable(cfg.log.out_dir, "--out" if out is not None else "log.out_dir")
        progress = make_progress(no_progress)
        if base_only:  # said once every check has passed, as training starts
            progress.start = _first(lambda: _print_defaults_note(cfg), progress.start)
        summary = run_training(cfg, fresh=fresh, progress=progress, wait=wait)
    except UserError as err:
        fail(str(err))
        return
    print_summary(summary)
    if "exit_code" in summary:
        raise typer.Exit(summary["exit_code"])
    if summary["status"] != "completed":
        raise typer.Exit(1)


def _config_files(method: Optional[str], config: List[Path]) -> tuple[list[Path], Optional[str]]:
    """The files to merge (the method's recipe first, then --config files; the base recipe
    when there is neither) and how error lines name them (None: the files' paths)."""
    if method is None and not config:
        return [BASE_RECIPE], "config"
    paths = ([method_recipe(method)] if method else []) + list(config)
    return paths, " + ".join([f"--method {method}"] * bool(method) + [str(p) for p in config])


def _first(before, call):
    """``call``, with ``before()`` run once ahead of its first call."""
    done = []

    def wrapped(*args, **kwargs):
        if not done:
            done.append(True)
            before()
        return call(*args, **kwargs)

    return wrapped


def _print_defaults_note(cfg) -> None:
    """With neither --config nor --method: one line on stderr saying what the base recipe trains."""
    from normbench.cli.describe import describe_run

    typer.echo(f"normbench: no --config or --method: training the base recipe ({describe_run(cfg.to_dict())}); "
               "`normbench list` shows the method recipes", err=True)


def _check_processes(nproc: int, paths: list[Path], sets: list[str], source: Optional[str]):
    """Before launching: the config is valid, and on CUDA there is a GPU for every process.
    Returns the resolved config."""
    from normbench.config import load_config
    from normbench.device import resolve_device

    cfg = load_config(paths, sets, source=source)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise UserError(f"--nproc: got {nproc} but this machine has {torch.cuda.device_count()} CUDA "
                            "device(s); one process per GPU")
    return cfg


def _launch_torchrun(nproc: int, paths: list[Path], sets: list[str], fresh: bool, no_progress: bool,
                     wait: bool = False) -> None:
    """Re-run this command under torchrun with ``nproc`` processes on this machine (the
    resolved files and overrides passed on as --config and --set)."""
    import subprocess

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "normbench", "train"]
    for path in paths:
        args += ["--config", str(path)]
    for item in sets:
        args += ["--set", item]
    args += ["--fresh"] * fresh + ["--no-progress"] * no_progress + ["--wait"] * wait
    code = subprocess.call(args)
    if code not in (0, 1, 2, 130, 143):
        fail(f"torchrun with {nproc} processes ended with status {code} (a process failed; see above)", code)
    raise typer.Exit(code)
