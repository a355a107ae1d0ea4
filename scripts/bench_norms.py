#!/usr/bin/env python
"""Forward + backward time of every normalization unit at ResNet-20 activation shapes.

Each unit is measured as the model uses it (norm + its activation, built by the registry),
side by side with PyTorch's nn.BatchNorm2d and nn.GroupNorm (alone and followed by ReLU) in
the same run, at 16x32x32, 32x16x16 and 64x8x8 for each batch size. Timing: the units are
interleaved over ``--rounds`` rounds (so load from other processes hits them alike) and the
best round counts; each round repeats a unit for at least ``--min-time`` seconds. Prints a
markdown table: milliseconds per forward + backward and the ratio to nn.GroupNorm + ReLU
(the GroupNorm unit as the model uses it).

    python scripts/bench_norms.py                      # batch 2 and 128, 1 thread
    python scripts/bench_norms.py --naive              # also the plain-autograd FRN / EvoNorm
    python scripts/bench_norms.py --model              # + ResNet-20 train step, NCHW vs channels_last
    python scripts/bench_norms.py --compiled           # + torch.compile'd custom units (and naive ones)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from normbench.config import NormConfig  # noqa: E402
from normbench.norms import get_scheme, speed  # noqa: E402
from normbench.norms.evonorm import evonorm_s0_reference  # noqa: E402
from normbench.norms.filter_response import filter_response_norm_reference  # noqa: E402
from normbench.norms.weight_standardization import ScaledWSConv2d, WSConv2d  # noqa: E402

SHAPES = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
SCHEMES = ["bn", "ghost_bn", "brn", "gn", "ln", "in", "frn", "evonorm_s0", "none", "nf"]


def unit_for(kind: str, channels: int) -> nn.Module:
    cfg = NormConfig(kind=kind)
    unit = get_scheme(kind).norm_act(cfg, channels, True, f"bench.{kind}")
    for m in unit.modules():  # Batch Renorm past its warm-up: r, d clipping in force
        if hasattr(m, "set_progress"):
            m.set_progress(100.0)
        if kind == "none" and isinstance(m, nn.ReLU):
            m.inplace = False  # the bench input is a leaf; in the model the ReLU follows a conv
    return unit.train()


class Naive(nn.Module):
    """FRN + TLU or EvoNorm-S0 as their family's plain-PyTorch reference under autograd, for the
    record of what the custom Functions (normbench.norms.speed) buy."""

    def __init__(self, kind: str, channels: int, groups: int = 8, eps: float = 1e-5):
        super().__init__()
        self.kind, self.groups, self.eps = kind, groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.extra = nn.Parameter(torch.ones(channels) if kind == "evonorm_s0" else torch.zeros(channels))

    def forward(self, x):
        if self.kind == "frn":
            return filter_response_norm_reference(x, self.weight, self.bias, self.extra, 1e-6)
        return evonorm_s0_reference(x, self.extra, self.weight, self.bias, self.groups, self.eps)

COMPILED = ["ghost_bn", "brn", "frn", "evonorm_s0"]  # the units with hand-written maths


def units(channels: int, naive: bool, compiled: bool = False) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {
        "nn.BatchNorm2d": nn.BatchNorm2d(channels),
        "nn.GroupNorm(8)": nn.GroupNorm(8, channels),
        "nn.GroupNorm(8)+ReLU": nn.Sequential(nn.GroupNorm(8, channels), nn.ReLU(inplace=True)),
    }
    for kind in SCHEMES:
        out[f"{kind} unit"] = unit_for(kind, channels)
    if naive:
        out["frn (plain autograd)"] = Naive("frn", channels)
        out["evonorm_s0 (plain autograd)"] = Naive("evonorm_s0", channels)
    if compiled:  # each hand-written unit compiled ALONE (a whole compiled model fuses across layers;
        # that is what train.compile does: scripts/bench_throughput.py --compare-compile)
        # every unit and shape is its own compiled graph of the same forward code: lift dynamo's
        # per-code recompile limit (8) so that none silently falls back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
        for kind in COMPILED:
            out[f"{kind} unit, compiled"] = torch.compile(unit_for(kind, channels))
    return out


def conv_units(channels: int) -> dict[str, nn.Module]:
    return {"conv3x3": nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            "ws conv3x3 (ws_gn)": WSConv2d(channels, channels, 3),
            "scaled ws conv3x3 (nf)": ScaledWSConv2d(channels, channels, 3)}


def unit_layout(name: str) -> torch.memory_format:
    """The memory format the model runs a unit in (NormScheme.prefers_channels_last; the engine
    converts the whole model; channels_last for every scheme since the fused kernels). The
    references run in their own fastest format: nn.BatchNorm2d channels_last, nn.GroupNorm NCHW
    (PyTorch's GroupNorm kernel is several times slower on channels_last input)."""
    if name.startswith("nn.GroupNorm"):
        return torch.contiguous_format
    kind = name.split(" ")[0]
    kind = {"nn.BatchNorm2d": "bn"}.get(kind, kind)
    kind = "frn" if kind.startswith("frn") else "evonorm_s0" if kind.startswith("evonorm") else kind
    try:
        cl = get_scheme(kind).prefers_channels_last
    except Exception:  # noqa: BLE001  (convs and other extras: NCHW)
        cl = False
    return torch.channels_last if cl else torch.contiguous_format


def time_units(mods: dict[str, nn.Module], x: torch.Tensor, rounds: int, min_time: float,
               model_layout: bool = True) -> dict[str, float]:
    """Best-of-rounds milliseconds per forward + backward, units interleaved; each unit in the
    memory format the model runs it in (``model_layout``) or all NCHW."""
    inputs = {name: x.detach().clone().contiguous(
        memory_format=unit_layout(name) if model_layout else torch.contiguous_format).requires_grad_()
        for name in mods}
    grads = {name: torch.randn_like(inputs[name]) for name in mods}
    for name, mod in mods.items():  # warm up
        for _ in range(2):
            mod(inputs[name]).backward(grads[name])
    best = {name: float("inf") for name in mods}
    for _ in range(rounds):
        for name, mod in mods.items():
            xi, g, n, t0 = inputs[name], grads[name], 0, time.perf_counter()
            while True:
                mod(xi).backward(g)
                n += 1
                dt = time.perf_counter() - t0
                if dt >= min_time:
                    break
            best[name] = min(best[name], dt / n * 1e3)
    return best


def model_step_times(batch: int, rounds: int, min_time: float, width: float,
                     schemes: list[str]) -> list[tuple[str, float, float]]:
    """ResNet-20 forward + backward per scheme, NCHW vs channels_last (ms)."""
    from normbench.config import load_config
    from normbench.models import build_model

    rows = []
    x0 = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    for kind in schemes:
        cfg = load_config(None, [f"norm.kind={kind}", f"model.width={width}"])
        models, inputs = [], []
        for fmt in (torch.contiguous_format, torch.channels_last):
            torch.manual_seed(0)
            models.append(build_model(cfg).to(memory_format=fmt).train())
            inputs.append(x0.contiguous(memory_format=fmt))
            for _ in range(2):
                F.cross_entropy(models[-1](inputs[-1]), y).backward()
        best = [float("inf"), float("inf")]
        for _ in range(rounds):  # the two formats interleaved, best round counts
            for i, (model, x) in enumerate(zip(models, inputs)):
                n, t0 = 0, time.perf_counter()
                while True:
                    F.cross_entropy(model(x), y).backward()
                    n += 1
                    dt = time.perf_counter() - t0
                    if dt >= min_time:
                        break
                best[i] = min(best[i], dt / n * 1e3)
        rows.append((kind, best[0], best[1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 128])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on shared machines)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per unit per round")
    ap.add_argument("--naive", action="store_true", help="also time the plain-autograd FRN and EvoNorm-S0")
    ap.add_argument("--nchw", action="store_true", help="every unit in NCHW (default: the model's memory format "
                                                        "per scheme, channels_last for bn/ghost_bn/frn/evonorm_s0)")
    ap.add_argument("--compiled", action="store_true", help="also time torch.compile'd custom units")
    ap.add_argument("--convs", action="store_true", help="also time the weight-standardized convolutions")
    ap.add_argument("--model", action="store_true", help="also time a ResNet-20 step per scheme in both memory formats")
    ap.add_argument("--model-width", type=float, default=1.0)
    ap.add_argument("--schemes", nargs="+", default=SCHEMES + ["ws_gn"], help="schemes for --model")
    ap.add_argument("--model-only", action="store_true", help="skip the per-layer table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not speed.load():  # build / load the fused kernels before anything is timed
        print("fused kernels unavailable: timing the PyTorch paths", file=sys.stderr)

    columns, results = [], {}
    for batch in ([] if args.model_only else args.batches):
        for c, h, w in SHAPES:
            col = f"{c}x{h}x{w} b{batch}"
            columns.append(col)
            x = torch.randn(batch, c, h, w)
            mods = units(c, args.naive, args.compiled)
            if args.convs:
                mods.update(conv_units(c))
            for name, ms in time_units(mods, x, args.rounds, args.min_time, not args.nchw).items():
                results.setdefault(name, {})[col] = ms
            print(f"measured {col}", file=sys.stderr)

    if results:
        print_table(results, columns, args)
    if args.model:
        print("\nResNet-20 (width %g) forward + backward, ms per step\n" % args.model_width)
        print("| scheme | batch | NCHW | channels_last | faster |")
        print("|---|---|---|---|---|")
        for batch in args.batches:
            for kind, t_nchw, t_cl in model_step_times(batch, args.rounds, max(args.min_time, 0.2), args.model_width,
                                                       args.schemes):
                faster = "channels_last" if t_cl < t_nchw else "NCHW"
                print(f"| {kind} | {batch} | {t_nchw:.2f} | {t_cl:.2f} | {faster} |", flush=True)


def print_table(results: dict, columns: list[str], args) -> None:
    ref = results["nn.GroupNorm(8)+ReLU"]
    layout = ("all NCHW" if args.nchw else "each unit in the model's memory format (channels_last for every scheme), "
              "nn.GroupNorm in NCHW (its fast format), nn.BatchNorm2d in channels_last")
    print(f"Forward + backward, ms (ratio to nn.GroupNorm(8)+ReLU); torch {torch.__version__}, "
          f"{args.threads} thread(s), best of {args.rounds} rounds; {layout}\n")
    print("| unit | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in results.items():
        cells = [f"{row[c]:.3f} ({row[c] / ref[c]:.2f}x)" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
