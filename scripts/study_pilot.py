#!/usr/bin/env python
"""Timing pilot of a study sweep: how many epochs E fit a wall-clock budget on this machine.

Runs a sample of the study's cells for a slice of one epoch in the study's own layout (the
same sweep, workers, packing and measurements), times the fixed-mode probe of every method
once, and projects the study's wall time for each E:

    wall(E) = [ sum over units u of  mult_u * (E * (N / ips_u + V_u) + P_u)  +  X ] / workers

where a unit is one cell or one pack of cells (trained by one worker), ``mult_u`` how many
units of the study it stands for, ``N`` the training set, ``ips_u`` its training throughput
(median over its logged intervals, i.e. while sharing the machine as in the study), ``V_u``
its per-epoch work outside the training steps (evaluation, dead units, checkpoint: the run's
wall time minus its training time), ``P_u`` its probes (``probes_per_run`` x the measured
time of one probe of its method, per member) and ``X`` the start-up and end-of-run work
(precise BN, train-mode evaluation) of all units, measured as the pilot sweep's wall time
times ``workers`` minus the units' own wall times, scaled by the number of units.

    python scripts/study_pilot.py configs/sweeps/converged.yaml --out ~/normbench-study/pilot \\
        --images 2500 --budget-h 16 --min-epochs 6 --pack 4 --pack-max-batch 8

Writes OUT/pilot.json and OUT/pilot.md (the table and the chosen E) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = 50_000


def sample_grid(spec: dict, large_batch_seeds: int, small_batch: int) -> dict:
    """The study's grid with only ``large_batch_seeds`` seeds at batch sizes above
    ``small_batch`` (every seed of the small batches: they are packed together)."""
    grid = dict(spec["grid"])
    key = "train.batch_size,seed"
    if key in grid:
        grid[key] = [[b, s] for b, s in grid[key] if b <= small_batch or s < large_batch_seeds]
    return grid


def pilot_sweep(study: Path, out: Path, images: int, large_batch_seeds: int, small_batch: int) -> tuple[Path, dict]:
    spec = yaml.safe_load(study.read_text())
    full = spec["grid"]
    base = (study.parent / spec["base"]).resolve()
    pilot = {"description": f"timing pilot of {study.name}", "base": str(base), "out_dir": str(out / "runs"),
             "set": {"data.train_subset": images, "train.epochs": 1, "train.log_every": 5,
                     "analysis.probes_per_run": 1},
             "grid": sample_grid(spec, large_batch_seeds, small_batch), "rules": spec.get("rules", [])}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pilot.yaml"
    path.write_text(yaml.safe_dump(pilot, sort_keys=False))
    return path, full


def median_ips(run: Path) -> float:
    values = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        v = rec.get("perf/images_per_s")
        if isinstance(v, (int, float)):
            values.append(float(v))
    return statistics.median(values[1:] if len(values) > 2 else values)  # the first interval holds warm-up


def probe_seconds(cfg_dict: dict, repeats: int = 2) -> float:
    """Wall time of one fixed-mode probe of this cell's model at its initial weights."""
    import torch

    from normbench.analysis.probes import probe_batch, probe_model_fixed
    from normbench.config import RunConfig
    from normbench.data import Normalizer, load_cifar10
    from normbench.device import prepare_kernels, use_channels_last
    from normbench.models import build_model

    cfg = RunConfig.model_validate(cfg_dict)
    device = torch.device("cpu")
    channels_last = use_channels_last(cfg, device, prepare_kernels(device))
    model = build_model(cfg).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    data = load_cifar10(cfg.data, log=lambda m: None)
    x, y = probe_batch(data, Normalizer(device, channels_last), cfg.analysis.probe_images)
    probe_model_fixed(model, x, y, cfg.analysis.probe_distances, device)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probe_model_fixed(model, x, y, cfg.analysis.probe_distances, device)
        times.append(time.perf_counter() - t0)
    return min(times)


def units_of(runs_dir: Path) -> list[dict]:
    """One entry per unit (a run alone or a pack), from the pilot's summaries."""
    units: dict[str, dict] = {}
    for summary_path in sorted(runs_dir.glob("*/summary.json")):
        s = json.loads(summary_path.read_text())
        if s.get("status") != "completed":
            raise SystemExit(f"pilot run {summary_path.parent.name} ended {s.get('status')}: {s.get('note')}")
        cfg = s["config"]
        batch = cfg["train"]["batch_size"]
        members = s.get("packed_members") or 1
        key = f"{cfg['norm']['kind']}|{cfg['clip']['mode']}|{batch}" + ("|pack" if members > 1 else f"|{cfg['seed']}")
        ips = median_ips(summary_path.parent)
        train_s = s["steps"] * batch / s["images_per_s"]
        unit = units.setdefault(key, {"method": cfg["norm"]["kind"], "batch": batch, "members": 0, "ips": [],
                                      "wall_s": s["wall_time_s"], "other_s": s["wall_time_s"] - train_s,
                                      "images": s["steps"] * batch, "config": cfg})
        unit["members"] += 1
        unit["ips"].append(ips)
    for unit in units.values():
        unit["ips"] = statistics.median(unit["ips"])
    return list(units.values())


