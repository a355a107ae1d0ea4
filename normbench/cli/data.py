"""``normbench data prepare``: make CIFAR-10 available (an official archive, the download, or
the offline JPEG mirror)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normbench.cli.app import OneLineUsageErrors, app, fail
from normbench.errors import UserError

data_app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, help="Manage the CIFAR-10 data set.",
                       epilog="Example: normbench data prepare --archive ~/Downloads/cifar-10-python.tar.gz")
app.add_typer(data_app, name="data")


@data_app.command("prepare", epilog="Example: normbench data prepare --mirror cifar10-jpeg.npz --root ~/data")
def data_prepare(
    root: Optional[Path] = typer.Option(None, "--root", help="Data folder (default $NORMBENCH_DATA or ~/.cache/normbench/data)."),
    no_download: bool = typer.Option(False, "--no-download", help="Skip torchvision's download; decode the mirror."),
    archive: Optional[Path] = typer.Option(None, "--archive", metavar="FILE", exists=True, dir_okay=False,
                                           help="A downloaded official cifar-10-python.tar.gz: unpacked and checked "
                                                "against the official md5s, instead of downloading "
                                                "(default $NORMBENCH_CIFAR_ARCHIVE)."),
    mirror: Optional[Path] = typer.Option(None, "--mirror", metavar="FILE", exists=True, dir_okay=False,
                                          help="The offline JPEG mirror cifar10-jpeg.npz, decoded when the download "
                                               "fails or with --no-download (default $NORMBENCH_CIFAR_MIRROR, "
                                               "else data/ of a clone)."),
) -> None:
    """Make CIFAR-10 available: unpack an official archive, download it, or decode the offline mirror."""
    try:
        from normbench.config import DataConfig
        from normbench.data import ensure_cifar10

        cfg = DataConfig(root=str(root) if root else None)
        folder, source = ensure_cifar10(cfg.resolved_root(), allow_download=not no_download,
                                        log=lambda m: typer.echo(m, err=True), archive=archive, mirror=mirror)
    except UserError as err:
        fail(str(err))
        return
    typer.echo(f"CIFAR-10 ready in {folder} (source: {source})")
