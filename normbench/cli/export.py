"""``normbench export RUN_DIR --out DIR``: a trained run's network as a state dict, TorchScript
and a torch.export program (:mod:`normbench.export` does the work)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from normbench.cli.app import app, fail
from normbench.errors import UserError

EXAMPLE = "Example: normbench export runs/gn-b4-1a2b3c4d --out exports/gn-b4 --format state_dict,export"
HELP = ("Write a trained run's network as a state dict, TorchScript and a torch.export program.\n\n"
        "Into --out: model.pt (state dict), model.torchscript.pt, model.pt2 (torch.export), config.yaml and "
        "export.json (scheme, test accuracy, versions, input convention). Programs are recorded on the CPU in eval "
        "mode from plain PyTorch operators (no C++ kernels), with a dynamic batch size; each file is read back and "
        "checked against the network. Exit 1 when a format could not be written (said on stderr; the others are "
        "written).")


@app.command("export", help=HELP, epilog=EXAMPLE)
def export_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run folder (holding config.yaml and checkpoint.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; files of the same names are replaced)."),
    format_: List[str] = typer.Option([], "--format", "-f", help="state_dict, torchscript, export or all (default); "
                                      "repeatable or a comma list."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Export this checkpoint file of the same "
                                              "config instead of RUN_DIR/checkpoint.pt."),
) -> None:
    """Write a trained run's network as a state dict, TorchScript and a torch.export program."""
    try:
        from normbench.export import FILES, export_run, parse_formats

        formats = parse_formats(format_)
        manifest = export_run(run_dir, out, formats, checkpoint=checkpoint)
    except UserError as err:
        fail(str(err))
        return
    failed = 0
    for fmt, result in manifest["formats"].items():
        if "error" in result:
            failed += 1
            typer.echo(f"normbench: {fmt}: {FILES[fmt]} not written for {manifest['scheme']}: {result['error']}",
                       err=True)
        else:
            typer.echo(f"wrote {out / result['file']} (max |difference| from the network {result['max_abs_diff']:.2g})")
    typer.echo(f"wrote {out / 'config.yaml'} and {out / 'export.json'}")
    if failed:
        raise typer.Exit(1)
