"""Files normbench reads and writes: the data folder and its manifest, checkpoints that plain
``torch.load(weights_only=True)`` reads, and strict JSON (no bare NaN) in every JSON file."""
from __future__ import annotations

import hashlib
import io
import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from normbench import data as D
from normbench.training import entry
from normbench.cli import app
from normbench.errors import UserError
from normbench.tracking import CHECKPOINT_DIGEST_KEY, RunDir, dumps_json

from conftest import KillAfterStep, SimulatedKill, run_cli, tiny_overrides


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def strict_json(text: str):
    """json.loads that refuses the non-JSON tokens NaN, Infinity and -Infinity."""
    def refuse(token):
        raise AssertionError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def cli_args(root: Path, out: Path, **extra) -> list[str]:
    return ["train", "--no-progress", *[a for s in tiny_overrides(root, out, **extra) for a in ("--set", s)]]


# ----------------------------------------------------------------------------- the data folder


@pytest.mark.slow
def test_data_folder_missing_a_file_is_named_and_left_untouched(tmp_path):
    root = tmp_path / "data"
    folder = D.synthetic_cifar(root, n_train=100, n_test=20)
    (folder / "data_batch_3").unlink()
    before = snapshot(folder)
    train = run_cli(*cli_args(root, tmp_path / "runs", **{"data.train_subset": 50, "train.epochs": 1}))
    assert train.returncode == 2, train.stdout + train.stderr
    assert len(train.stderr.strip().splitlines()) == 1 and "Traceback" not in train.stderr
    prepare = CliRunner().invoke(app, ["data", "prepare", "--root", str(root), "--no-download"])
    assert prepare.exit_code == 2, prepare.output
    for output in (train.stdout + train.stderr, prepare.output):
        assert f"{folder / 'data_batch_3'} is missing" in output and f"delete the folder {folder}" in output
        assert "decoding" not in output
    assert snapshot(folder) == before  # nothing rewritten, nothing added
    assert sorted(p.name for p in root.iterdir()) == [D.FOLDER]  # no staging folder left either


def tiny_mirror(where: Path, per_class: int = 2) -> Path:
    """A mirror in the format of the bundled data/cifar10-jpeg.npz, with a few random 32 x 32
    JPEGs per class in each split (normbench.data.mirror decodes it; no script beside it)."""
    from PIL import Image

    where.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"label_names": np.array([f"class{c}" for c in range(10)])}
    for split in ("train", "test"):
        blobs, labels = [], np.repeat(np.arange(10), per_class)
        for _ in labels:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
            blobs.append(buf.getvalue())
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
        arrays[f"{split}_labels"] = labels
    np.savez(where / "cifar10-jpeg.npz", **arrays)
    return where / "cifar10-jpeg.npz"


def test_mirror_fills_only_an_absent_or_empty_folder_and_never_leaves_half_of_it(tmp_path, monkeypatch):
    mirror = tiny_mirror(tmp_path / "mirror")
    root = tmp_path / "data"
    folder = root / D.FOLDER
    folder.mkdir(parents=True)  # empty: filled
    stale = root / f".{D.FOLDER}.4194305.part"  # a staging folder of a process that died
    stale.mkdir()
    real_write = pathlib.Path.write_bytes
    writes = []

    def disk_fills_up(self, blob):
        writes.append(self.name)
        if len(writes) == 4:
            raise OSError(28, "No space left on device")
        return real_write(self, blob)

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_fills_up)
    with pytest.raises(UserError, match="cannot write CIFAR-10 into .*No space left"):
        D.decode_mirror(root, mirror)
    assert folder.is_dir() and not any(folder.iterdir())  # three files were written, none of them here
    monkeypatch.setattr(pathlib.Path, "write_bytes", real_write)

    assert D.decode_mirror(root, mirror) == folder  # decoded by normbench alone, no script beside the mirror
    assert sorted(p.name for p in mirror.parent.iterdir()) == ["cifar10-jpeg.npz"]
    assert D.verify(folder) == "mirror" and len(D.load_split(folder, train=False)[1]) == 20
    assert sorted(p.name for p in root.iterdir()) == [D.FOLDER]  # staging folders gone, the stale one too

    (folder / "test_batch").unlink()
    before = snapshot(folder)
    with pytest.raises(UserError, match="is not empty"):
        D.decode_mirror(root, mirror)
    monkeypatch.setattr(D.files, "MIRROR", mirror)
    with pytest.raises(UserError, match="test_batch is missing; put it back"):
        D.ensure_cifar10(root, allow_download=False)
    assert snapshot(folder) == before


