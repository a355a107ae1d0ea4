"""The per-run lock: one process at a time trains a run folder.

``normbench train`` and every sweep worker take an exclusive ``fcntl.flock`` on
``<run dir>/.lock`` before they read the run's summary or checkpoint, and hold it until the
run has written its last file. The lock file records ``pid@host`` of its holder, so a
refusal can say who has the run.

* The kernel releases a flock when the holding process dies, however it dies: a lock left by
  a killed process is simply free again, and there are no stale locks to clean up. The file
  itself is left in place (removing it would race with a process that has just opened it).
* Within one process the lock is re-entrant: a sweep worker holds a cell's lock while the
  engine, which locks every run it trains, trains that cell.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

LOCK_NAME = ".lock"

# Locks this process holds: real path of the lock file -> [fd, number of holders].
_HELD: dict[str, list] = {}


class RunLock:
    """An exclusive, re-entrant (per process) ``flock`` on a run folder's lock file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: Optional[int] = None
        self._key: Optional[str] = None

    @classmethod
    def of(cls, run_dir: Path) -> "RunLock":
        return cls(Path(run_dir) / LOCK_NAME)

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or already held by this process); never blocks."""
        import fcntl

        if self.fd is not None:
            return True
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self.fd, self._key = _HELD[key][0], key
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:  # the holder we waited for may have removed the file (see normbench.training.entry.train)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        _HELD[key] = [fd, 1]
        self.fd, self._key = fd, key
        return True

    def acquire(self, wait: bool, should_stop: Callable[[], bool] = lambda: False, poll_s: float = 0.5) -> bool:
        while True:
            if self.try_acquire():
                return True
            if not wait or should_stop():
                return False
            time.sleep(poll_s)

    def release(self) -> None:
        if self.fd is None:
            return
        entry = _HELD.get(self._key)
        self.fd = None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            import fcntl

            del _HELD[self._key]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def holder(self) -> str:
        """``pid@host`` of the process that holds (or last held) the lock."""
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def is_held(self) -> bool:
        """True when another process holds the lock now (never creates the file)."""
        if not self.path.exists() or os.path.realpath(self.path) in _HELD:
            return False
        if self.try_acquire():
            self.release()
            return False
        return True
