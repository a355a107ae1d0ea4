"""A run's folder on disk: config, metrics, summary, checkpoint, TensorBoard events.

Layout of ``<log.out_dir>/<name>-<config hash>/``::

    config.yaml      the resolved config, written before the first step
    metrics.jsonl    one JSON object per log interval / evaluation (tags: README.md, "Outputs")
    summary.json     the contract with `normbench report`; written atomically, last
    checkpoint.pt    model, optimizer, step, RNG and logging state; atomic, self-checksummed
    tb/              TensorBoard events and the run's HParams entry (normbench.tensorboard_log)
    error.log        the traceback of a failed run

Every file that is replaced is written to a temporary file in the same folder and renamed
over the old one, so a killed process never leaves half a file. ``checkpoint.pt`` is a plain
``torch.save`` file that ``torch.load(path, weights_only=True)`` reads; its state carries
``CHECKPOINT_DIGEST_KEY``, the SHA-256 of everything else in it (:func:`state_digest`), so a
truncated or altered checkpoint is reported, never used. Checkpoints of the older format (a
magic line and the SHA-256 of the payload before it) are still read. Every JSON file is
strict JSON: a NaN or infinite value is written as ``null``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, Optional

from normbench.errors import RunFolderError, UserError

CHECKPOINT_MAGIC = b"NORMBENCH-CKPT-1 "  # the header of the older checkpoint format (still read)
CHECKPOINT_DIGEST_KEY = "normbench_content_sha256"
SUMMARY_VERSION = 1


# Fault injection for the kill tests: seconds to pause between writing a temp file and
# renaming it, so that a SIGKILL can land in the middle of a checkpoint write.
_WRITE_PAUSE_S = float(os.environ.get("NORMBENCH_TEST_WRITE_PAUSE", "0") or 0)


def atomic_write(path: Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` via a temp file + fsync + rename in the same folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if _WRITE_PAUSE_S:
            import time

            time.sleep(_WRITE_PAUSE_S)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UserError(f"cannot write {path.name} in {path.parent}: {err.strerror}") from None


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs) -> str:
    """``json.dumps`` that writes strict JSON: non-finite floats become ``null``."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (dumps_json(obj, indent=2, sort_keys=False) + "\n").encode())


