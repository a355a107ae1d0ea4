"""scripts/check_study_runs.py: a completed run must have evaluated after every due epoch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_study_runs.py"


def make_run(folder: Path, evaluated_epochs: list[int], final: float, epochs: int = 3, every: int = 1) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(
        {"status": "completed", "final_test_acc": final, "config": {"train": {"epochs": epochs, "eval_every": every}}}))
    lines = [{"step": 10 * e, "epoch": e, "test/loss": 1.0, "test/acc": e / 10} for e in evaluated_epochs]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def check(*folders):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, folders)], capture_output=True, text=True)


def test_whole_runs_pass_and_a_missing_or_stale_evaluation_is_named(tmp_path):
    make_run(tmp_path / "ok" / "a", [1, 2, 3], 0.3)
    make_run(tmp_path / "ok" / "b", [2, 3], 0.3, every=2)  # every 2 epochs, and the last
    assert check(tmp_path / "ok").returncode == 0
    make_run(tmp_path / "bad" / "c", [1, 3], 0.3)
    make_run(tmp_path / "bad" / "d", [1, 2], 0.2)  # the last epoch's evaluation lost
    res = check(tmp_path / "bad")
    assert res.returncode == 1
    assert f"{tmp_path / 'bad' / 'c'}: no test evaluation after epoch 2" in res.stdout
    assert f"{tmp_path / 'bad' / 'd'}: no test evaluation after epoch 3" in res.stdout
    assert check().returncode == 2
