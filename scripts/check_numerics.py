#!/usr/bin/env python
"""Is a CPU run of this tree bit-identical to the same run at another commit?

    python scripts/check_numerics.py --against COMMIT [--schemes all] [--steps 200] [--threads 1]

The commit is checked out into a temporary folder (``git worktree add --detach``, removed
afterwards). For every scheme of the registry (``normbench.norms.available_norms()``) the same
small training runs once in each tree, each in its own ``python -m normbench train`` subprocess
(PYTHONPATH = that tree; same interpreter, same thread count, TensorBoard off), on synthetic
CIFAR data made once by ``normbench.data.synthetic_cifar`` (or ``--data-root``). The runs take the
paths the study takes: fused kernels on, ``train.channels_last: auto``, FlatSGD, ``clip.mode:
agc`` for ``none``, and one extra case trains two seeds of a packable scheme as one packed
network (``normbench sweep --pack 2``). ``syncbn`` outside torchrun trains as plain BN.
``--compile default`` trains every case under ``torch.compile`` (``train.compile: auto`` would
compile none of these short runs), where the layers take their PyTorch paths, fused by inductor:

    python scripts/check_numerics.py --against COMMIT --compile default \
        --schemes bn,ghost_bn,brn,gn,ln,in,ws_gn,frn,nf,none

``--no-native`` runs both trees with ``NORMBENCH_NATIVE=0`` (the layers' PyTorch paths); ``--set
KEY=VALUE`` adds a config override to every case (``norm.ghost_batch_size=3``: Ghost BN in
several chunks at this batch of 8, the chunked path that ghost_bn's default size of 16 leaves
out here).

After each run a second subprocess in the same tree reads the run's ``checkpoint.pt`` into plain
tensors. A case is identical when every model tensor is ``torch.equal`` (and the optimizer
state's tensors, where both trees store the same layout), every metrics.jsonl line is the same
with its timing keys left out, and the summary's result fields agree. One line per case, then a
count; exit 0 only if every case is identical.
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

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
BATCH = 8
EPOCHS = 2  # an evaluation and the LR schedule's turn inside the run
# summary keys that are not results (timing, provenance, paths)
SUMMARY_SKIP = {"wall_time_s", "images_per_s", "git_commit", "run_dir", "torch_version", "summary_version",
                "run_id", "config"}
# train.compile's values (normbench.config); auto compiles only runs of at least
# normbench's AUTO_COMPILE_MIN_STEPS steps, far more than this check trains, so a compiled
# check forces a mode
COMPILE_MODES = ["none", "auto", "default", "reduce-overhead", "max-autotune"]
AUTO_COMPILE_MIN_STEPS = 10_000
PACK_SCHEME = "gn"  # packable (normbench.training.packing.why_not_packable) and uses the fused kernels

# Run in a subprocess inside each tree: checkpoint.pt -> a file of plain tensors.
EXTRACT = r"""
import sys, torch
from pathlib import Path
try:  # the tree's own reader (its checkpoint format may differ from this tree's)
    from normbench.tracking import RunDir
    ckpt = RunDir(Path(sys.argv[1]).parent).load_checkpoint()
except ImportError:
    ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
out = {}
for k, v in ckpt["model"].items():
    out["model." + k] = v
