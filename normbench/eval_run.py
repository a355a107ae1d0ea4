"""``normbench eval``: a trained run's test accuracy, from its checkpoint, on the CIFAR-10 test
set of any data root.

The network is rebuilt as training built it (normbench.model_io: same device type, memory
format, threads) and measured by :func:`normbench.evaluation.evaluate`, the function training
evaluates with, at the run's ``train.eval_batch_size``: on the data, device and thread count
the run was trained with, a completed run's accuracy is its summary's ``final_test_acc``
exactly. Modes: ``running`` (eval mode: BN-like layers use their running statistics, as
training's evaluation does), ``train`` (each test batch's own statistics at the run's
``train.batch_size``; the running statistics are left untouched), ``both``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from normbench.errors import UserError
from normbench.evaluation import images_evaluated

MODES = ("running", "train", "both")


@dataclass
class TestSplit:
    """The test images (uint8, on the device) and labels, and where they came from."""

    test_x: torch.Tensor
    test_y: torch.Tensor
    root: Path
    source: str
    fingerprint: Optional[str]


def load_test_split(data_cfg, device: torch.device, log=print) -> TestSplit:
    """CIFAR-10's test split from ``data_cfg``'s root (made available first, as training does;
    md5s checked)."""
    from normbench.data import ensure_cifar10_identity, load_split

    root = data_cfg.resolved_root()
    folder, identity = ensure_cifar10_identity(root, data_cfg.allow_download, log)
    x, y = load_split(folder, train=False)
    return TestSplit(x.to(device), y.to(device), root, identity.source, identity.fingerprint)


def measure(run_model, data: TestSplit, normalize, train_mode: bool, batch_size: int) -> dict:
    """One evaluation of the test set: accuracy, loss, images, seconds."""
    from normbench.evaluation import evaluate

    if run_model.device.type == "cuda":
        torch.cuda.synchronize(run_model.device)
    start = time.perf_counter()
    result = evaluate(run_model.model, data, normalize, batch_size, train_mode=train_mode)
    seconds = time.perf_counter() - start  # evaluate ends in a host read: the device is done
    run_model.model.eval()  # evaluate leaves the model in train mode
    return {"acc": result["acc"], "acc_percent": round(100.0 * result["acc"], 6), "loss": result["loss"],
            "images": images_evaluated(len(data.test_y), batch_size, train_mode), "batch_size": batch_size,
            "seconds": seconds}


def evaluate_run(path, data_root: Optional[Path] = None, device: Optional[str] = None,
                 batch_size: Optional[int] = None, checkpoint: Optional[Path] = None, mode: str = "running",
                 log=print) -> dict:
    """The test accuracy of the run in folder ``path`` (see the module docstring); a JSON-ready
    dict. ``data_root`` replaces the run's ``data.root`` (default: the run's resolution of it,
    ``$NORMBENCH_DATA`` or ~/.cache/normbench/data when it sets none); ``batch_size`` replaces
    the evaluation batch of every mode."""
    from normbench.config import validate_config
    from normbench.data import Normalizer
    from normbench.model_io import load_run_model

    if mode not in MODES:
        raise UserError(f"--mode: got '{mode}'; allowed: {', '.join(MODES)}")
    run_model = load_run_model(path, device=device, checkpoint=checkpoint)
    cfg = run_model.cfg
    data_cfg = cfg.data
    if data_root is not None:
        data_cfg = validate_config({**cfg.to_dict(), "data": {**cfg.data.model_dump(mode="json"),
                                                              "root": str(data_root)}}, source="--data-root").data
    data = load_test_split(data_cfg, run_model.device, log)
    normalize = Normalizer(run_model.device, run_model.channels_last)
    results = {}
    if mode in ("running", "both"):
        results["running"] = measure(run_model, data, normalize, False, batch_size or cfg.train.eval_batch_size)
    if mode in ("train", "both"):
        results["train"] = measure(run_model, data, normalize, True, batch_size or cfg.train.batch_size)
    summary = run_model.summary or {}
    trained_on = run_model.data_record.get("fingerprint") or summary.get("data_fingerprint")
    return {
        "run_dir": str(run_model.path),
        "run_name": cfg.run_name,
        "norm": cfg.norm.kind,
        "batch_size": cfg.train.batch_size,
        "status": run_model.status,
        "checkpoint": str(run_model.checkpoint),
        "step": run_model.step,
        "total_steps": run_model.total_steps,
        "final_weights": run_model.final_weights,
        "weights": run_model.weights_line(),
        "device": str(run_model.device),
        "threads": torch.get_num_threads(),
        "data_root": str(data.root),
        "data_source": data.source,
        "data_fingerprint": data.fingerprint,
        "data_matches_run": None if not (trained_on and data.fingerprint) else trained_on == data.fingerprint,
        "summary_final_test_acc": summary.get("final_test_acc"),
        "results": results,
    }
