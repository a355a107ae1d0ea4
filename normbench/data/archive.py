"""A downloaded copy of the official ``cifar-10-python.tar.gz``, unpacked safely.

Only the seven files of the data set are taken from the archive, each written under a name
normbench chooses (never a path read from the archive, so nothing lands outside the target
folder), and only from regular-file members (no links, devices or folders). Each file's md5
is checked against the official release's while it is written: an archive that is not the
official one, or is damaged, is refused with one line and leaves nothing behind.
"""
from __future__ import annotations

import gzip
import hashlib
import tarfile
import zlib
from pathlib import Path

from normbench.errors import UserError

ARCHIVE_NAME = "cifar-10-python.tar.gz"
MEMBER_FOLDER = "cifar-10-batches-py"
MAX_MEMBER_BYTES = 64 << 20  # every official file is about 30 MB or less


def _members(tar: tarfile.TarFile, names: list[str], archive: Path) -> dict[str, tarfile.TarInfo]:
    """The archive's member of each wanted file (``cifar-10-batches-py/<name>``)."""
    wanted = {f"{MEMBER_FOLDER}/{name}": name for name in names}
    found: dict[str, tarfile.TarInfo] = {}
    for member in tar:
        name = wanted.get(member.name.removeprefix("./"))
        if name is None:
            continue
        if not member.isreg():
            raise UserError(f"archive {archive}: {member.name} is not a regular file; expected the official "
                            f"{ARCHIVE_NAME}")
        if member.size > MAX_MEMBER_BYTES:
            raise UserError(f"archive {archive}: {member.name} is {member.size} bytes, larger than any file of "
                            f"the official {ARCHIVE_NAME}")
        found[name] = member
    missing = [name for name in names if name not in found]
    if missing:
        raise UserError(f"archive {archive} has no {MEMBER_FOLDER}/{missing[0]}; expected the official "
                        f"{ARCHIVE_NAME} (CIFAR-10 python version)")
    return found


def extract_official(archive: Path, folder: Path, expected_md5: dict[str, str]) -> None:
    """Write the files ``expected_md5`` names from ``archive`` into ``folder`` (created), each
    checked against its md5 there; any problem is one :class:`UserError` line."""
    names = list(expected_md5)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _members(tar, names, archive)
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                source = tar.extractfile(members[name])
                digest = hashlib.md5()
                with open(folder / name, "wb") as out:
                    for chunk in iter(lambda: source.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != expected_md5[name]:
                    raise UserError(f"archive {archive}: {name} has md5 {digest.hexdigest()}, not the official "
                                    f"{expected_md5[name]}; download {ARCHIVE_NAME} again")
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as err:
        detail = (str(err).splitlines() or ["truncated"])[0].rstrip(":")  # (tarfile lists every method tried)
        raise UserError(f"archive {archive} cannot be read as {ARCHIVE_NAME} ({type(err).__name__}: {detail})") from None
