"""scripts/study_wall_time.py: a resumable study's segments, each ended by its end line, the
next start's heartbeat line, or bounded below by its status lines; and the workers' busy time."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "study_wall_time.py"

LOG = """=== 2026-01-01 10:00:00 start at abc123
sweep converged.yaml: 4 cells
[sweep] 0/2 done, 2 running, 0 failed/diverged, eta 1h00m
[sweep] 0/2 done, 2 running, 0 failed/diverged, eta 0h59m
[sweep] 0/2 done, 2 running, 0 failed/diverged, eta 0h58m
=== 2026-01-01 12:00:00 start at abc123
[sweep] 1/2 done, 1 running, 0 failed/diverged, eta 0h30m
stopping: running cells write a checkpoint and stop (run the sweep again to resume them)
=== 2026-01-01 13:30:15 last seen running
=== 2026-01-02 09:00:00 start at abc123
=== 2026-01-02 09:45:30 sweeps ended
"""


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_each_segment_ends_by_the_best_evidence_and_a_bound_says_so(tmp_path):
    log = tmp_path / "study.log"
    log.write_text(LOG)
    res = run(log, "--markdown", tmp_path / "wall.md")
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 2026")]
    assert rows == ["| 2026-01-01 10:00:00 | 0:01:30 | at least: 3 status lines x 30 s |",
                    "| 2026-01-01 12:00:00 | 1:30:15 | heartbeat |",
                    "| 2026-01-02 09:00:00 | 0:45:30 | end line |"]
    assert "**at least 2:17:15** (2.3 h)" in res.stdout
    assert (tmp_path / "wall.md").read_text().count("| 2026") == 3


def test_busy_time_counts_a_pack_once(tmp_path):
    log = tmp_path / "study.log"
    log.write_text(LOG)
    runs = tmp_path / "runs"
    for name, seconds, members in [("bn-b2-s0", 3600.0, 2), ("bn-b2-s1", 3600.0, 2), ("nf-b2-s0", 1800.0, None)]:
        (runs / name).mkdir(parents=True)
        summary = {"status": "completed", "wall_time_s": seconds, **({"packed_members": members} if members else {})}
        (runs / name / "summary.json").write_text(json.dumps(summary))
    res = run(log, "--runs", runs, "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "3 run folders (a pack counted once): 1:30:00 of worker time, 0.8 h of wall time with 2 workers busy" \
        in res.stdout


def test_a_log_without_a_start_or_a_missing_log_is_one_line(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    for path in (empty, tmp_path / "missing.log"):
        res = run(path)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and path.name in res.stderr