def state_digest(state: Any) -> str:
    """SHA-256 over a checkpoint state's content: every tensor's dtype, shape and bytes, every
    number, string, bool and None, and the nesting of dicts, lists and tuples (in order).
    Anything else raises TypeError: it would not load with ``torch.load(weights_only=True)``."""
    import torch

    h = hashlib.sha256()

    def feed(tag: bytes, data: bytes) -> None:
        h.update(tag + len(data).to_bytes(8, "little") + data)

    def walk(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            t = node.detach().to("cpu").contiguous().reshape(-1)
            feed(b"T", f"{t.dtype}{tuple(node.shape)}".encode())
            feed(b"V", t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif node is None:
            feed(b"N", b"")
        elif isinstance(node, bool):
            feed(b"B", b"1" if node else b"0")
        elif isinstance(node, int):
            feed(b"I", str(int(node)).encode())
        elif isinstance(node, float):
            feed(b"F", struct.pack("<d", node))
        elif isinstance(node, str):
            feed(b"S", node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, dict):
            feed(b"D", str(len(node)).encode())
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, (list, tuple)):
            feed(b"L", str(len(node)).encode())
            for value in node:
                walk(value)
        else:
            raise TypeError(f"checkpoint state holds a {type(node).__name__}, which "
                            "torch.load(weights_only=True) does not restore")

    walk(state)
    return h.hexdigest()


def git_commit() -> Optional[str]:
    """The commit of the normbench checkout this code runs from, if it is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_folder_creatable(path: Path, what: str) -> None:
    """Raise a one-line UserError naming ``what`` unless ``path`` is a writable folder or can
    be created as one (its nearest existing ancestor is a writable folder). Creates nothing."""
    path = Path(path).expanduser()
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        kind = "a file" if probe.is_file() else "not a folder"
        if probe == path:
            raise UserError(f"{what}: {path} is {kind}, not a folder")
        raise UserError(f"{what}: {path} cannot be created: {probe} is {kind}")
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        raise UserError(f"{what}: {path} {verb}")


def read_summary(path: Path) -> Optional[dict]:
    """A run's summary, or None when absent. Unparseable or malformed → UserError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunFolderError(f"summary {path} is corrupt (not valid JSON)") from None
    if not isinstance(summary, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(summary), "a number")
        raise RunFolderError(f"summary {path} is corrupt ({kind}, not a JSON object)")
    if "status" not in summary or "config" not in summary:
        raise RunFolderError(f"summary {path} is corrupt (missing status/config)")
    return summary


class RunDir:
    """Paths and atomic writers for one run folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.checkpoint = self.path / "checkpoint.pt"
        self.tb = self.path / "tb"
        self.error_log = self.path / "error.log"

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create run folder {self.path}: {err.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise UserError(f"run folder {self.path} is not writable")
        self.remove_stale_temp_files()

    def remove_stale_temp_files(self) -> None:
        """Temp files of writers that died mid-write (``.<name>.<pid>.tmp``, pid not alive)."""
        for tmp in self.path.glob(".*.tmp"):
            try:
                pid = int(tmp.name.rsplit(".", 2)[-2])
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError):
                tmp.unlink(missing_ok=True)
            except PermissionError:
                pass

    def wipe(self) -> None:
        """Forget all results (``--fresh``)."""
        for p in (self.metrics, self.summary, self.checkpoint, self.error_log):
            if p.exists():
                p.unlink()
        if self.tb.exists():
            shutil.rmtree(self.tb)

    def read_summary(self) -> Optional[dict]:
        return read_summary(self.summary)

    def write_config(self, text: str) -> None:
        atomic_write(self.config, text.encode())

    def write_error_log(self, text: str) -> None:
        atomic_write(self.error_log, text.encode())

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary, {"summary_version": SUMMARY_VERSION, **summary})

    # -- metrics -------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        line = dumps_json(record, sort_keys=True) + "\n"
        try:
            with open(self.metrics, "a") as f:
                f.write(line)
        except OSError as err:
            raise UserError(f"cannot write {self.metrics.name} in {self.path}: {err.strerror}") from None

    def metrics_size(self) -> int:
        return self.metrics.stat().st_size if self.metrics.exists() else 0

    def truncate_metrics(self, size: int) -> None:
        """Drop metric lines written after the checkpoint we resume from."""
        if self.metrics.exists() and self.metrics.stat().st_size > size:
            with open(self.metrics, "r+b") as f:
                f.truncate(size)

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    # -- checkpoint ----------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        """``state`` plus its content digest, as a plain ``torch.save`` file (atomically)."""
        import torch

        buf = io.BytesIO()
        torch.save({**state, CHECKPOINT_DIGEST_KEY: state_digest(state)}, buf)
        atomic_write(self.checkpoint, buf.getvalue())

    def load_checkpoint(self) -> Optional[dict]:
        """The checkpoint's state dict (without its digest), or None when there is none;
        corrupt → UserError."""
        import torch

        if not self.checkpoint.exists():
            return None
        blob = self.checkpoint.read_bytes()
        bad = f"checkpoint {self.checkpoint} is corrupt"
        if blob.startswith(CHECKPOINT_MAGIC[:8]):
            return self._load_headed_checkpoint(blob, bad)
        try:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to parse is a damaged file
            raise RunFolderError(f"{bad} (unreadable: truncated or altered; {type(err).__name__})") from None
        digest = state.pop(CHECKPOINT_DIGEST_KEY, None) if isinstance(state, dict) else None
        if not isinstance(digest, str):
            raise RunFolderError(f"{bad} (no {CHECKPOINT_DIGEST_KEY}: not written by normbench)")
        try:
            actual = state_digest(state)
        except TypeError:
            actual = None
        if actual != digest:
            raise RunFolderError(f"{bad} (checksum mismatch: truncated or altered)")
        return state

    def _load_headed_checkpoint(self, blob: bytes, bad: str) -> dict:
        """The older format: CHECKPOINT_MAGIC, the payload's SHA-256 in hex, a newline, the payload."""
        import torch

        head_len = len(CHECKPOINT_MAGIC) + 64 + 1
        if len(blob) < head_len or not blob.startswith(CHECKPOINT_MAGIC):
            raise RunFolderError(f"{bad} (bad header)")
        digest, payload = blob[len(CHECKPOINT_MAGIC): head_len - 1], blob[head_len:]
        if hashlib.sha256(payload).hexdigest().encode() != digest:
            raise RunFolderError(f"{bad} (checksum mismatch: truncated or altered)")
        try:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise RunFolderError(f"{bad} ({type(err).__name__})") from None


class ReadOnlyRunDir(RunDir):
    """The run folder as seen by ranks other than 0 under torchrun: they read, never write."""

    def create(self) -> None: ...
    def wipe(self) -> None: ...
    def write_config(self, text: str) -> None: ...
    def write_error_log(self, text: str) -> None: ...
    def write_summary(self, summary: dict) -> None: ...
    def append_metrics(self, record: dict) -> None: ...
    def truncate_metrics(self, size: int) -> None: ...
    def save_checkpoint(self, state: dict) -> None: ...
