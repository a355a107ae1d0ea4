#!/usr/bin/env python
"""Check that every completed run under the given folders evaluated the test set after every
epoch its config asks for (``train.eval_every``, and the last), with the summary's final
accuracy from the last of them.

    python scripts/check_study_runs.py results/converged/runs [more folders]

A run interrupted by a signal during an epoch's last step and resumed by code older than the
fix of that case lacks the epoch's evaluation (and, at the last epoch, reports the previous
epoch's accuracy). Prints one line per such run and exits 1; exit 0 when every run is whole.
Only the standard library, so that it runs anywhere.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def problems(run: Path) -> list[str]:
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("status") != "completed":
        return []
    train = summary["config"]["train"]
    epochs, every = train["epochs"], train.get("eval_every", 1)
    due = {e for e in range(1, epochs + 1) if e % every == 0 or e == epochs}
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip() and "test/acc" in line]
    done = {round(r["epoch"]) for r in evals}
    found = [f"no test evaluation after epoch {e}" for e in sorted(due - done)]
    if evals and evals[-1]["test/acc"] != summary.get("final_test_acc"):
        found.append(f"final_test_acc {summary.get('final_test_acc')} is not the last evaluation's "
                     f"{evals[-1]['test/acc']}")
    return found


def main(folders: list[str]) -> int:
    if not folders:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    bad = 0
    runs = sorted(p.parent for f in folders for p in Path(f).glob("*/summary.json"))
    for run in runs:
        for text in problems(run):
            print(f"{run}: {text}")
            bad += 1
    print(f"{len(runs)} run(s) checked, {bad} problem(s)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
