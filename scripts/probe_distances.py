#!/usr/bin/env python3
"""How ||g(theta - t d) - g(theta)|| grows with the distance t: the measurement behind the
default ``analysis.probe_distances`` of the fixed-mode landscape probe.

    .venv/bin/python scripts/probe_distances.py --norm bn --batch 128 --steps 0,50,200,389

Trains ResNet-20 (width 1) on CIFAR-10 with the engine's own step and, at each listed step
(within the first epoch), runs ``analysis.probe_model_fixed`` on the fixed probe batch (the
first 512 test images) at t from 1e-4 to 1.6. Prints one JSON line per step with ||theta||,
||g||, the LR and ||Delta g|| / t per t. Where ||Delta g|| / t is flat the gradient changes
linearly along d; it falls at large t (curvature changes along the path) and, for ReLU
networks, rises at small t where ||Delta g|| grows like sqrt(t) (activation patterns flip:
the gradient is not differentiable there). ``--float64`` repeats the first probe in float64
to tell that from float32 rounding. Pass ``--set data.root=...`` and other overrides as for
``normbench train``.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

DISTANCES = [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]


def main() -> None:
    from normbench.analysis.probes import probe_batch, probe_model_fixed
    from normbench.config import load_config
    from normbench.data import EpochPlan
    from normbench.progress import Progress
    from normbench.tracking import RunDir
    from normbench.training.solo import solo_stepper

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--norm", default="bn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", default="0,50,200,389", help="comma-separated steps of the first epoch")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--float64", action="store_true", help="also probe the first step's weights in float64")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = ap.parse_args()
    stops = sorted(int(s) for s in args.steps.split(","))
    out = tempfile.mkdtemp(prefix="probe-distances-")
    cfg = load_config(None, [f"norm.kind={args.norm}", f"train.batch_size={args.batch}", "train.epochs=1",
                             "train.compile=none", f"log.out_dir={out}", "log.tensorboard=false", *args.set])
    stepper = solo_stepper(cfg, RunDir(cfg.run_dir()), Progress())
    trainer = stepper.run
    if stops[-1] >= trainer.steps_per_epoch:
        raise SystemExit(f"--steps: the first epoch has {trainer.steps_per_epoch} steps")
    x, y = probe_batch(trainer.data, trainer.normalize, args.images)
    plan = EpochPlan(len(trainer.data.train_y), cfg.train.batch_size, cfg.seed, 0, cfg.data.augment, trainer.device)
    for i in range(stops[-1] + 1):
        if i in stops:
            t0 = time.perf_counter()
            res = probe_model_fixed(trainer.model, x, y, DISTANCES, trainer.device)
            theta = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in trainer.model.parameters()))
            row = {"norm": args.norm, "batch": args.batch, "step": i, "theta_norm": float(theta),
                   "grad_norm": float(res.grad_norm), "lr": trainer.optimizer.param_groups[0]["lr"],
                   "dg_over_t": {f"{t:g}": v / t for t, v in zip(DISTANCES, res.grad_dists.double().tolist())},
                   "linearity_default": float(probe_model_fixed(trainer.model, x, y, cfg.analysis.probe_distances,
                                                                trainer.device).linearity),
                   "seconds": time.perf_counter() - t0}
            if args.float64 and i == stops[0]:
                wide = probe_model_fixed(copy.deepcopy(trainer.model).double(), x.double(), y, DISTANCES,
                                         trainer.device)
                row["dg_over_t_float64"] = {f"{t:g}": v / t for t, v in zip(DISTANCES, wide.grad_dists.tolist())}
            print(json.dumps(row), flush=True)
        if i < stops[-1]:
            stepper.step([plan], i)


if __name__ == "__main__":
    main()
