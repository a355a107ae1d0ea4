#!/usr/bin/env python
"""How close is the dry run's time estimate to the sweep's real wall time?

    python scripts/check_estimate.py configs/sweeps/quick.yaml [-w 2 -t 1 --set train.epochs=1 ...]

For one sweep file it runs, in a fresh temporary output folder (``--out``),

1. ``normbench sweep FILE --dry-run`` (its table and the "estimated wall time" line), then
2. ``normbench sweep FILE --no-progress``, timed from launch to exit,

each as ``python -m normbench`` in a subprocess of this interpreter on this tree, with the same
extra arguments (workers, threads, ``--set``, ``--pack``, ...), and prints the estimate, the
measured wall time, their ratio (measured / estimated), both commands, the git commit and the
machine's load average before and after (a loaded machine makes the measurement
meaningless: take it on a quiet one). ``--json FILE`` also writes these as JSON. The folder
is removed afterwards unless ``--keep``.

Exit status: 0 when the sweep trained every cell (exit 0), 1 otherwise, 2 for bad arguments
or a dry run without an estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ESTIMATE_LINE = re.compile(r"estimated wall time:\s*(\S+)")
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> float:
    """Seconds from normbench's duration format (42s, 3m05s, 2h07m); ValueError otherwise."""
    match = DURATION.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r}")
    h, m, s = (int(g) if g else 0 for g in match.groups())
    return 3600.0 * h + 60.0 * m + s


def estimate_from(output: str) -> float:
    """The estimate (seconds) in a dry run's output; ValueError when it has none."""
    found = ESTIMATE_LINE.findall(output)
    if not found:
        raise ValueError("the dry run printed no 'estimated wall time' line")
    return parse_duration(found[-1])


def git_commit() -> str:
    """HEAD's commit, with '+dirty' when the tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def normbench(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "normbench", *args]


def run(cmd: list[str], capture: bool) -> tuple[int, str, float]:
    """(exit status, output, wall seconds) of ``cmd`` run from the repository root."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    return done.returncode, done.stdout or "", time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s SWEEP.yaml [--keep] [--json FILE] [sweep arguments ...]")
    parser.add_argument("sweep_file", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the temporary output folder")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    args, extra = parser.parse_known_args(argv)
    if not args.sweep_file.is_file():
        print(f"check_estimate: {args.sweep_file} is not a file", file=sys.stderr)
        return 2
    if any(a in ("--out", "-o", "--dry-run", "--force", "--rerun-failed") for a in extra):
        print("check_estimate: --out, --dry-run, --force and --rerun-failed are set by this script", file=sys.stderr)
        return 2
    sweep = str(args.sweep_file.resolve())
    out = Path(tempfile.mkdtemp(prefix="normbench-check-estimate-"))
    try:
        dry_cmd = normbench(["sweep", sweep, "--dry-run", "--out", str(out / "sweep"), *extra])
        real_cmd = normbench(["sweep", sweep, "--no-progress", "--out", str(out / "sweep"), *extra])
        code, dry_out, dry_s = run(dry_cmd, capture=True)
        print(dry_out, end="")
        if code != 0:
            print(f"check_estimate: the dry run failed (exit {code})", file=sys.stderr)
            return 2
        try:
            estimated = estimate_from(dry_out)
        except ValueError as err:
            print(f"check_estimate: {err}", file=sys.stderr)
            return 2
        load_before = load_average()
        code, _, measured = run(real_cmd, capture=False)
        record = {"sweep_file": sweep, "estimated_s": estimated, "measured_s": round(measured, 1),
                  "ratio": round(measured / estimated, 3) if estimated else None, "sweep_exit": code,
                  "dry_run_s": round(dry_s, 1), "dry_run_command": shlex.join(dry_cmd),
                  "command": shlex.join(real_cmd), "git_commit": git_commit(), "cpus": os.cpu_count(),
                  "load_average_before": load_before, "load_average_after": load_average()}
        print()
        print(f"estimate      {estimated:.0f} s   (dry run, which itself took {dry_s:.0f} s)")
        print(f"measured      {measured:.0f} s   (launch to exit, sweep exit status {code})")
        ratio = f"{record['ratio']:.2f}" if record["ratio"] is not None else "n/a (estimate 0 s)"
        print(f"ratio         {ratio}   (measured / estimate)")
        print(f"command       {record['command']}")
        print(f"git commit    {record['git_commit']}")
        print(f"load average  {load_before} before, {record['load_average_after']} after ({os.cpu_count()} CPUs)")
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
        return 0 if code == 0 else 1
    finally:
        if args.keep:
            print(f"output kept in {out}")
        else:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
