#!/usr/bin/env python3
"""Where a large-batch training step goes, and the best roof fraction it could reach.

    .venv/bin/python scripts/bench_breakdown.py [--schemes bn,gn,none] [--batch 128] [--steps 8]

For each scheme, the engine's own step (SoloStepper.step, as scripts/bench_throughput.py times
it) runs under torch.profiler; the table splits the step into the convolutions (forward
and backward) and everything else (norms, ReLU backward, residual adds, optimizer). Two
bounds follow, both against the same conv roof as bench_throughput.py (ResNet-20's 3x3
convs at batch 128, channels_last, forward, measured in this run):

- "if the rest were free": roof time / conv time, the fraction a step would reach if every
  non-convolution op cost nothing;
- "rest at the memory floor": the non-conv work cannot go below streaming its tensors: for
  every norm layer 8 passes over its input (forward: statistics read, normalize read +
  write; backward: the two sums read grad and input, the input gradient reads both and
  writes one; ReLU fused), plus one read per residual add, at the bandwidth of an
  out-of-place add measured in this run: over 8 MB tensors (the largest activation of the
  step at batch 128; they stay in the last-level cache) and over 256 MB (main memory). A
  step's tensors live between the two: an activation just written by a convolution may
  still be in cache, the one saved for the backward pass is not.

Prints one markdown table; numbers are measured in this run, nothing is assumed but the
pass count above.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import GFLOP_PER_IMAGE_TRAIN, conv_roof, engine_loop  # noqa: E402

from normbench.config import load_config  # noqa: E402

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
            "aten::_slow_conv2d_backward")
PASSES_PER_NORM = 8


def bandwidth_gb_s(megabytes: int) -> float:
    """GB/s of out-of-place adds over float32 tensors of this size (two reads and one write each)."""
    n = megabytes * 1024 * 1024 // 4
    a, b = torch.randn(n), torch.randn(n)
    out = torch.empty_like(a)
    for _ in range(3):
        torch.add(a, b, out=out)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        torch.add(a, b, out=out)
        reps += 1
    return 3 * n * 4 * reps / (time.perf_counter() - t0) / 1e9


def streamed_bytes(trainer, batch: int) -> tuple[int, int]:
    """(bytes the norm layers and residual adds must stream per step, number of norm layers)."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].numel() * inp[0].element_size()))
             for m in trainer.model.modules() if type(m).__name__ == "NormAct"]
    with torch.no_grad():
        trainer.model(torch.zeros(batch, 3, 32, 32))
    for h in hooks:
        h.remove()
    blocks = getattr(trainer.model, "blocks", [])
    residual = sum(sizes[2 + 2 * i] for i in range(len(blocks))) if len(sizes) >= 1 + 2 * len(blocks) else 0
    return PASSES_PER_NORM * sum(sizes) + residual, len(sizes)


def breakdown(scheme: str, batch: int, steps: int, threads: int) -> dict:
    cfg = load_config(None, ["device=cpu", f"threads={threads}", f"norm.kind={scheme}", f"train.batch_size={batch}",
                             "log.tensorboard=false"])
    step, trainer = engine_loop(cfg)
    for _ in range(3):
        step()
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_OPS) / steps
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages()) / steps
    others = sorted((e for e in prof.key_averages() if e.key not in CONV_OPS), key=lambda e: -e.self_cpu_time_total)
    nbytes, n_norms = streamed_bytes(trainer, batch)
    return {"scheme": scheme, "step_ms": wall * 1e3, "profiled_ms": total_us / 1e3, "conv_ms": conv_us / 1e3,
            "n_norms": n_norms, "stream_mb": nbytes / 1e6,
            "top_rest": ", ".join(f"{e.key.replace('aten::', '')} {e.self_cpu_time_total / steps / 1e3:.1f}"
                                  for e in others[:4])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="bn,gn,none")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    roof = conv_roof(args.threads)
    bw_cache, bw_dram = bandwidth_gb_s(8), bandwidth_gb_s(256)
    roof_ms = args.batch * GFLOP_PER_IMAGE_TRAIN / roof["gflops"] * 1e3
    print(f"conv roof {roof['gflops']:.0f} GFLOP/s -> {roof_ms:.1f} ms per step of {args.batch}; "
          f"streaming bandwidth {bw_cache:.0f} GB/s (8 MB tensors), {bw_dram:.0f} GB/s (256 MB)\n")
    print("| scheme | step ms (fraction of roof) | conv ms (GFLOP/s) | rest ms: largest | norm layers, MB to stream "
          "| bound if rest free | bound, rest at cache / memory floor |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for scheme in args.schemes.split(","):
        r = breakdown(scheme, args.batch, args.steps, args.threads)
        conv_gflops = args.batch * GFLOP_PER_IMAGE_TRAIN / (r["conv_ms"] / 1e3)
        floor_cache, floor_dram = (r["stream_mb"] / bw for bw in (bw_cache, bw_dram))  # ms
        rest = r["profiled_ms"] - r["conv_ms"]
        print(f"| {scheme} | {r['step_ms']:.1f} ({roof_ms / r['step_ms']:.2f}) | {r['conv_ms']:.1f} ({conv_gflops:.0f}) "
              f"| {rest:.1f}: {r['top_rest']} | {r['n_norms']}, {r['stream_mb']:.0f} "
              f"| {roof_ms / r['conv_ms']:.2f} | {roof_ms / (r['conv_ms'] + floor_cache):.2f} / "
              f"{roof_ms / (r['conv_ms'] + floor_dram):.2f} |", flush=True)


if __name__ == "__main__":
    main()