@pytest.mark.parametrize("manifest", [
    "[1, 2]",
    '"synthetic"',
    '{"source": "synthetic", "md5": ["0123"]}',
    '{"source": 3, "md5": {}}',
    '{"md5": {}}',
    '{"source": "synthetic", "md5": {"data_batch_1": 5}}',
])
def test_data_manifest_of_the_wrong_shape_is_named(tmp_path, manifest):
    folder = D.synthetic_cifar(tmp_path, n_train=50, n_test=20)
    (folder / D.MANIFEST).write_text(manifest)
    with pytest.raises(UserError, match=f"data manifest {folder / D.MANIFEST} is malformed"):
        D.verify(folder)


def test_data_manifest_of_the_wrong_shape_exits_2_in_one_line(tmp_path):
    folder = D.synthetic_cifar(tmp_path / "data", n_train=50, n_test=20)
    (folder / D.MANIFEST).write_text("[]")
    result = CliRunner().invoke(app, cli_args(tmp_path / "data", tmp_path / "runs"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"data manifest {folder / D.MANIFEST} is malformed" in result.output


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_with_plain_torch_load_weights_only(tiny_cfg):
    """Everything the trainer, the clipper and the analysis put into a checkpoint is tensors,
    numbers, strings and containers: ``torch.load(path, weights_only=True)`` reads it."""
    cfg = tiny_cfg(**{"train.epochs": 1, "clip.mode": "dynamic", "analysis.probe_every": 3,
                      "analysis.hist_every": 3, "analysis.dead_units": True, "analysis.dead_units_images": 20})
    assert entry.train(cfg)["status"] == "completed"
    path = RunDir(cfg.run_dir()).checkpoint
    plain = torch.load(path, weights_only=True)
    assert isinstance(plain[CHECKPOINT_DIGEST_KEY], str)
    ours = RunDir(cfg.run_dir()).load_checkpoint()
    assert CHECKPOINT_DIGEST_KEY not in ours and set(plain) == set(ours) | {CHECKPOINT_DIGEST_KEY}
    assert plain["state"]["step"] == ours["state"]["step"] == 10
    assert ours["clipper"]["history"].numel() > 0 and ours["analysis"]["hist_layers"]
    for name, tensor in ours["model"].items():
        assert torch.equal(plain["model"][name], tensor), name


def test_packed_members_checkpoints_load_with_plain_torch_load(tiny_cfg, tmp_path):
    from normbench.training.packed import train_packed

    cfgs = [tiny_cfg(seed=s, **{"log.out_dir": str(tmp_path / "packed"), "train.epochs": 1}) for s in range(2)]
    summaries = train_packed(cfgs)
    assert [s["packed_members"] for s in summaries] == [2, 2]
    for cfg in cfgs:
        state = torch.load(RunDir(cfg.run_dir()).checkpoint, weights_only=True)
        assert state["state"]["step"] == 10 and "stem.weight" in "".join(state["model"])


def test_altered_checkpoint_content_is_never_used(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    state = {"model": {"w": torch.arange(2000, dtype=torch.float32), "n": torch.tensor(3)},
             "state": {"step": 7, "best_acc": 0.25, "last_eval": {}}, "rng": {"cpu": torch.get_rng_state()},
             "pending": [(1, torch.ones(3))], "flag": True, "note": None}
    run.save_checkpoint(state)
    loaded = run.load_checkpoint()
    assert loaded["state"] == state["state"] and torch.equal(loaded["model"]["w"], state["model"]["w"])

    # a well-formed file whose content was changed is caught by the digest inside it
    plain = torch.load(run.checkpoint, weights_only=True)
    plain["model"]["w"][1234] += 1.0
    torch.save(plain, run.checkpoint)
    with pytest.raises(UserError, match="checkpoint.pt is corrupt \\(checksum mismatch"):
        run.load_checkpoint()

    # one flipped byte anywhere: reported, or (in bytes nothing reads) the very same content
    run.save_checkpoint(state)
    blob = run.checkpoint.read_bytes()
    for pos in range(0, len(blob), max(1, len(blob) // 300)):
        flipped = bytearray(blob)
        flipped[pos] ^= 0x55
        run.checkpoint.write_bytes(bytes(flipped))
        try:
            got = run.load_checkpoint()
        except UserError as err:
            assert "checkpoint.pt is corrupt" in str(err)
            continue
        assert got["state"] == state["state"] and torch.equal(got["model"]["w"], state["model"]["w"]), pos
        assert torch.equal(got["rng"]["cpu"], state["rng"]["cpu"]) and got["pending"][0][0] == 1, pos
    for cut in (len(blob) - 1, len(blob) // 2, 10):
        run.checkpoint.write_bytes(blob[:cut])
        with pytest.raises(UserError, match="checkpoint.pt is corrupt"):
            run.load_checkpoint()



@pytest.mark.slow
def test_checkpoint_of_the_older_format_resumes(tiny_cfg, tmp_path):
    """A run checkpointed by the older writer (magic line, SHA-256, payload) resumes, bit-identical
    to a run never interrupted, and its next checkpoint is of the plain format."""
    straight = tiny_cfg(**{"log.out_dir": str(tmp_path / "a")})
    stopped = tiny_cfg(**{"log.out_dir": str(tmp_path / "b")})
    entry.train(straight)
    with pytest.raises(SimulatedKill):
        entry.train(stopped, progress=KillAfterStep(15))  # mid epoch 2, after epoch 1's checkpoint
    run = RunDir(stopped.run_dir())
    state = run.load_checkpoint()
    assert state["state"]["step"] == 10
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    run.checkpoint.write_bytes(b"NORMBENCH-CKPT-1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    assert run.load_checkpoint()["state"]["step"] == 10
    flipped = bytearray(run.checkpoint.read_bytes())
    flipped[-100] ^= 0xFF
    run.checkpoint.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="checksum mismatch"):
        run.load_checkpoint()
    run.checkpoint.write_bytes(b"NORMBENCH-CKPT-1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)

    summary = entry.train(stopped)
    assert summary["status"] == "completed" and summary["steps"] == 20
    a, b = RunDir(straight.run_dir()).load_checkpoint(), torch.load(run.checkpoint, weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name


# ----------------------------------------------------------------------------- strict JSON


def test_metrics_and_summary_are_strict_json_with_null_for_nan(tiny_cfg):
    cfg = tiny_cfg(**{"train.epochs": 1, "clip.mode": "none"})  # no clipping: no threshold
    summary = entry.train(cfg)
    run = RunDir(cfg.run_dir())
    records = [strict_json(line) for line in run.metrics.read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert train_records and all(r["grad/threshold"] is None for r in train_records)
    assert all(isinstance(r["grad/norm"], float) for r in train_records)
    assert strict_json(run.summary.read_text())["status"] == summary["status"] == "completed"
    assert run.read_metrics() == records

    run.write_summary({**summary, "final_test_loss": float("nan"), "extra": [float("inf"), -float("inf"), 1.5]})
    written = strict_json(run.summary.read_text())
    assert written["final_test_loss"] is None and written["extra"] == [None, None, 1.5]
    run.append_metrics({"step": 99, "x": float("nan")})
    assert strict_json(run.metrics.read_text().splitlines()[-1]) == {"step": 99, "x": None}
    assert dumps_json({"a": (float("nan"), 2)}) == '{"a": [null, 2]}'


@pytest.mark.slow
def test_report_reads_null_values_and_writes_strict_json(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"train.epochs": 1})
    summary = entry.train(cfg)
    run = RunDir(cfg.run_dir())
    run.write_summary({k: v for k, v in summary.items() if k != "run_dir"} | {"best_test_acc": float("nan")})
    assert strict_json(run.summary.read_text())["best_test_acc"] is None
    proc = run_cli("report", str(tmp_path / "runs"), "--metric", "best", "--format", "json",
                   "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (tmp_path / "report").glob("*.json")
    body = strict_json(path.read_text())
    (cell,) = body["tables"][0]["cells"]
    assert body["n_runs"] == 1 and cell["values"] == [] and cell["mean"] is None and not cell["missing"]
