#!/usr/bin/env python3
"""Eager vs torch.compile for the engine's training step, per scheme and batch size.

    .venv/bin/python scripts/bench_compile.py [--schemes bn,gn] [--batches 2,8] [--rounds 7]
                                              [--seconds 1] [--json out.json]

The measurement behind each scheme's ``compile_max_batch`` in normbench/norms/__init__.py
(what ``train.compile: auto`` decides). For every cell, two engines (SoloStepper.step, as
scripts/bench_throughput.py times it) are built side by side, one with ``train.compile=none``
and one with ``train.compile=default``; the compiled one is warmed up (compile time printed),
then both are timed in ``--rounds`` interleaved rounds of one window each. Reported: median
img/s of each and the median over rounds of compiled / eager.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import calibrate, engine_loop, interleaved_windows, paired_ratio  # noqa: E402

from normbench.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="bn,gn,frn")
    ap.add_argument("--batches", default="2,8,32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for scheme in args.schemes.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            base = ["device=cpu", f"threads={args.threads}", f"norm.kind={scheme}", f"train.batch_size={batch}",
                    "log.tensorboard=false"]
            steps = {mode: engine_loop(load_config(None, base + [f"train.compile={mode}"]))[0]
                     for mode in ("none", "default")}
            t0 = time.perf_counter()
            for _ in range(3):
                steps["default"]()
            compile_s = time.perf_counter() - t0
            per_window = {name: calibrate(step, args.seconds) for name, step in steps.items()}
            rates = interleaved_windows(steps, per_window, args.rounds, batch, warmup=2)
            row = {"scheme": scheme, "batch": batch, "eager": statistics.median(rates["none"]),
                   "compiled": statistics.median(rates["default"]), "ratio": paired_ratio(rates, "none", "default"),
                   "compile_s": compile_s}
            rows.append(row)
            print(f"{scheme} b{batch}: eager {row['eager']:.0f}, compiled {row['compiled']:.0f} img/s, "
                  f"x{row['ratio']:.3f} (first steps incl. compiling: {compile_s:.0f} s)", flush=True)
            del steps
            torch._dynamo.reset()
    print("\n| scheme | batch | eager img/s | compiled img/s | compiled / eager |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['batch']} | {r['eager']:.0f} | {r['compiled']:.0f} | {r['ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
