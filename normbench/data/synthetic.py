"""Synthetic data in the official CIFAR-10 layout (with a manifest): learnable, small, for tests."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from normbench.data.files import FOLDER, TRAIN_FILES, atomic_write_bytes, write_manifest


def write_cifar_layout(root: Path, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       test_y: np.ndarray, source: str = "synthetic") -> Path:
    """Write arrays in the official layout (5 train batches + test) with a manifest. For tests."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train_y)), 5)
    for name, idx in zip(TRAIN_FILES, chunks):
        entry = {"data": train_x[idx].reshape(len(idx), -1), "labels": [int(v) for v in train_y[idx]]}
        atomic_write_bytes(folder / name, pickle.dumps(entry))
    atomic_write_bytes(folder / "test_batch", pickle.dumps({"data": test_x.reshape(len(test_x), -1),
                                                             "labels": [int(v) for v in test_y]}))
    atomic_write_bytes(folder / "batches.meta", pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    write_manifest(folder, source)
    return folder


def synthetic_cifar(root: Path, n_train: int = 500, n_test: int = 200, seed: int = 0) -> Path:
    """Learnable synthetic CIFAR-format data: each class has its own colour and stripe pattern."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 10
        rng.shuffle(y)
        base = rng.integers(0, 60, size=(n, 3, 32, 32))
        colours = np.array([[(c * 37) % 256, (c * 91) % 256, (c * 53) % 256] for c in range(10)])
        stripes = (np.arange(32)[None, :] // (1 + y[:, None] % 4)) % 2  # (n, 32)
        img = base + 0.6 * colours[y][:, :, None, None] * stripes[:, None, :, None]
        return np.clip(img, 0, 255).astype(np.uint8), y.astype(np.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return write_cifar_layout(Path(root), train_x, train_y, test_x, test_y)
