#!/usr/bin/env python
"""What packing buys per core: one training step (forward + backward) of K packed ResNet-20
members against one model alone, at the same per-member batch, in one process and one run.

    python scripts/bench_packing.py                       # bn, batch 2, K = 4, 8, 16, 1 thread
    python scripts/bench_packing.py --norm gn --batch 8 --members 2 4 8
    python scripts/bench_packing.py --channels-last       # both models and inputs in NHWC

Prints ms per step of the single model, and for each K the packed step, the step time per
member and the speed-up per member (single / per-member); ``--no-mkldnn`` also times the
packed step with PyTorch's native (non-oneDNN) convolutions. The optimizer step is left out
(element-wise, the same work packed or not). Best of ``--rounds`` rounds, units interleaved.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from normbench.config import load_config  # noqa: E402
from normbench.models import build_model  # noqa: E402
from normbench.training.packing import pack_models  # noqa: E402


def best_ms(step, rounds: int, min_time: float) -> float:
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            step()
            n += 1
            if time.perf_counter() - t0 >= min_time:
                break
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--norm", default="bn")
    ap.add_argument("--batch", type=int, default=2, help="per-member batch size (default 2)")
    ap.add_argument("--members", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per unit per round")
    ap.add_argument("--no-mkldnn", action="store_true", help="also time the packed step without oneDNN convs")
    ap.add_argument("--channels-last", action="store_true",
                    help="models and inputs in channels_last (default: contiguous NCHW)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cfg = load_config(None, [f"norm.kind={args.norm}", f"train.batch_size={args.batch}"])
    b = args.batch

    torch.manual_seed(0)
    single = build_model(cfg).train().to(memory_format=fmt)
    x1, y1 = torch.randn(b, 3, 32, 32).contiguous(memory_format=fmt), torch.randint(0, 10, (b,))

    def single_step():
        F.cross_entropy(single(x1), y1).backward()

    packed_steps = {}
    for k in args.members:
        members = []
        for seed in range(k):
            torch.manual_seed(seed)
            members.append(build_model(cfg))
        net = pack_models(members).train().to(memory_format=fmt)
        x, y = torch.randn(b, 3 * k, 32, 32).contiguous(memory_format=fmt), torch.randint(0, 10, (b * k,))

        def step(net=net, x=x, y=y):
            F.cross_entropy(net(x).reshape(-1, 10), y).backward()

        packed_steps[k] = step

    t_single = best_ms(single_step, args.rounds, args.min_time)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"ResNet-20 {args.norm}, per-member batch {b}, {args.threads} thread(s), {layout}, torch {torch.__version__}; "
          f"forward + backward, best of {args.rounds}\n")
    print("| members K | packed step ms | ms per member | speed-up per member | without oneDNN, ms per member |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| 1 (alone) | {t_single:.2f} | {t_single:.2f} | 1.00x | |")
    for k, step in packed_steps.items():
        t = best_ms(step, args.rounds, args.min_time)
        off = ""
        if args.no_mkldnn:
            torch.backends.mkldnn.enabled = False
            off = f"{best_ms(step, args.rounds, args.min_time) / k:.2f}"
            torch.backends.mkldnn.enabled = True
        print(f"| {k} | {t:.2f} | {t / k:.2f} | {t_single / (t / k):.2f}x | {off} |", flush=True)


if __name__ == "__main__":
    main()
