#!/usr/bin/env python
"""Sweep throughput: the same cells with 1 worker × N threads and with N single-thread workers.

Every layout trains the same ``--cells`` cells (ResNet-20 with BatchNorm at batch ``--batch``,
seeds 0..cells-1, a ``--steps``-step single epoch on a class-balanced train subset) through
the real ``normbench sweep`` command, in a fresh output folder, one layout after the other in
this one invocation. Reported per layout:

* wall time of the whole sweep command (process start, model checks, workers, evaluation);
* cells/hour = cells / wall time;
* img/s (sweep) = training images of all cells / wall time: what the layout delivers;
* img/s (per cell) = mean of each run's own training-step throughput (``images_per_s`` in
  summary.json: evaluation and start-up excluded).

The data are synthetic CIFAR-format images by default (the step cost does not depend on the
pixels, and a 100-image test set keeps evaluation out of the way); ``--data-root`` uses a real
CIFAR-10 folder instead. Run it on a quiet machine; a smoke check::

    python scripts/bench_sweep.py --cells 2 --steps 10 --width 0.25
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=8, help="cells per layout (default 8)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--steps", type=int, default=300, help="training steps per cell (default 300)")
    p.add_argument("--width", type=float, default=1.0, help="ResNet-20 width multiplier (default 1)")
    p.add_argument("--cores", type=int, default=cores, help=f"cores to use (default {cores}): layouts 1 x cores "
                   "threads and cores x 1 thread")
    p.add_argument("--data-root", type=Path, default=None, help="a CIFAR-10 data root (default: synthetic data)")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--no-pack", action="store_true", help="skip the packed layouts (sweep --pack)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p.parse_args()


def run_layout(sweep_file: Path, out: Path, workers: int, threads: int, pack: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "normbench", "sweep", str(sweep_file), "--out", str(out), "--workers", str(workers),
           "--threads-per-worker", str(threads), "--pack", str(pack), "--no-progress"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"bench_sweep: the sweep failed (exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    summaries = [json.loads(p.read_text()) for p in out.glob("*/summary.json")]
    bad = [s for s in summaries if s["status"] != "completed"]
    if bad:
        sys.exit(f"bench_sweep: {len(bad)} cell(s) did not complete: {[s.get('note') for s in bad]}")
    images = sum(s["steps"] * s["config"]["train"]["batch_size"] for s in summaries)
    per_cell = [s["images_per_s"] for s in summaries if s.get("images_per_s")]
    layout = f"{workers} worker(s) x {threads} thread(s)" + (f", packed x{pack}" if pack > 1 else "")
    return {"layout": layout, "workers": workers, "threads": threads, "pack": pack,
            "cells": len(summaries), "wall_s": wall, "cells_per_hour": 3600 * len(summaries) / wall,
            "images_per_s_sweep": images / wall,
            "images_per_s_per_cell": sum(per_cell) / len(per_cell) if per_cell else None,
            "train_s_per_cell": sum(s["wall_time_s"] for s in summaries) / len(summaries)}


def main() -> None:
    args = parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="normbench-bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.data_root is None:
            sys.path.insert(0, str(REPO))
            from normbench.data import synthetic_cifar

            data_root = work / "data"
            synthetic_cifar(data_root, n_train=max(args.steps * args.batch, 10), n_test=100)
        else:
            data_root = args.data_root
        sweep_file = work / "bench.yaml"
        spec = {
            "description": "bench_sweep: identical BN cells, layouts compared",
            "set": {"data.root": str(data_root), "data.allow_download": False,
                    "data.train_subset": max(args.steps * args.batch, 10), "data.augment": True,
                    "model.arch": "resnet20", "model.width": args.width, "norm.kind": "bn",
                    "train.batch_size": args.batch, "train.epochs": 1, "train.log_every": 50,
                    "optim.warmup_epochs": 0.1, "device": "cpu", "log.tensorboard": False,
                    "analysis.train_mode_eval": False},
            "grid": {"seed": list(range(args.cells))},
        }
        import yaml

        sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        layouts = [(1, args.cores, 1), (args.cores, 1, 1)] if args.cores > 1 else [(1, 1, 1)]
        if not args.no_pack:  # packed runs: all cells in one network, or one pack per worker
            layouts += [(1, args.cores, args.cells)]
            if args.cores > 1 and args.cells >= 2 * args.cores:
                layouts += [(args.cores, 1, args.cells // args.cores)]
        results = []
        for workers, threads, pack in layouts:
            print(f"running {args.cells} cells with {workers} worker(s) x {threads} thread(s), pack {pack} ...", flush=True)
            results.append(run_layout(sweep_file, work / f"w{workers}t{threads}p{pack}", workers, threads, pack))
        print(f"\n{args.cells} cells of ResNet-20 (width {args.width:g}) + BN, batch {args.batch}, {args.steps} steps each")
        head = f"{'layout':<38}{'wall':>9}{'cells/h':>10}{'img/s sweep':>13}{'img/s per cell':>16}{'speed-up':>10}"
        print(head)
        print("-" * len(head))
        for r in results:
            r["speedup"] = results[0]["wall_s"] / r["wall_s"]
            print(f"{r['layout']:<38}{r['wall_s']:>8.1f}s{r['cells_per_hour']:>10.1f}{r['images_per_s_sweep']:>13.1f}"
                  f"{(r['images_per_s_per_cell'] or 0):>16.1f}{r['speedup']:>9.2f}x")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                            indent=2) + "\n")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