def walk(prefix, obj):
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            walk(f"{prefix}.{k}", v)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            walk(f"{prefix}.{i}", v)
walk("optimizer", ckpt.get("optimizer", {}).get("state", {}))
torch.save(out, sys.argv[2])
"""


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def tree_env(tree: Path, threads: int, native: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NORMBENCH_NATIVE", "NORMBENCH_FLAT_SGD")}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONHASHSEED="0")
    if not native:
        env["NORMBENCH_NATIVE"] = "0"
    return env


def case_sets(scheme: str, args, data_root: Path, out: Path) -> list[str]:
    sets = {"data.root": str(data_root), "data.allow_download": False, "data.train_subset": args.train_size,
            "log.out_dir": str(out), "log.tensorboard": False, "device": "cpu", "threads": args.threads,
            "seed": 0, "norm.kind": scheme, "model.width": args.width, "train.batch_size": BATCH,
            "train.epochs": EPOCHS, "train.eval_every": 1, "train.log_every": 10, "train.eval_batch_size": 100,
            "train.channels_last": "auto", "train.compile": args.compile, "optim.warmup_epochs": 0.5}
    if scheme == "none":
        sets["clip.mode"] = "agc"
    for extra in args.set:  # --set: the same overrides in every case of both trees
        key, _, value = extra.partition("=")
        sets[key] = value
    return [f"{k}={v}" for k, v in sets.items()]


def run_case(tree: Path, case: str, args, data_root: Path, work: Path) -> tuple[dict, float]:
    """Train one case in ``tree``; returns {run folder name: extracted file} and the seconds taken."""
    out = work / "runs"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = tree_env(tree, args.threads, native=not args.no_native)
    t0 = time.perf_counter()
    if case.endswith("+pack2"):
        scheme = case.split("+")[0]
        sets = [s for s in case_sets(scheme, args, data_root, out) if not s.startswith(("log.out_dir=", "seed="))]
        sweep = work / "pack.yaml"
        values = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)}
        sweep.write_text(json.dumps({"description": "check_numerics packed pair", "out_dir": str(out),
                                     "set": values, "grid": {"seed": [0, 1]}}))
        cmd = [sys.executable, "-m", "normbench", "sweep", str(sweep), "--pack", "2", "--workers", "1",
               "--threads-per-worker", str(args.threads), "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "normbench", "train", "--no-progress", "--fresh"]
        for s in case_sets(case, args, data_root, out):
            cmd += ["--set", s]
    proc = sh(cmd, env=env, cwd=work, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    found = {}
    for ckpt in sorted(out.rglob("checkpoint.pt")):
        run = ckpt.parent
        dest = work / f"{run.name}.tensors.pt"
        ex = sh([sys.executable, "-c", EXTRACT, str(ckpt), str(dest)], env=env, cwd=work, timeout=300)
        if ex.returncode != 0:
            raise RuntimeError(f"reading {ckpt}: {ex.stderr.strip().splitlines()[-1:]}")
        found[run.name] = {"tensors": dest, "metrics": run / "metrics.jsonl", "summary": run / "summary.json"}
    if not found:
        raise RuntimeError(f"no checkpoint.pt under {out}")
    return found, time.perf_counter() - t0


def metric_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            # NaN (written before metrics were strict JSON) and null both mean "no value"; as
            # floats NaN != NaN, so both become None
            lines.append({k: (None if isinstance(v, float) and v != v else v) for k, v in rec.items()
                          if not (k.startswith("perf/") or "time" in k or k.endswith("_per_s"))})
    return lines


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """torch.equal, except that NaN in the same places with the same bits counts as equal
    (a run that diverges the same way in both trees is identical)."""
    if torch.equal(x, y):
        return True
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    if x.is_floating_point() and x.element_size() in ints and x.is_contiguous() and y.is_contiguous():
        return torch.equal(x.view(ints[x.element_size()]), y.view(ints[y.element_size()]))
    return False


def compare_run(a: dict, b: dict) -> str | None:
    """None when identical, else what differs first."""
    ta, tb = torch.load(a["tensors"]), torch.load(b["tensors"])
    model_a = [k for k in ta if k.startswith("model.")]  # the model's own order: first layer first
    model_b = [k for k in tb if k.startswith("model.")]
    if set(model_a) != set(model_b):
        return f"model keys differ: {sorted(set(model_a) ^ set(model_b))[:3]}"
    opt_a, opt_b = [k for k in ta if k not in set(model_a)], [k for k in tb if k not in set(model_b)]
    same_opt = set(opt_a) == set(opt_b)
    keys = model_a + (opt_a if same_opt else [])
    for k in keys:
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{k}: shape/dtype {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if not same_bits(x, y):
            diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            ndiff = (x != y).sum().item()
            return f"first differing tensor {k}: max abs diff {diff:.3g} ({ndiff}/{x.numel()} elements)"
    ma, mb = metric_lines(a["metrics"]), metric_lines(b["metrics"])
    for i, (la, lb) in enumerate(zip(ma, mb)):
        if la != lb:
            keys_diff = [k for k in sorted(set(la) | set(lb)) if la.get(k) != lb.get(k)]
            return f"tensors equal, metrics line {i + 1} differs in {keys_diff[:4]}"
    if len(ma) != len(mb):
        return f"tensors equal, {len(ma)} vs {len(mb)} metrics lines"
    sa, sb = json.loads(a["summary"].read_text()), json.loads(b["summary"].read_text())
    for k in sorted((set(sa) & set(sb)) - SUMMARY_SKIP):
        if sa[k] != sb[k]:
            return f"tensors and metrics equal, summary {k}: {sa[k]!r} vs {sb[k]!r}"
    return None  # (optimizer state stored in another layout in the two trees: compared through the model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="commit (or ref) to compare this tree with")
    ap.add_argument("--schemes", default="all", help="comma-separated registry names, or all")
    ap.add_argument("--steps", type=int, default=200, help="training steps per run (batch 8, 2 epochs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    ap.add_argument("--width", type=float, default=0.5, help="model.width")
    ap.add_argument("--compile", default="none", choices=COMPILE_MODES,
                    help="train.compile (none: eager; auto: as a run would, which compiles only runs of "
                         f">= {AUTO_COMPILE_MIN_STEPS:,} steps; default / reduce-overhead / max-autotune: "
                         "compile every run, to check compiled training)")
    ap.add_argument("--no-pack", action="store_true", help="skip the packed two-seed case")
    ap.add_argument("--no-native", action="store_true",
                    help="NORMBENCH_NATIVE=0 in both trees: the layers' PyTorch paths instead of the fused kernels")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every case (repeatable), e.g. norm.ghost_batch_size=3 to train "
                         "Ghost BN in several chunks at this batch of 8")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="CIFAR-10 folder to train on (default: synthetic data made for this check)")
    ap.add_argument("--tree", type=Path, default=REPO, help="the tree under test (default: this checkout)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = ap.parse_args()
    steps_per_epoch = max(2, -(-args.steps // EPOCHS))
    args.train_size = max(10, steps_per_epoch * BATCH)
    tree = args.tree.resolve()

    sys.path.insert(0, str(tree))
    from normbench.norms import available_norms  # the registry of the tree under test

    names = available_norms()
    schemes = names if args.schemes == "all" else [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in names]
    if unknown:
        print(f"unknown scheme(s) {unknown}; registry: {', '.join(names)}", file=sys.stderr)
        return 2
    cases = list(schemes)
    if not args.no_pack and (args.schemes == "all" or PACK_SCHEME in schemes):
        cases.append(f"{PACK_SCHEME}+pack2")

    rev = sh(["git", "-C", str(tree), "rev-parse", "--verify", f"{args.against}^{{commit}}"])
    if rev.returncode != 0:
        print(f"--against: not a commit: {args.against}", file=sys.stderr)
        return 2
    commit = rev.stdout.strip()
    here = sh(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = bool(sh(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"]).stdout.strip())

    tmp = Path(tempfile.mkdtemp(prefix="check-numerics-"))
    other = tmp / "tree"
    try:
        add = sh(["git", "-C", str(tree), "worktree", "add", "--detach", str(other), commit])
        if add.returncode != 0:
            print(f"git worktree add failed: {add.stderr.strip()}", file=sys.stderr)
            return 2
        if args.data_root is not None:
            data_root = args.data_root.resolve()
        else:
            from normbench.data import synthetic_cifar

            data_root = tmp / "data"
            synthetic_cifar(data_root, n_train=args.train_size, n_test=100)
        print(f"this tree {tree} (HEAD {here}{', uncommitted changes' if dirty else ''}) vs {commit[:10]}; "
              f"{args.steps} steps requested -> {steps_per_epoch * EPOCHS} steps ({EPOCHS} epochs x {steps_per_epoch}),"
              f" batch {BATCH}, width {args.width}, {args.threads} thread(s), compile {args.compile}, "
              f"fused kernels {'off' if args.no_native else 'on'}{''.join(f', {s}' for s in args.set)}, "
              f"data {'synthetic' if args.data_root is None else data_root}", flush=True)
        if "syncbn" in cases:
            print("note: syncbn outside torchrun trains as plain BN (its collectives are not exercised here)",
                  flush=True)
        identical = 0
        t_all = time.perf_counter()
        for case in cases:
            try:
                ours, t_ours = run_case(tree, case, args, data_root, tmp / "ours")
                theirs, t_theirs = run_case(other, case, args, data_root, tmp / "theirs")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"{case:<14} FAILED {e}", flush=True)
                continue
            diffs = []
            if set(ours) != set(theirs):
                diffs.append(f"run folders differ: {sorted(ours)} vs {sorted(theirs)}")
            for name in sorted(set(ours) & set(theirs)):
                why = compare_run(ours[name], theirs[name])
                if why:
                    diffs.append(f"{name}: {why}")
            timing = f"({t_ours:.0f} s + {t_theirs:.0f} s)"
            if diffs:
                print(f"{case:<14} DIFFERENT {'; '.join(diffs)} {timing}", flush=True)
            else:
                identical += 1
                print(f"{case:<14} identical ({len(ours)} run{'s' if len(ours) > 1 else ''}) {timing}", flush=True)
        print(f"{identical}/{len(cases)} identical against {commit[:10]} "
              f"({time.perf_counter() - t_all:.0f} s)", flush=True)
        return 0 if identical == len(cases) else 1
    finally:
        sh(["git", "-C", str(tree), "worktree", "remove", "--force", str(other)])
        sh(["git", "-C", str(tree), "worktree", "prune"])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
