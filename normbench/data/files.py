"""The CIFAR-10 files on disk: find them, download them or decode the bundled mirror, check
every file's md5, and read a split into tensors.

The one format read is the official "CIFAR-10 python version" layout
(``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``). Lookup order:

1. ``data.root`` (default ``$NORMBENCH_DATA`` or ``~/.cache/normbench/data``) already has it;
2. a downloaded official ``cifar-10-python.tar.gz`` given as ``--archive FILE`` or
   ``$NORMBENCH_CIFAR_ARCHIVE``, unpacked safely and checked against the official md5s;
3. torchvision's download (official md5), which fails fast when offline;
4. the JPEG mirror ``cifar10-jpeg.npz`` (``--mirror FILE``, ``$NORMBENCH_CIFAR_MIRROR``, or
   ``data/`` of a clone), decoded by :mod:`normbench.data.mirror` and recorded as
   ``data_source: mirror``.

Steps 2 to 4 run only when ``cifar-10-batches-py`` is absent or empty: they fill a hidden
staging folder beside it and rename it into place, so a killed fill leaves no partial folder
and files already there are never overwritten (a folder missing some files is reported).
When none of them can, the error names the flags and variables that give a source.

Every load checks each file's md5 against the official release or against the manifest
that normbench wrote when it produced the files (mirror or synthetic data), so a truncated
or altered batch is reported, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from normbench.data.archive import ARCHIVE_NAME, extract_official
from normbench.data.mirror import write_mirror_files
from normbench.errors import UserError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
ALL_FILES = TRAIN_FILES + TEST_FILES + ["batches.meta"]
MANIFEST = "normbench-manifest.json"
MIRROR = Path(__file__).resolve().parent.parent.parent / "data" / "cifar10-jpeg.npz"  # in a clone; a wheel has none
MIRROR_ENV = "NORMBENCH_CIFAR_MIRROR"
ARCHIVE_ENV = "NORMBENCH_CIFAR_ARCHIVE"
DOWNLOAD_TIMEOUT_S = 10.0


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def official_md5s() -> dict[str, str]:
    """The official release's sums, as torchvision lists them."""
    from torchvision.datasets import CIFAR10

    sums = {name: md5 for name, md5 in CIFAR10.train_list + CIFAR10.test_list}
    sums[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return sums


def atomic_write_bytes(path: Path, blob: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def write_manifest(folder: Path, source: str) -> None:
    """Record where the files in ``folder`` came from, with their md5 sums."""
    sums = {name: md5_of(folder / name) for name in ALL_FILES}
    atomic_write_bytes(folder / MANIFEST, json.dumps({"source": source, "md5": sums}, indent=1).encode())


@dataclass(frozen=True)
class DataIdentity:
    """What a run was trained on: the data's source and a fingerprint of its files' md5s."""

    source: str        # official | mirror | synthetic | ... (the manifest's word)
    fingerprint: str   # 16 hex digits of SHA-256 over "name md5" of every file

    def describe(self) -> str:
        return f"{self.source} data {self.fingerprint}"


def fingerprint_of(sums: dict[str, str]) -> str:
    text = "".join(f"{name} {sums[name]}\n" for name in sorted(sums))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _manifest_is_well_formed(manifest) -> bool:
    """``{"source": str, "md5": {file name: md5 string}}``, as :func:`write_manifest` writes it."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("source"), str):
        return False
    sums = manifest.get("md5")
    return isinstance(sums, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items())


def verify(folder: Path) -> str:
    """Check every file's md5; return the data source ('official', 'mirror', ...)."""
    return verify_identity(folder).source


def verify_identity(folder: Path) -> DataIdentity:
    """Check every file's md5; return the data's source and fingerprint."""
    missing = [name for name in ALL_FILES if not (folder / name).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"CIFAR-10 file {folder / missing[0]} is missing{more}; put it back, or delete the folder "
                        f"{folder} and run `normbench data prepare` to rebuild it (normbench fills only an "
                        "absent or empty data folder)")
    sums = {name: md5_of(folder / name) for name in ALL_FILES}
    if sums == official_md5s():
        return DataIdentity("official", fingerprint_of(sums))
    manifest_path = folder / MANIFEST
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            raise UserError(f"data manifest {manifest_path} is unreadable; delete {folder} and run "
                            "`normbench data prepare`") from None
        if not _manifest_is_well_formed(manifest):
            raise UserError(f"data manifest {manifest_path} is malformed (expected {{\"source\": text, \"md5\": "
                            f"{{file: md5}}}}); delete {folder} and run `normbench data prepare`")
    expected = manifest.get("md5") or official_md5s()
    for name in ALL_FILES:
        if sums[name] != expected.get(name):
            raise UserError(f"CIFAR-10 file {folder / name} is corrupt (md5 {sums[name]} matches neither the "
                            f"official release nor {MANIFEST}); delete {folder} and run `normbench data prepare`")
    return DataIdentity(str(manifest.get("source", "unknown")), fingerprint_of(sums))


def is_unfilled(folder: Path) -> bool:
    """True when ``folder`` is absent or an empty directory: the only state normbench fills."""
    try:
        return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
    except OSError as err:
        raise UserError(f"cannot read data folder {folder}: {err.strerror or err}") from None


def _staging_folder(root: Path) -> Path:
    """A fresh hidden folder in ``root`` to fill (``.cifar-10-batches-py.<pid>.part``); the
    staging folders of processes that died mid-fill are removed first."""
    for old in root.glob(f".{FOLDER}.*.part"):
        try:
            os.kill(int(old.name.rsplit(".", 2)[-2]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass
    stage = root / f".{FOLDER}.{os.getpid()}.part"
    shutil.rmtree(stage, ignore_errors=True)
    return stage


def _move_into_place(filled: Path, folder: Path) -> None:
    """Rename the complete folder ``filled`` to ``folder`` (absent or empty). When another
    process filled ``folder`` meanwhile, its files are kept and ``filled`` is left to be removed."""
    try:
        os.rename(filled, folder)  # atomic; replaces an empty directory
    except OSError as err:
        if is_unfilled(folder):
            raise UserError(f"cannot write CIFAR-10 into {folder}: {err.strerror or err}") from None


def _try_download(root: Path) -> bool:
    """torchvision's download with the official md5 into a staging folder, renamed to
    ``root/cifar-10-batches-py`` when complete; False (quickly) when offline."""
    from torchvision.datasets import CIFAR10

    stage = _staging_folder(root)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        CIFAR10(str(stage), train=True, download=True)
        _move_into_place(stage / FOLDER, root / FOLDER)
        return True
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - any network or checksum failure means "use the mirror"
        return False
    finally:
        socket.setdefaulttimeout(old)
        shutil.rmtree(stage, ignore_errors=True)


def _fill(root: Path, write, what: str) -> Path:
    """Fill ``root/cifar-10-batches-py`` (absent or empty) through a staging folder:
    ``write(stage)`` writes the files there, then the folder is renamed into place."""
    root = Path(root)
    folder = root / FOLDER
    if not is_unfilled(folder):
        raise UserError(f"data folder {folder} is not empty; {what} is unpacked only into an absent or "
                        "empty folder (delete it to rebuild)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        stage = _staging_folder(root)
        try:
            write(stage)
            _move_into_place(stage, folder)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except OSError as err:
        raise UserError(f"cannot write CIFAR-10 into {root}: {err.strerror or err}") from None
    return folder


def decode_mirror(root: Path, mirror: Path = MIRROR) -> Path:
    """Decode the JPEG mirror ``mirror`` into ``root/cifar-10-batches-py``, which must be absent
    or empty: into a staging folder with the manifest, then renamed."""
    mirror = Path(mirror)
    if not mirror.is_file():
        raise UserError(f"no CIFAR-10 under {root} and the mirror {mirror} is not a file; {_sources_hint(root)}")

    def write(stage: Path) -> None:
        write_mirror_files(mirror, stage)
        write_manifest(stage, "mirror")

    return _fill(root, write, "the mirror")


def unpack_archive(root: Path, archive: Path) -> Path:
    """Unpack the official ``cifar-10-python.tar.gz`` into ``root/cifar-10-batches-py`` (absent
    or empty), every file checked against the official md5s."""
    archive = Path(archive)
    if not archive.is_file():
        raise UserError(f"archive {archive} is not a file; give the downloaded {ARCHIVE_NAME}")
    expected = official_md5s()
    return _fill(root, lambda stage: extract_official(archive, stage, expected), "an archive")


def _sources_hint(root: Path) -> str:
    """How to give normbench a source of CIFAR-10 for ``root`` (the end of an error line)."""
    return (f"give `normbench data prepare` a downloaded official --archive {ARCHIVE_NAME} (or set {ARCHIVE_ENV}) "
            f"or the JPEG --mirror cifar10-jpeg.npz (or set {MIRROR_ENV}), or put the official files into "
            f"{Path(root) / FOLDER}")


def given_file(value, env: str, flag: str) -> Optional[Path]:
    """The file a flag names (``value``), else the one the variable ``env`` names, else None;
    one that is not a file is one line naming the flag or the variable."""
    if value is not None:
        path, named = Path(value).expanduser(), f"{flag} {value}"
    elif os.environ.get(env):
        path, named = Path(os.environ[env]).expanduser(), f"{env}={os.environ[env]}"
    else:
        return None
    if not path.is_file():
        raise UserError(f"{named}: no such file")
    return path


def ensure_cifar10(root: Path, allow_download: bool = True, log=print, archive: Optional[Path] = None,
                   mirror: Optional[Path] = None) -> tuple[Path, str]:
    """Return (folder, source), fetching or decoding the data set first when it is absent."""
    folder, identity = ensure_cifar10_identity(root, allow_download, log, archive=archive, mirror=mirror)
    return folder, identity.source


def ensure_cifar10_identity(root: Path, allow_download: bool = True, log=print, archive: Optional[Path] = None,
                            mirror: Optional[Path] = None) -> tuple[Path, DataIdentity]:
    """Return (folder, identity), filling the data folder first when it is absent or empty:
    from ``archive`` ($NORMBENCH_CIFAR_ARCHIVE), else torchvision's download (when
    ``allow_download``), else ``mirror`` ($NORMBENCH_CIFAR_MIRROR, else a clone's bundled one)."""
    root = Path(root).expanduser()
    folder = root / FOLDER
    if is_unfilled(folder):  # a folder holding some files is never filled over: verify names what is missing
        archive = given_file(archive, ARCHIVE_ENV, "--archive")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"data.root {root} cannot be created: {err.strerror or err}") from None
        if not os.access(root, os.W_OK):
            raise UserError(f"data.root {root} is not writable and has no CIFAR-10 in it")
        if archive is not None:
            unpack_archive(root, archive)  # said once done: a refused archive is one line
            log(f"unpacked the official CIFAR-10 release from {archive}")
        else:
            _download_or_decode(root, allow_download, mirror, log)
    return folder, verify_identity(folder)


def _download_or_decode(root: Path, allow_download: bool, mirror: Optional[Path], log) -> None:
    """torchvision's download when allowed; else (or when it fails) the mirror, if there is one."""
    if allow_download:
        log(f"CIFAR-10 not found in {root}; trying torchvision's download")
        if _try_download(root):
            log("downloaded the official CIFAR-10 release")
            return
    mirror = given_file(mirror, MIRROR_ENV, "--mirror") or (MIRROR if MIRROR.is_file() else None)
    if mirror is None:
        why = "the download failed" if allow_download else "downloads are off"
        raise UserError(f"no CIFAR-10 in {root}: {why} and no JPEG mirror was given; {_sources_hint(root)}")
    log(f"{'offline' if allow_download else 'no download'}: decoding the mirror {mirror} into {root} (about 10 s)")
    decode_mirror(root, mirror)


def data_identity(data_cfg, log=print) -> DataIdentity:
    """The identity of the data a run with ``data_cfg`` trains on (made available first)."""
    return ensure_cifar10_identity(data_cfg.resolved_root(), data_cfg.allow_download, log)[1]


_PRESENT: dict[str, tuple[tuple, Optional[DataIdentity]]] = {}


def present_identity(root: Path) -> Optional[DataIdentity]:
    """The identity of the data already in ``root``, or None when it is absent or does not
    verify; never fetches. Cached per process while the files' sizes and mtimes stay the same."""
    folder = Path(root).expanduser() / FOLDER
    try:
        stats = tuple((name, st.st_size, st.st_mtime_ns, st.st_ino)
                      for name, st in ((n, (folder / n).stat()) for n in ALL_FILES))
    except OSError:
        return None
    key = str(folder.resolve())
    cached = _PRESENT.get(key)
    if cached is None or cached[0] != stats:
        try:
            identity: Optional[DataIdentity] = verify_identity(folder)
        except UserError:
            identity = None
        cached = _PRESENT[key] = (stats, identity)
    return cached[1]


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - any decoding problem is a corrupt file
        raise UserError(f"CIFAR-10 file {path} cannot be read ({type(err).__name__}); delete it and run "
                        "`normbench data prepare`") from None
    if len(data) != len(labels):
        raise UserError(f"CIFAR-10 file {path} has {len(data)} images but {len(labels)} labels")
    return data, labels


def load_split(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [load_batch(folder / name) for name in (TRAIN_FILES if train else TEST_FILES)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(x), torch.from_numpy(y)
