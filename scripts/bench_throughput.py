#!/usr/bin/env python3
"""Training throughput, side by side in ONE run: a plain PyTorch loop vs normbench's engine.

    .venv/bin/python scripts/bench_throughput.py [--schemes bn,gn,frn] [--batches 2,8,32,128]
                                                 [--seconds 2] [--windows 5] [--json out.json]
                                                 [--compare-compile]

(a) "plain": the loop a typical user writes: a torchvision-style Dataset that turns each
    uint8 image into a PIL image and applies RandomCrop(32, padding=4), RandomHorizontalFlip,
    ToTensor and Normalize; a DataLoader (shuffle, drop_last, num_workers=0: with 2 cores a
    worker process only competes with the training threads); the same ResNet-20 with the
    same norm in the default memory format; SGD(momentum, weight decay) with its default
    implementation; ``loss.item()`` every step for a running loss.
(b) "normbench": the engine's own step (SoloStepper.step: in-memory uint8 data, batched
    augmentation, channels_last where the scheme prefers it, fused SGD, clipping statistics,
    no host sync inside the step, one read per log interval).

Each cell: both loops (and the compile variants) are built and warmed up, then timed in
``--windows`` rounds; a round runs one window of about ``--seconds`` of each variant, back to
back, so that the machine's drift over minutes hits both sides alike. Reported: the median
images/s of each variant and the ratio as the median over rounds of normbench / plain. The roof: the 3x3 convolutions of ResNet-20 measured in
this run at batch 128 (channels_last, forward) give the CPU's sustained GFLOP/s; a training
step costs 3x the forward FLOPs (0.242 GFLOP per image in all), so roof img/s =
GFLOP/s / 0.242; it is measured at the start and again at the end, and the fractions in
the table use the mean of the two. Prints a markdown table and writes JSON.

``--compare-compile`` also times the engine with ``train.compile`` forced to ``none`` (eager)
and to ``default`` (torch.compile) in the same run: the measurements behind each scheme's
``compile_max_batch`` (what ``train.compile: auto`` decides). ``--compare-optimizer`` also
times the engine with torch's per-tensor fused SGD (``NORMBENCH_FLAT_SGD=0``) and with
FlatSGD (normbench.flat_sgd, the default). Ratios between variants are medians over rounds
of the two windows timed back to back. ``--side-by-side`` puts all schemes of one batch size in
the same rounds, so that schemes can be compared with each other (e.g. ``--schemes gn,frn``
for FRN / GN), not only each with its own plain loop.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from normbench.config import load_config  # noqa: E402
from normbench.data import MEAN, STD, EpochPlan, load_cifar10  # noqa: E402
from normbench.models import build_model  # noqa: E402
from normbench.progress import Progress  # noqa: E402
from normbench.tracking import RunDir  # noqa: E402
from normbench.training.solo import solo_stepper  # noqa: E402

GFLOP_PER_IMAGE_TRAIN = 0.242  # 40.55 M MACs forward x 2 FLOP x 3 (forward + backward)


def interleaved_windows(steps: dict, steps_per_window: dict, windows: int, batch: int, warmup: int) -> dict:
    """Images/s of every variant, timed in round-robin windows (plain, normbench, plain, ...)
    so that a drift of the machine's speed hits every variant alike; returns per variant the
    list of window rates."""
    for step_fn in steps.values():
        for _ in range(warmup):
            step_fn()
    rates: dict = {name: [] for name in steps}
    for _ in range(windows):
        for name, step_fn in steps.items():
            n = steps_per_window[name]
            t0 = time.perf_counter()
            for _ in range(n):
                step_fn()
            rates[name].append(n * batch / (time.perf_counter() - t0))
    return rates


def paired_ratio(rates: dict, base: str, other: str) -> float:
    """Median over rounds of other / base, each pair timed back to back."""
    return statistics.median(b / a for a, b in zip(rates[base], rates[other]))


def calibrate(step_fn, seconds: float) -> int:
    """Steps per window so that a window lasts about ``seconds``."""
    for _ in range(3):
        step_fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:
        step_fn()
        n += 1
    return max(3, int(n * seconds / (time.perf_counter() - t0)))


def plain_loop(cfg, train_x, train_y):
    """A typical user's loop; returns a function doing one training step."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class CifarDataset(Dataset):
        def __init__(self, x, y, transform):
            self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.x[i])), self.y[i]

    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    loader = DataLoader(CifarDataset(train_x, train_y, transform), batch_size=cfg.train.batch_size,
                        shuffle=True, drop_last=True, num_workers=0)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    state = {"it": iter(loader), "running": 0.0}

    def step():
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            x, y = next(state["it"])
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["running"] += loss.item()

    return step


