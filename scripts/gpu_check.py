#!/usr/bin/env python
"""The CUDA smoke check: what normbench promises on a GPU, tried on the one this runs on.

    scripts/gpu_check.sh                     # every check; one line each, then "N / M checks passed"
    python scripts/gpu_check.py --schemes bn,gn --device cpu   # the same checks on the CPU (the script itself)

Checks, on synthetic CIFAR-format data (no download), ResNet-20 at width 0.5:

* every scheme: a short run through ``normbench.training.entry.train`` (steps, log lines,
  evaluation, checkpoint, summary) eager, compiled (``default`` and ``reduce-overhead``) and
  under bf16 autocast (where the card computes bf16 natively; refused in one line elsewhere);
* no host sync inside the training step (``torch.cuda.set_sync_debug_mode("error")`` around
  three steps after three warm-up steps);
* a packed step (two seeds as one network), and a run killed by SIGTERM at its first log line
  that resumes to the end;
* steps/s at batch 2 and 128 for BN and GN, in both memory formats;
* 2-GPU torchrun + SyncBN (``scripts/gpu_check.sh``, when two GPUs are visible).

Each check prints PASS or FAIL, its seconds and a short note; tracebacks go to stderr.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from normbench.config import load_config  # noqa: E402
from normbench.data import EpochPlan, synthetic_cifar  # noqa: E402
from normbench.errors import UserError  # noqa: E402
from normbench.progress import Progress  # noqa: E402
from normbench.tracking import RunDir  # noqa: E402
from normbench.training import entry  # noqa: E402
from normbench.training.packed import train_packed  # noqa: E402
from normbench.training.solo import solo_stepper  # noqa: E402

SCHEMES = "bn,ghost_bn,brn,gn,ln,in,ws_gn,frn,evonorm_s0,none,nf,syncbn"
RESULTS: list[bool] = []


def check(name: str, fn) -> None:
    import torch._dynamo

    torch._dynamo.reset()  # every check compiles afresh (no recompile limit carried over)
    t0 = time.perf_counter()
    try:
        note, ok = fn() or "", True
    except BaseException as err:  # noqa: BLE001 - a check reports, the next one runs
        ok = False
        note = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"
        traceback.print_exc()
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.set_sync_debug_mode(0)
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {name} ({time.perf_counter() - t0:.0f} s) {note}", flush=True)


class Setup:
    def __init__(self, device: str, root: Path):
        self.device, self.root = device, root
        synthetic_cifar(root / "data", n_train=320, n_test=128)

    def cfg(self, kind: str, *extra: str, out: str = "runs"):
        base = [f"data.root={self.root / 'data'}", "data.allow_download=false", "log.tensorboard=false",
                "model.width=0.5", f"device={self.device}", "train.batch_size=32", "train.epochs=1",
                "train.log_every=4", "train.eval_batch_size=64", "optim.warmup_epochs=0.5",
                "norm.brn_warmup_epochs=0.2", f"log.out_dir={self.root / out}", f"norm.kind={kind}"]
        merged = dict(item.split("=", 1) for item in [*base, *extra])  # a later KEY=VALUE wins
        return load_config(None, [f"{k}={v}" for k, v in merged.items()])


def whole_run(cfg) -> str:
    summary = entry.train(cfg, fresh=True)
    assert summary["status"] == "completed", summary.get("note")
    assert math.isfinite(summary["final_test_loss"])
    return f"acc {100 * summary['final_test_acc']:.2f}%, compiled {summary['compiled']}"


def steps_without_host_sync(cfg) -> str:
    """Three warm-up steps, then three with any host sync an error (on CUDA)."""
    run_dir = RunDir(cfg.run_dir())
    run_dir.create()
    run_dir.wipe()
    stepper = solo_stepper(cfg, run_dir, Progress())
    run = stepper.run
    plan = EpochPlan(len(run.data.train_y), cfg.train.batch_size, cfg.seed, 0, True, run.device)
    for i in range(3):
        stepper.step([plan], i)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    for i in range(3, 6):
        stepper.step([plan], i)
    if run.device.type == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    run.open_log()
    assert run.flush() is None, "a non-finite loss or gradient"
    return f"compiled {run.compile_mode}, loss {run.last_record['train/loss']:.3f}"


def bf16_run(cfg) -> str:
    try:
        return whole_run(cfg)
    except UserError as err:  # a card without native bf16: refused in one line, as promised
        assert "no native bf16" in str(err), err
        return f"refused: {err}"


class KillAtFirstLog(Progress):
    def update(self, step, metrics):
        os.kill(os.getpid(), signal.SIGTERM)


def resume(setup: Setup) -> str:
    killed, ref = (setup.cfg("bn", "train.epochs=2", out=o) for o in ("resume", "reference"))
    first = entry.train(killed, fresh=True, progress=KillAtFirstLog())
    second = entry.train(killed)
    entry.train(ref, fresh=True)
    assert first["status"] == "interrupted" and second["status"] == "completed", (first["status"], second["status"])
    a, b = (RunDir(c.run_dir()).load_checkpoint()["model"] for c in (killed, ref))
    gap = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    return f"killed at step {first['steps']}; max |w - w uninterrupted| {gap:.1e}"


def packed(setup: Setup) -> str:
    summaries = train_packed([setup.cfg("bn", f"seed={s}", out="packed") for s in (0, 1)], fresh=True)
    assert all(s["status"] == "completed" for s in summaries), [s["status"] for s in summaries]
    accs = ", ".join(f"{100 * s['final_test_acc']:.2f}%" for s in summaries)
    return f"acc {accs}"


def steps_per_s(setup: Setup, kind: str, batch: int, channels_last: bool, seconds: float = 3.0) -> float:
    """normbench's own step (scripts/bench_throughput.py's engine_loop), 5 warm-up steps, then as
    many as fit in ``seconds``."""
    from bench_throughput import engine_loop

    cfg = setup.cfg(kind, f"train.batch_size={batch}", f"train.channels_last={str(channels_last).lower()}",
                    "model.width=1", out="speed")
    step, run = engine_loop(cfg)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    for _ in range(5):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    return n / (time.perf_counter() - t0)


def speed(setup: Setup) -> str:
    rows = []
    for kind in ("bn", "gn"):
        for batch in (2, 128):
            nchw, nhwc = (steps_per_s(setup, kind, batch, cl) for cl in (False, True))
            rows.append(f"{kind} b{batch}: {nchw:.1f} / {nhwc:.1f}")
    return "steps/s NCHW / channels_last: " + "; ".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=SCHEMES, help="comma-separated registry names")
    ap.add_argument("--device", default="cuda", help="cuda (the check); cpu runs the same checks on the CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled checks")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL cuda: no CUDA device visible to torch", flush=True)
        return 1
    setup = Setup(args.device, Path(tempfile.mkdtemp(prefix="normbench-gpu-check-")))
    print(f"checking {args.device} ({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}; files in {setup.root}", flush=True)
    for kind in args.schemes.split(","):
        check(f"eager run {kind}", lambda: whole_run(setup.cfg(kind)))
        check(f"no host sync in the step {kind}", lambda: steps_without_host_sync(setup.cfg(kind, "train.compile=none")))
        check(f"bf16 run {kind}", lambda: bf16_run(setup.cfg(kind, "train.amp=bf16")))
        if not args.no_compile:
            for mode in ("default", "reduce-overhead"):
                check(f"compiled {mode} {kind}",
                      lambda: steps_without_host_sync(setup.cfg(kind, f"train.compile={mode}")))
    check("packed bn x2 seeds", lambda: packed(setup))
    check("resume after SIGTERM", lambda: resume(setup))
    check("speed bn/gn", lambda: speed(setup))
    print(f"{sum(RESULTS)} / {len(RESULTS)} checks passed", flush=True)
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
