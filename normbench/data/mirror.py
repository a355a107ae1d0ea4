"""The offline JPEG mirror of CIFAR-10 (``cifar10-jpeg.npz``), decoded into the files of the
official "python version" layout, byte for byte as the mirror's own ``prepare.py`` writes them
(so a run's data fingerprint does not depend on which of the two decoded it).

The mirror is one ``.npz`` (no pickled objects): ``label_names`` (10 strings) and, for each
split (``train``, ``test``), ``<split>_jpeg`` (every image's JPEG bytes, concatenated, uint8),
``<split>_offsets`` (n + 1 offsets into them) and ``<split>_labels`` (n ints). The files
written: ``data_batch_1..5`` (10,000 training images each), ``test_batch`` and
``batches.meta``, each a protocol-2 pickle whose byte strings are Python 2 ``str`` opcodes, as
in the official release, so ``pickle.load(f, encoding="latin1")`` gives ``str`` keys.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from normbench.errors import UserError

MIRROR_KEYS = ("label_names", "train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets",
               "test_labels")
BATCH_SIZE = 10_000  # images per batch file of the official layout
TRAIN_BATCHES = 5
CLASS_RANGE = range(10)  # the labels of CIFAR-10's classes


class _Python2StrPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    """Protocol 2, with ``bytes`` written as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def python2_pickle(obj) -> bytes:
    """``obj`` pickled as the official CIFAR-10 files are (numpy arrays under ``numpy.core``)."""
    buf = io.BytesIO()
    _Python2StrPickler(buf, protocol=2).dump(obj)
    # numpy 2 pickles its arrays' reconstructor from numpy._core; the official files name numpy.core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def read_mirror(path: Path) -> dict[str, np.ndarray]:
    """The mirror's arrays, checked by :func:`check_mirror`; a file that is not such a mirror is
    one line naming it."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in MIRROR_KEYS if key not in npz.files]
            if missing:
                raise UserError(f"mirror {path} is not a CIFAR-10 JPEG mirror (it has no '{missing[0]}' array)")
            arrays = {key: npz[key] for key in MIRROR_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"mirror {path} cannot be read as a CIFAR-10 JPEG mirror (.npz): "
                        f"{getattr(err, 'strerror', None) or type(err).__name__}") from None
    problem = mirror_problem(arrays)
    if problem:
        raise UserError(f"mirror {path} is not a valid CIFAR-10 JPEG mirror: {problem}")
    return arrays


def mirror_problem(arrays: dict[str, np.ndarray]) -> str:
    """What is wrong with the mirror's arrays ('' when nothing): 10 class names; per split, n
    labels in 0..9, n + 1 offsets rising from 0 to the length of the JPEG bytes, and at most as
    many images as the split's batch files hold (50,000 training, 10,000 test)."""
    if arrays["label_names"].shape != (len(CLASS_RANGE),):
        return f"label_names has shape {arrays['label_names'].shape}, not ({len(CLASS_RANGE)},)"
    for split, n_batches in (("train", TRAIN_BATCHES), ("test", 1)):
        jpeg, offsets, labels = (arrays[f"{split}_{part}"] for part in ("jpeg", "offsets", "labels"))
        for name, array in ((f"{split}_jpeg", jpeg), (f"{split}_offsets", offsets), (f"{split}_labels", labels)):
            if array.ndim != 1 or array.dtype.kind not in "iu":
                return f"{name} is not a one-dimensional integer array"
        n, capacity = len(labels), n_batches * BATCH_SIZE
        if not 0 < n <= capacity:
            return f"{split}_labels has {n} entries; the {split} split holds 1 to {capacity:,} images"
        if len(offsets) != n + 1:
            return f"{split}_offsets has {len(offsets)} entries, not {n + 1} (one more than {split}_labels)"
        if offsets[0] != 0 or offsets[-1] != len(jpeg) or np.any(np.diff(offsets) <= 0):
            return (f"{split}_offsets do not rise from 0 to {len(jpeg)} (the length of {split}_jpeg), "
                    "one step per image")
        bad = np.flatnonzero((labels < CLASS_RANGE.start) | (labels >= CLASS_RANGE.stop))
        if len(bad):
            return f"{split}_labels[{bad[0]}] is {labels[bad[0]]}, not a class 0..{CLASS_RANGE.stop - 1}"
    return ""


def decode_rows(jpeg: np.ndarray, offsets: np.ndarray, what: str) -> np.ndarray:
    """Every JPEG of a split as one row of 3,072 bytes: 1,024 red, 1,024 green, 1,024 blue; an
    image that does not decode, or not to 32 x 32 pixels, is one line naming ``what`` (the mirror
    and split) and its index."""
    from PIL import Image, UnidentifiedImageError

    rows = np.empty((len(offsets) - 1, 3 * 32 * 32), dtype=np.uint8)
    for i in range(len(rows)):
        try:
            image = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
        except UnidentifiedImageError:
            raise UserError(f"{what} {i} is not a JPEG (its bytes are no image Pillow knows)") from None
        except (ValueError, OSError) as err:  # a truncated or damaged JPEG
            raise UserError(f"{what} {i} cannot be decoded as a JPEG: {err}") from None
        if image.size != (32, 32):
            raise UserError(f"{what} {i} is {image.size[0]} x {image.size[1]} pixels, not 32 x 32")
        rows[i] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).reshape(-1)
    return rows


def batch_files(arrays: dict[str, np.ndarray], mirror: Path) -> dict[str, bytes]:
    """File name -> contents of every file of the official layout, decoded from the arrays of
    the mirror file ``mirror`` (named in errors)."""
    classes = [str(name) for name in arrays["label_names"]]
    files: dict[str, bytes] = {}
    for split, n_batches in (("train", TRAIN_BATCHES), ("test", 1)):
        rows = decode_rows(arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"], f"mirror {mirror}: {split} image")
        labels = arrays[f"{split}_labels"]
        names = [f"{classes[label]}_{split}_{i:05d}.jpg".encode() for i, label in enumerate(labels)]
        for b in range(n_batches):
            part = slice(b * BATCH_SIZE, (b + 1) * BATCH_SIZE)
            if split == "train":
                name, title = f"data_batch_{b + 1}", f"training batch {b + 1} of {n_batches}"
            else:
                name, title = "test_batch", "testing batch 1 of 1"
            files[name] = python2_pickle({b"batch_label": title.encode(), b"labels": [int(v) for v in labels[part]],
                                          b"data": rows[part], b"filenames": names[part]})
    files["batches.meta"] = python2_pickle({b"label_names": [c.encode() for c in classes],
                                            b"num_cases_per_batch": BATCH_SIZE, b"num_vis": 3 * 32 * 32})
    return files


def write_mirror_files(mirror: Path, folder: Path) -> None:
    """Decode ``mirror`` into ``folder`` (created): each file written beside as ``.part``, then
    renamed, so no file is ever half there."""
    files = batch_files(read_mirror(mirror), mirror)
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        part = folder / (name + ".part")
        part.write_bytes(blob)
        part.replace(folder / name)
