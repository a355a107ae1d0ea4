"""The wall-clock time a resumable study has used, from its log (``scripts/study.sh``).

The study runs in segments: each ``=== <UTC time> start at <commit>`` line in the log begins
one. A segment's end is, in order of preference, the ``=== <time> sweeps ended`` line the
study writes when its sweeps return, the ``=== <time> last seen running`` line the next start
writes from the heartbeat file (refreshed every 30 s while the sweep lives), or, for segments
from before the heartbeat existed, a lower bound: the sweep prints a status line at intervals
of at least 30 s, so the segment lasted at least 30 s per status line (the table says which).

With ``--runs DIR`` (repeatable) it also sums the training time the run folders recorded
(``wall_time_s`` of every summary, finished or interrupted; a packed network's time counted
once, not once per seed): the workers' busy time, which divided by the number of workers is
the wall time while every worker was busy.

    python scripts/study_wall_time.py ~/normbench-study/study.log [--runs DIR ...] [--workers 2] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

STAMP = re.compile(r"^=== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (start at (\w+)|last seen running|sweeps ended.*)$")
STATUS_EVERY_S = 30.0


@dataclass
class Segment:
    start: datetime
    commit: str
    end: Optional[datetime] = None
    how: str = ""
    status_lines: int = 0

    @property
    def seconds(self) -> float:
        if self.end is not None:
            return (self.end - self.start).total_seconds()
        return self.status_lines * STATUS_EVERY_S


def segments(log_lines: list[str]) -> list[Segment]:
    out: list[Segment] = []
    for line in log_lines:
        m = STAMP.match(line.strip())
        if m:
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
            if m.group(3):
                out.append(Segment(when, m.group(3)))
            elif out and out[-1].end is None:
                out[-1].end = when
                out[-1].how = "end line" if m.group(2).startswith("sweeps ended") else "heartbeat"
            continue
        if out and line.startswith("[sweep] "):
            out[-1].status_lines += 1
    for seg in out:
        if seg.end is None:
            seg.how = f"at least: {seg.status_lines} status lines x {STATUS_EVERY_S:.0f} s"
    return out


def busy_seconds(run_roots: list[Path]) -> tuple[float, int]:
    """(training seconds the run folders recorded, a pack's counted once; summaries read)."""
    total, n = 0.0, 0
    for root in run_roots:
        for path in sorted(root.glob("*/summary.json")):
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            n += 1
            total += float(summary.get("wall_time_s") or 0.0) / max(1, int(summary.get("packed_members") or 1))
    return total, n


def fmt(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def table(segs: list[Segment]) -> str:
    rows = ["| segment start (UTC) | wall time | end known from |", "|---|---:|---|"]
    for s in segs:
        rows.append(f"| {s.start:%Y-%m-%d %H:%M:%S} | {fmt(s.seconds)} | {s.how} |")
    total = sum(s.seconds for s in segs)
    bound = "at least " if any(s.end is None for s in segs) else ""
    rows.append(f"| **total, {len(segs)} segments** | **{bound}{fmt(total)}** ({total / 3600:.1f} h) | |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path, help="the study's log (scripts/study.sh writes ~/normbench-study/study.log)")
    ap.add_argument("--runs", type=Path, action="append", default=[], help="a folder of run folders (repeatable)")
    ap.add_argument("--workers", type=int, default=2, help="parallel workers of the study's sweeps (default 2)")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    try:
        lines = args.log.read_text().splitlines()
    except OSError as err:
        print(f"study_wall_time: cannot read {args.log}: {err.strerror}", file=sys.stderr)
        return 2
    segs = segments(lines)
    if not segs:
        print(f"study_wall_time: {args.log} has no '=== <time> start at <commit>' line", file=sys.stderr)
        return 2
    text = table(segs)
    if args.runs:
        busy, n = busy_seconds(args.runs)
        text += (f"\n\nTraining time recorded by {n} run folders (a pack counted once): {fmt(busy)} of worker time, "
                 f"{busy / 3600 / args.workers:.1f} h of wall time with {args.workers} workers busy.")
    print(text)
    if args.markdown:
        runs = "".join(f" --runs {p.parent.name}/{p.name}" for p in args.runs)
        args.markdown.write_text(f"# Wall time used\n\nWall-clock time the study has used, by segment "
                                 f"(`python scripts/study_wall_time.py {args.log.name}{runs}`, run by "
                                 f"`scripts/study.sh collect`; the script says how each end is known):\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