def engine_loop(cfg):
    """normbench's own step (the training loop's SoloStepper.step and Run.flush), without the
    loop's checkpoints and evaluations; returns (step function, the run)."""
    run_dir = RunDir(Path("/tmp/normbench-bench") / cfg.run_dir().name)
    run_dir.create()
    stepper = solo_stepper(cfg, run_dir, Progress())
    run = stepper.run
    run.tb = type("NoTB", (), {"scalars": lambda *a, **k: None})()
    state = {"plan": None, "i": 0, "epoch": 0}

    def step():
        if state["plan"] is None or state["i"] >= state["plan"].steps:
            state["plan"] = EpochPlan(len(run.data.train_y), cfg.train.batch_size, cfg.seed, state["epoch"],
                                      True, run.device)
            state["i"], state["epoch"] = 0, state["epoch"] + 1
        stepper.step([state["plan"]], state["i"])
        state["i"] += 1
        if len(run.metrics) >= cfg.train.log_every:
            run.flush()

    return step, run


def with_env(key: str, value: str, make):
    """make() with os.environ[key] = value, the previous value restored afterwards."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        return make()
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def conv_roof(threads: int) -> dict:
    """Sustained GFLOP/s of ResNet-20's 3x3 convolutions at batch 128, channels_last, forward."""
    torch.set_num_threads(threads)
    best, per_shape = 0.0, {}
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(128, c, hw, hw).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
        flop = 2 * 128 * c * c * 9 * hw * hw
        with torch.no_grad():
            for _ in range(5):
                conv(x)
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0:
                conv(x)
                reps += 1
        gflops = flop * reps / (time.perf_counter() - t0) / 1e9
        per_shape[f"{c}x{hw}x{hw}"] = round(gflops, 1)
        best = max(best, gflops)
    mean = statistics.mean(per_shape.values())
    return {"gflops_per_shape": per_shape, "gflops": mean, "roof_images_per_s": mean / GFLOP_PER_IMAGE_TRAIN}


def variants_for(cfg, args, data) -> list:
    """(name, factory of a step function) for every loop timed for this config."""
    variants = [("plain", lambda: plain_loop(cfg, data.train_x, data.train_y)),
                ("normbench", lambda: engine_loop(cfg)[0])]
    if args.compare_optimizer:
        variants += [("torch_sgd", lambda: with_env("NORMBENCH_FLAT_SGD", "0", lambda: engine_loop(cfg)[0])),
                     ("flat_sgd", lambda: with_env("NORMBENCH_FLAT_SGD", "1", lambda: engine_loop(cfg)[0]))]
    if args.compare_compile:
        for mode in ("none", "default"):
            forced = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": mode})})
            variants.append((f"compile={mode}", lambda forced=forced: engine_loop(forced)[0]))
    return variants


def summarize(scheme: str, batch: int, rates: dict, roof: dict, args) -> dict:
    """One table row from the window rates of one cell's variants; prints its progress line."""
    result = {"scheme": scheme, "batch": batch}
    for name, r in rates.items():
        result[name] = statistics.median(r)
    result["ratio"] = paired_ratio(rates, "plain", "normbench")
    result["windows"] = {name: [round(v, 1) for v in r] for name, r in rates.items()}
    result["roof_frac"] = result["normbench"] / roof["roof_images_per_s"]
    extra = ""
    if args.compare_optimizer:
        result["flat_over_torch_sgd"] = paired_ratio(rates, "torch_sgd", "flat_sgd")
        extra += (f"; torch SGD {result['torch_sgd']:.0f}, FlatSGD {result['flat_sgd']:.0f} "
                  f"(x{result['flat_over_torch_sgd']:.3f})")
    if args.compare_compile:
        result["compiled_over_eager"] = paired_ratio(rates, "compile=none", "compile=default")
        extra += (f"; eager {result['compile=none']:.0f}, compiled {result['compile=default']:.0f} "
                  f"(x{result['compiled_over_eager']:.2f})")
    print(f"  {scheme} b{batch}: plain {result['plain']:.0f}, normbench {result['normbench']:.0f} img/s "
          f"(x{result['ratio']:.2f}, {result['roof_frac']:.2f} of roof){extra}", flush=True)
    return result