def _study_probes(study: Path) -> int:
    """``analysis.probes_per_run`` of the study's cells (the pilot itself probes once per run)."""
    from normbench.config import load_config

    spec = yaml.safe_load(study.read_text())
    return load_config((study.parent / spec["base"]).resolve()).analysis.probes_per_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=2500, help="training images per pilot run (a slice of one epoch)")
    ap.add_argument("--budget-h", type=float, default=16.0)
    ap.add_argument("--min-epochs", type=int, default=6)
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--pack", type=int, default=4)
    ap.add_argument("--pack-max-batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--large-batch-seeds", type=int, default=1, help="seeds sampled at batch sizes above --pack-max-batch")
    ap.add_argument("--extra-epoch-runs", type=float, default=0.0,
                    help="further single-seed run-epochs to add (controls), in units of an average run-epoch")
    ap.add_argument("--skip-sweep", action="store_true",
                    help="project again from the pilot runs and timings already in OUT (e.g. for another grid)")
    args = ap.parse_args()

    path, full_grid = pilot_sweep(args.study, args.out, args.images, args.large_batch_seeds, args.pack_max_batch)
    t0 = time.perf_counter()
    if not args.skip_sweep:
        cmd = [sys.executable, "-m", "normbench", "sweep", str(path), "--no-progress", "--workers", str(args.workers),
               "--pack", str(args.pack), "--pack-max-batch", str(args.pack_max_batch)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    sweep_wall = time.perf_counter() - t0
    probe_cache: dict[str, float] = {}
    if args.skip_sweep:  # the recorded measurements: the sweep's wall time and every probe time
        recorded = json.loads((args.out / "pilot.json").read_text())
        sweep_wall = recorded["sweep_wall_s"]
        probe_cache = {u["method"]: u["probe_s"] for u in recorded["units"]}

    units = units_of(args.out / "runs")
    for u in units:
        if u["method"] not in probe_cache:
            probe_cache[u["method"]] = probe_seconds(u["config"])
        u["probe_s"] = probe_cache[u["method"]]

    # multiplicity: each sampled large-batch seed stands for the study's seeds at that batch
    seeds_at = {}
    for b, s in full_grid.get("train.batch_size,seed", []):
        seeds_at.setdefault(b, set()).add(s)
    for u in units:
        u["mult"] = 1 if u["batch"] <= args.pack_max_batch else len(seeds_at.get(u["batch"], {0})) / args.large_batch_seeds
    probes = _study_probes(args.study)
    overhead = max(0.0, sweep_wall * args.workers - sum(u["wall_s"] for u in units))
    n_units = len(units)
    overhead_study = overhead * sum(u["mult"] for u in units) / n_units

    def wall(epochs: int) -> float:
        work = sum(u["mult"] * (epochs * (TRAIN_IMAGES / u["ips"] + u["other_s"]) + probes * u["probe_s"] * u["members"])
                   for u in units)
        per_run_epoch = work / sum(u["mult"] * u["members"] for u in units) / epochs
        work += args.extra_epoch_runs * per_run_epoch * epochs
        return (work + overhead_study) / args.workers

    budget = args.budget_h * 3600
    fits = [e for e in range(args.min_epochs, args.max_epochs + 1) if wall(e) <= budget]
    chosen = max(fits) if fits else args.min_epochs

    rows = sorted(units, key=lambda u: (u["batch"], u["method"]))
    lines = [f"Timing pilot of `{args.study}` ({args.images} training images per run, one slice of an epoch; "
             f"{args.workers} workers, pack {args.pack} up to batch {args.pack_max_batch}).", "",
             "| method | batch | members | img/s per member | other s / epoch | probe s | study units |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for u in rows:
        lines.append(f"| {u['method']} | {u['batch']} | {u['members']} | {u['ips']:.0f} | {u['other_s']:.1f} | "
                     f"{u['probe_s']:.2f} | {u['mult']:g} |")
    lines += ["", f"Pilot sweep wall time: {sweep_wall:.0f} s; start-up and end-of-run work of its {n_units} units: "
              f"{overhead:.0f} worker-seconds ({overhead_study:.0f} for the study's units).", "",
              "| E | projected wall time |", "|---:|---:|"]
    for e in range(args.min_epochs - 2 if args.min_epochs > 2 else 1, min(args.max_epochs, chosen + 3) + 1):
        lines.append(f"| {e} | {wall(e) / 3600:.1f} h |")
    lines += ["", f"Chosen: E = {chosen} (the largest E with a projected wall time within {args.budget_h:g} h, "
              f"and not below {args.min_epochs})." + ("" if fits else
              f" No E from {args.min_epochs} fits the budget: E = {args.min_epochs} takes {wall(args.min_epochs) / 3600:.1f} h.")]
    text = "\n".join(lines) + "\n"
    (args.out / "pilot.md").write_text(text)
    (args.out / "pilot.json").write_text(json.dumps(
        {"sweep_wall_s": sweep_wall, "overhead_s": overhead, "chosen_epochs": chosen,
         "projected_h": {e: wall(e) / 3600 for e in range(1, args.max_epochs + 1)},
         "units": [{k: v for k, v in u.items() if k != "config"} for u in units]}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
