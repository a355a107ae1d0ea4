"""``normbench eval RUN_DIR``: a trained run's test accuracy from its checkpoint
(:mod:`normbench.eval_run` does the work)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normbench.cli.app import DEVICES, app, fail
from normbench.errors import UserError

EXAMPLE = "Example: normbench eval runs/gn-b4-1a2b3c4d --mode both --json"
HELP = ("Test accuracy of a trained run, from its checkpoint, on the CIFAR-10 test set.\n\n"
        "A completed run's checkpoint holds its final weights: on the run's data, device and threads the accuracy "
        "equals its summary's final test accuracy exactly.")


@app.command("eval", help=HELP, epilog=EXAMPLE)
def eval_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run folder (holding config.yaml and checkpoint.pt)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="CIFAR-10 data root (default: the run's "
                                             "data.root, else $NORMBENCH_DATA or ~/.cache/normbench/data)."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the run's device, one of: "
                                         + ", ".join(DEVICES) + "."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Evaluation batch (default: the run's "
                                             "train.eval_batch_size; in train mode its train.batch_size)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Evaluate this checkpoint file of the same "
                                              "config instead of RUN_DIR/checkpoint.pt (a run keeps only its last)."),
    mode: str = typer.Option("running", "--mode", help="running: eval mode, BN-like layers use their running "
                             "statistics (as training evaluates); train: each test batch's own statistics; both."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Test accuracy of a trained run, from its checkpoint, on the CIFAR-10 test set."""
    try:
        from normbench.eval_run import evaluate_run

        result = evaluate_run(run_dir, data_root=data_root, device=device, batch_size=batch_size,
                              checkpoint=checkpoint, mode=mode, log=lambda m: typer.echo(m, err=True))
    except UserError as err:
        fail(str(err))
        return
    if json_out:
        from normbench.tracking import dumps_json

        typer.echo(dumps_json(result, indent=2))
        return
    print_evaluation(result)


MODE_LABELS = {"running": "eval mode (running statistics)", "train": "train mode (each batch's own statistics)"}


def print_evaluation(result: dict) -> None:
    """The run, the data, the device, then one line per mode: accuracy, images, seconds."""
    typer.echo(f"run: {result['run_dir']} ({result['norm']}, batch {result['batch_size']}; {result['weights']})")
    match = {True: "the run's data", False: "NOT the data the run was trained on", None: "unknown to the run"}
    fingerprint = result["data_fingerprint"] or "no fingerprint"
    typer.echo(f"data: {result['data_root']} ({result['data_source']}, {fingerprint}: "
               f"{match[result['data_matches_run']]})")
    typer.echo(f"device: {result['device']}, {result['threads']} thread(s)")
    for mode, r in result["results"].items():
        typer.echo(f"test accuracy, {MODE_LABELS[mode]}, batch {r['batch_size']}: {r['acc_percent']:.2f}% "
                   f"of {r['images']:,} images in {r['seconds']:.2f} s")
    recorded = result["summary_final_test_acc"]
    if recorded is not None:
        typer.echo(f"summary final test accuracy: {100 * recorded:.2f}%")
