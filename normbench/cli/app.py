"""The ``normbench`` command group: one-line usage errors, ``fail``, ``--version``, shell
completion (``--install-completion``, ``--show-completion``), and what several commands share
(the ``--device`` values, flags that stand for config keys).

Every command lives in its own module of this package and registers itself on :data:`app`;
:mod:`normbench.cli.program` imports them all. Exit statuses: 0 success; 1 a run diverged or
failed; 2 a user mistake (one line on stderr, never a traceback); 130 / 143 interrupted by
SIGINT / SIGTERM (checkpoint written). Heavy modules (torch) are imported inside the commands
so that ``--help`` stays fast.
"""
from __future__ import annotations

import sys
from typing import Optional

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
    message = " ".join(err.format_message().split()).replace("Value error, ", "")  # (pydantic's prefix)
    where = f"{' '.join(names)}: " if names else ""
    typer.echo(f"normbench: error: {where}{message} (see '{command} --help')", err=True)
    raise typer.Exit(err.exit_code)


class OneLineUsageErrors(TyperGroup):
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


app = typer.Typer(cls=OneLineUsageErrors, add_completion=True, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Measure BatchNorm and its alternatives across small batch sizes on CIFAR-10.",
                  epilog="Example: normbench train --method gn --set train.batch_size=8")

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # what `device` takes (normbench.config.schema checks it)
DEVICE_METAVAR = "|".join(DEVICES)


def complete_device(incomplete: str) -> list[str]:
    """Shell completion of a --device value."""
    return [d for d in DEVICES if d != "cuda:N" and d.startswith(incomplete)]


def flag_overrides(set_: list[str], flags: list[tuple[str, str, Optional[str]]]) -> list[str]:
    """``set_`` plus one ``--set`` item per flag that stands for a config key: ``flags`` holds
    (flag, dotted key, value or None). The value is taken as a string, never as YAML; a flag
    and a ``--set`` of the same key with different values is one line naming both."""
    import json

    from normbench.config import parse_overrides

    given = parse_overrides(set_)
    out = list(set_)
    for flag, key, value in flags:
        if value is None:
            continue
        if key in given and given[key] != value:
            raise UserError(f"{flag} {value} and --set {key}={given[key]} disagree; give only one of them")
        out.append(f"{key}={json.dumps(value)}")
    return out


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


def console():
    """A rich console for tables: the terminal's width, or 200 columns in a pipe or log."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)