def print_pair_table(rows: list, base: tuple, other: tuple, ratio_key: str) -> None:
    """Markdown table of two engine variants per cell: (title, key) each, and their paired ratio."""
    print(f"\n| scheme | batch | {base[0]} img/s | {other[0]} img/s | {other[0]} / {base[0]} |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['batch']} | {r[base[1]]:.0f} | {r[other[1]]:.0f} | {r[ratio_key]:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="bn,gn,frn")
    ap.add_argument("--batches", default="2,8,32,128")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default="bench_throughput.json")
    ap.add_argument("--compare-compile", action="store_true",
                    help="also time the engine eager (train.compile=none) and compiled (default)")
    ap.add_argument("--compare-optimizer", action="store_true",
                    help="also time the engine with torch's per-tensor fused SGD and with FlatSGD")
    ap.add_argument("--side-by-side", action="store_true",
                    help="time all schemes of one batch size in the same interleaved rounds (and print "
                         "each scheme's engine img/s relative to the first scheme's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    roof = conv_roof(args.threads)
    print(f"conv roof: {roof['gflops']:.0f} GFLOP/s ({roof['gflops_per_shape']}) -> "
          f"{roof['roof_images_per_s']:.0f} img/s at {GFLOP_PER_IMAGE_TRAIN} GFLOP/image", flush=True)
    base = load_config(None, ["device=cpu", f"threads={args.threads}", "log.tensorboard=false"])
    data = load_cifar10(base.data, log=lambda m: None)
    rows = []
    schemes, batches = args.schemes.split(","), [int(b) for b in args.batches.split(",")]
    # one interleaving group per cell, or (--side-by-side) all schemes of one batch size together
    groups = ([[(s, b) for s in schemes] for b in batches] if args.side_by_side
              else [[(s, b)] for s in schemes for b in batches])
    for group in groups:
        batch = group[0][1]
        steps = {}
        for scheme, _ in group:
            cfg = load_config(None, ["device=cpu", f"threads={args.threads}", f"norm.kind={scheme}",
                                     f"train.batch_size={batch}", "log.tensorboard=false"])
            for name, make in variants_for(cfg, args, data):
                steps[(scheme, name)] = make()
        per_window = {key: calibrate(step, args.seconds) for key, step in steps.items()}
        all_rates = interleaved_windows(steps, per_window, args.windows, batch, warmup=2)
        del steps
        for scheme, _ in group:
            rates = {name: r for (s, name), r in all_rates.items() if s == scheme}
            rows.append(summarize(scheme, batch, rates, roof, args))
        if args.side_by_side:
            first = group[0][0]
            for scheme, _ in group[1:]:
                ratio = statistics.median(b / a for a, b in zip(all_rates[(first, "normbench")],
                                                                all_rates[(scheme, "normbench")]))
                rows[-len(group) + [s for s, _ in group].index(scheme)][f"normbench_over_{first}"] = ratio
                print(f"  b{batch}: normbench {scheme} / {first} = {ratio:.2f} (paired rounds)", flush=True)
    # the machine drifts over minutes: the roof again at the end, the fractions against the mean
    roof_end = conv_roof(args.threads)
    roof_img = (roof["roof_images_per_s"] + roof_end["roof_images_per_s"]) / 2
    for r in rows:
        r["roof_frac"] = r["normbench"] / roof_img
    print(f"\nconv roof at the end: {roof_end['gflops']:.0f} GFLOP/s -> {roof_end['roof_images_per_s']:.0f} img/s; "
          f"fractions below use the mean of start and end, {roof_img:.0f} img/s")
    print()
    print(f"| scheme | batch | plain loop img/s | normbench img/s | ratio | fraction of roof ({roof_img:.0f} img/s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['batch']} | {r['plain']:.0f} | {r['normbench']:.0f} | {r['ratio']:.2f} | {r['roof_frac']:.2f} |")
    if args.compare_compile:
        print_pair_table(rows, ("engine eager", "compile=none"), ("engine compiled", "compile=default"),
                         "compiled_over_eager")
    if args.compare_optimizer:
        print_pair_table(rows, ("torch SGD", "torch_sgd"), ("FlatSGD", "flat_sgd"), "flat_over_torch_sgd")
    Path(args.json).write_text(json.dumps({"roof": roof, "roof_end": roof_end, "roof_images_per_s": roof_img,
                                           "threads": args.threads, "torch": torch.__version__,
                                           "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
