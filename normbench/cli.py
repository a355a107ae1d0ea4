"""The ``normbench`` command line. Thin: parse, load the config, call the library, print, exit.

Exit statuses: 0 success; 1 a run diverged or failed; 2 a user mistake (one line on stderr,
never a traceback); 130 / 143 interrupted by SIGINT / SIGTERM (checkpoint written).
Heavy modules (torch) are imported inside the commands so that ``--help`` stays fast.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from normbench import __version__
from normbench.errors import UserError

# click's UsageError, whether typer uses click or its own copy of it (typer.BadParameter derives from it)
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _usage_error(err, group_ctx) -> None:
    """Print a click usage error (unknown flag, missing argument, a flag value out of range,
    an unknown command) as one line, like every other error, and exit with status 2.
    ``group_ctx``: the context of the group that caught it (for errors that carry none)."""
    if type(err).__name__ == "NoArgsIsHelpError":  # a bare command: click prints its help
        raise err
    ctx, names = err.ctx, []
    if ctx is None and group_ctx is not None:
        ctx, names = group_ctx, [group_ctx.invoked_subcommand] if group_ctx.invoked_subcommand else []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    command = " ".join(["normbench", *names])
    message = " ".join(err.format_message().split())
    where = f"{' '.join(names)}: " if names else ""
    typer.echo(f"normbench: error: {where}{message} (see '{command} --help')", err=True)
    raise typer.Exit(err.exit_code)


class _OneLineUsageErrors(TyperGroup):
    """The class of normbench's command groups. Every usage error of every command passes
    through a group's make_context (the group's own flags) or invoke (the command name, then
    the command's flags and arguments) and is printed by :func:`_usage_error` instead of
    typer's boxed panel."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _UsageError as err:
            _usage_error(err, parent)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _UsageError as err:
            _usage_error(err, ctx)


app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Measure BatchNorm and its alternatives across small batch sizes on CIFAR-10.")
data_app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True, help="Manage the CIFAR-10 data set.")
app.add_typer(data_app, name="data")


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit (status 2 for user mistakes)."""
    typer.echo(f"normbench: error: {message}", err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"normbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """normbench: train CIFAR-10 ResNets with many normalizations and compare them."""


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
        _launch_torchrun(nproc, config, set_, fresh, no_progress, wait)
        return
    try:
        from normbench.config import dump_config, load_config

        cfg = load_config(config, set_)
        if print_config:
            typer.echo(dump_config(cfg), nl=False)
            return
        if dry_run:
            from normbench.engine import dry_run as do_dry_run

            typer.echo(do_dry_run(cfg))
            return
        from normbench.engine import train as run_training
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


@data_app.command("prepare")
def data_prepare(
    root: Optional[Path] = typer.Option(None, "--root", help="Data folder (default $NORMBENCH_DATA or ~/.cache/normbench/data)."),
    no_download: bool = typer.Option(False, "--no-download", help="Skip torchvision's download; decode the mirror."),
) -> None:
    """Make CIFAR-10 available: download it, or decode the bundled offline mirror."""
    try:
        from normbench.config import DataConfig
        from normbench.data import FOLDER, ensure_cifar10

        cfg = DataConfig(root=str(root) if root else None)
        folder, source = ensure_cifar10(cfg.resolved_root(), allow_download=not no_download,
                                        log=lambda m: typer.echo(m, err=True))
    except UserError as err:
        fail(str(err))
        return
    typer.echo(f"CIFAR-10 ready in {folder} (source: {source})")


# Commands of other modules register themselves on `app` (each keeps its imports lazy).
from normbench import cli_sweep, cli_analysis  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
