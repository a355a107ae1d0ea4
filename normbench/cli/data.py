"""``normbench data prepare``: make CIFAR-10 available (download, or decode the offline mirror)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normbench.cli.app import OneLineUsageErrors, app, fail
from normbench.errors import UserError

data_app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, help="Manage the CIFAR-10 data set.")
app.add_typer(data_app, name="data")


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
