"""Shared fixtures: small synthetic CIFAR-format data (never the network) and tiny configs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first (in their order), then the rest: with pytest-xdist the
    long tests start at once and the short ones fill in around them, instead of one long test
    finishing alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A data root holding synthetic CIFAR-10 in the official layout (200 train, 100 test)."""
    from normbench.data import synthetic_cifar

    root = tmp_path_factory.mktemp("synthetic-cifar")
    synthetic_cifar(root, n_train=200, n_test=100)
    return root


def tiny_overrides(root: Path, out: Path, **extra) -> list[str]:
    """--set items for a seconds-long run on synthetic data (ResNet-20 at width 0.25)."""
    sets = {"data.root": str(root), "data.allow_download": False, "log.out_dir": str(out),
            "model.width": 0.25, "train.batch_size": 20, "train.epochs": 2, "train.log_every": 3,
            "optim.warmup_epochs": 0.5, "device": "cpu", "threads": 1}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture
def tiny_cfg(synth_root, tmp_path):
    """Factory: tiny_cfg(**overrides) -> a validated RunConfig writing under tmp_path/runs."""
    from normbench.config import load_config

    def make(**extra):
        return load_config(None, tiny_overrides(synth_root, tmp_path / "runs", **extra))

    return make


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run `python -m normbench ARGS` in a subprocess; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "normbench", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=kw.get("cwd", REPO))


class SimulatedKill(BaseException):
    """Raised from a progress callback: the process 'dies' mid-run, nothing is cleaned up."""


def KillAfterStep(step: int):
    """A progress object whose update raises :class:`SimulatedKill` once ``step`` is reached."""
    from normbench.progress import Progress

    class _KillAfterStep(Progress):
        def update(self, at, metrics):
            if at >= step:
                raise SimulatedKill()

    return _KillAfterStep()


def SignalAtStep(step: int, signum: int = signal.SIGINT):
    """A progress object that sends ``signum`` to this process once, when ``step`` is reached
    (the engine then checkpoints and stops, as on a real Ctrl-C or SIGTERM)."""
    from normbench.progress import Progress

    class _SignalAtStep(Progress):
        sent = False

        def update(self, at, metrics):
            if at >= step and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signum)

    return _SignalAtStep()
