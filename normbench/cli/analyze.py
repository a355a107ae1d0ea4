"""`normbench analyze RUN_DIR [--recalibrate]`: the train/eval gap, precise BN and dead units
of a trained run, measured from its checkpoint (normbench.analysis does the work)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normbench.cli.app import DEVICES, app, fail
from normbench.errors import UserError

EXAMPLE = ("Example: normbench analyze runs/sweeps/quick/bn-b8-s0-<hash> --recalibrate --recal-images 10000")


@app.command(epilog=EXAMPLE)
def analyze(
    run_dir: Path = typer.Argument(..., help="A run folder (holding config.yaml and checkpoint.pt)."),
    recalibrate: bool = typer.Option(False, "--recalibrate",
                                     help="Also recompute BN running statistics over a pass of training data "
                                          "(precise BN) and test with them."),
    recal_batch_size: Optional[int] = typer.Option(None, "--recal-batch-size", min=1,
                                                   help="Batch size of the recalibration pass (default: the run's)."),
    recal_images: Optional[int] = typer.Option(None, "--recal-images", min=1,
                                               help="Training images for the recalibration (default: all)."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the run's device, one of: "
                                         + ", ".join(DEVICES) + "."),
) -> None:
    """Measure a run's train/eval-mode gap, precise-BN accuracy and dead units; update its summary.
    Accuracies and dead units print in percent, the gap in percentage points (the summary keeps
    fractions, as training writes them)."""
    try:
        from normbench.analysis.offline import analyze_run

        result = analyze_run(run_dir, recalibrate=recalibrate, recal_batch_size=recal_batch_size,
                             recal_images=recal_images, device=device, log=lambda m: typer.echo(m, err=True))
    except UserError as err:
        fail(str(err))
        return
    print_analysis(result)


def print_analysis(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    table = Table(title=f"analysis of {result['run_name']} ({result['norm']}, batch {result['batch_size']}, "
                        f"step {result['analyzed_step']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("test acc, eval mode (running stats)", pct(result["test_acc_eval_mode"]))
    table.add_row(f"test acc, train mode (batch {result['batch_size']} stats)", pct(result["test_acc_train_mode"]))
    gap = result["train_eval_gap"]
    table.add_row("train - eval gap", "n/a" if gap is None else f"{100 * gap:+.2f} pts")
    if "test_acc_precise_bn" in result:
        extra = (f" ({result['precise_bn_images']} imgs, batch {result['precise_bn_batch_size']})"
                 if result.get("precise_bn_images") else "")
        table.add_row("test acc, precise BN" + extra, pct(result["test_acc_precise_bn"]))
    table.add_row("dead units (all layers, % of channels)", pct(result["dead_unit_frac"]))
    worst = sorted(result["dead_units_by_layer"].items(), key=lambda kv: -kv[1])[:3]
    for name, frac in worst:
        if frac > 0:
            table.add_row(f"  dead units, {name}", pct(frac))
    Console().print(table)
    if not result["summary_updated"]:
        typer.echo("note: the run has no summary.json; nothing was saved", err=True)
