"""Where CIFAR-10 comes from when the data folder is empty: a downloaded official archive
(--archive, $NORMBENCH_CIFAR_ARCHIVE), the JPEG mirror (--mirror, $NORMBENCH_CIFAR_MIRROR),
and the one line naming them when there is none; training honours the variables too."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from normbench.cli import app
from normbench.data import files
from normbench.data import ALL_FILES, FOLDER, md5_of, synthetic_cifar
from normbench.errors import UserError

from test_files_and_data import tiny_mirror

runner = CliRunner()
ENV_FREE = {files.MIRROR_ENV: None, files.ARCHIVE_ENV: None}  # the tests' own environment never leaks in


@pytest.fixture
def no_checkout_mirror(monkeypatch, tmp_path):
    """As in an installed wheel: no data/cifar10-jpeg.npz beside the package."""
    monkeypatch.setattr(files, "MIRROR", tmp_path / "no-such-mirror.npz")
    for name in ENV_FREE:
        monkeypatch.delenv(name, raising=False)


def prepare(*args, env=None):
    result = runner.invoke(app, ["data", "prepare", *map(str, args)], env={**ENV_FREE, **(env or {})})
    return result.exit_code, result.output.strip()


def official_archive(where: Path, members: dict[str, bytes] | None = None) -> tuple[Path, dict[str, str]]:
    """A cifar-10-python.tar.gz of synthetic files; returns it and the md5s of its files."""
    folder = synthetic_cifar(where / "made", n_train=30, n_test=10)
    sums = {name: md5_of(folder / name) for name in ALL_FILES}
    path = where / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ALL_FILES:
            tar.add(folder / name, arcname=f"cifar-10-batches-py/{name}")
        for name, blob in (members or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, sums


def test_mirror_flag_decodes_the_given_mirror(tmp_path, no_checkout_mirror):
    mirror = tiny_mirror(tmp_path / "m")
    code, out = prepare("--mirror", mirror, "--root", tmp_path / "data", "--no-download")
    assert code == 0 and out.endswith(f"CIFAR-10 ready in {tmp_path / 'data' / FOLDER} (source: mirror)"), out
    assert f"decoding the mirror {mirror}" in out


def _jpeg_of_size(side: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buf, format="JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _replace_image(arrays: dict, split: str, index: int, blob: np.ndarray) -> None:
    """Put ``blob`` in place of image ``index`` of ``split``, the offsets after it shifted."""
    jpeg, offsets = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"]
    start, end = offsets[index], offsets[index + 1]
    arrays[f"{split}_jpeg"] = np.concatenate([jpeg[:start], blob, jpeg[end:]])
    arrays[f"{split}_offsets"] = np.concatenate([offsets[:index + 1], offsets[index + 1:] - (end - start) + len(blob)])


def _garbage_image(arrays):
    start, end = arrays["test_offsets"][5:7]
    arrays["test_jpeg"][start:end] = 7  # the same length, no JPEG


def _falling_offsets(arrays):
    arrays["train_offsets"][[3, 4]] = arrays["train_offsets"][[4, 3]]


CORRUPT_MIRRORS = {  # what is wrong -> (how to make it, the message's tail after the mirror's path)
    "label 10": (lambda a: a["train_labels"].__setitem__(3, 10),
                 " is not a valid CIFAR-10 JPEG mirror: train_labels[3] is 10, not a class 0..9"),
    "negative label": (lambda a: a["test_labels"].__setitem__(0, -1),
                       " is not a valid CIFAR-10 JPEG mirror: test_labels[0] is -1, not a class 0..9"),
    "offsets one short": (lambda a: a.__setitem__("test_offsets", a["test_offsets"][:-1]),
                          " is not a valid CIFAR-10 JPEG mirror: test_offsets has 20 entries, not 21 "
                          "(one more than test_labels)"),
    "offsets falling": (_falling_offsets, " is not a valid CIFAR-10 JPEG mirror: train_offsets do not rise from 0 to"),
    "nine class names": (lambda a: a.__setitem__("label_names", a["label_names"][:9]),
                         " is not a valid CIFAR-10 JPEG mirror: label_names has shape (9,), not (10,)"),
    "no JPEG": (_garbage_image, ": test image 5 is not a JPEG (its bytes are no image Pillow knows)"),
    "truncated JPEG": (lambda a: _replace_image(a, "test", 4, _jpeg_of_size(32)[:300]),
                       ": test image 4 cannot be decoded as a JPEG: "),  # then Pillow's words
    "64 x 64 JPEG": (lambda a: _replace_image(a, "train", 2, _jpeg_of_size(64)),
                     ": train image 2 is 64 x 64 pixels, not 32 x 32"),
}


def corrupt_mirror(where: Path, what: str) -> Path:
    """tiny_mirror with one thing wrong (a key of CORRUPT_MIRRORS)."""
    path = tiny_mirror(where)
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    CORRUPT_MIRRORS[what][0](arrays)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("what", list(CORRUPT_MIRRORS))
def test_a_corrupt_mirror_is_one_line_naming_the_file_and_what_is_wrong(tmp_path, what):
    mirror = corrupt_mirror(tmp_path / "m", what)
    root = tmp_path / "data"
    with pytest.raises(UserError) as caught:
        files.decode_mirror(root, mirror)
    message = str(caught.value)
    assert message.startswith(f"mirror {mirror}{CORRUPT_MIRRORS[what][1]}") and "\n" not in message, message
    assert "None" not in message and not (root / FOLDER).exists()
    assert [p.name for p in root.iterdir()] == []  # no staging folder left


@pytest.mark.parametrize("what", ["label 10", "no JPEG"])
def test_prepare_from_a_corrupt_mirror_exits_2_in_one_line(tmp_path, no_checkout_mirror, what):
    mirror = corrupt_mirror(tmp_path / "m", what)
    code, out = prepare("--mirror", mirror, "--root", tmp_path / "data", "--no-download")
    errors = [line for line in out.splitlines() if "decoding the mirror" not in line]
    assert code == 2 and len(errors) == 1, out
    assert errors[0].startswith(f"normbench: error: mirror {mirror}{CORRUPT_MIRRORS[what][1]}"), out
    assert "Traceback" not in out


def test_mirror_variable_is_the_default_of_the_flag(tmp_path, no_checkout_mirror):
    mirror = tiny_mirror(tmp_path / "m")
    code, out = prepare("--root", tmp_path / "data", "--no-download", env={files.MIRROR_ENV: str(mirror)})
    assert code == 0 and "(source: mirror)" in out, out
    code, out = prepare("--root", tmp_path / "d2", "--no-download", env={files.MIRROR_ENV: str(tmp_path / "gone")})
    assert code == 2 and out == f"normbench: error: {files.MIRROR_ENV}={tmp_path / 'gone'}: no such file", out


def test_no_source_names_the_flags_and_variables_not_a_package_path(tmp_path, no_checkout_mirror):
    code, out = prepare("--root", tmp_path / "data", "--no-download")
    assert code == 2 and len(out.splitlines()) == 1, out
    for needle in (f"no CIFAR-10 in {tmp_path / 'data'}: downloads are off", "--archive cifar-10-python.tar.gz",
                   "--mirror cifar10-jpeg.npz", files.ARCHIVE_ENV, files.MIRROR_ENV):
        assert needle in out, (needle, out)
    assert str(files.MIRROR) not in out and "site-packages" not in out


def test_a_missing_mirror_or_archive_file_is_a_usage_error(tmp_path):
    for flag in ("--mirror", "--archive"):
        code, out = prepare(flag, tmp_path / "nope.npz", "--root", tmp_path / "data")
        assert code == 2 and len(out.splitlines()) == 1 and f"Invalid value for '{flag}'" in out, out


def test_archive_is_unpacked_and_checked_against_the_official_md5s(tmp_path, monkeypatch, no_checkout_mirror):
    archive, sums = official_archive(tmp_path, {"../escaped": b"x", "cifar-10-batches-py/readme.html": b"<p>"})
    root = tmp_path / "data"
    code, out = prepare("--archive", archive, "--root", root, "--no-download")
    assert code == 2 and len(out.splitlines()) == 1, out  # synthetic files are not the official release
    assert "has md5" in out and "not the official" in out and "download cifar-10-python.tar.gz again" in out, out
    assert list(root.iterdir()) == []  # nothing left behind, no staging folder either
    monkeypatch.setattr(files, "official_md5s", lambda: dict(sums))
    code, out = prepare("--archive", archive, "--root", root)
    assert code == 0 and out.endswith("(source: official)"), out
    assert sorted(p.name for p in root.iterdir()) == [FOLDER]
    assert sorted(p.name for p in (root / FOLDER).iterdir()) == sorted(ALL_FILES)  # readme.html not taken
    assert not (tmp_path / "escaped").exists() and not (root / "escaped").exists()


@pytest.mark.parametrize("case", ["link", "missing", "not-a-tar", "truncated"])
def test_a_bad_archive_is_refused_in_one_line(tmp_path, monkeypatch, case):
    archive, sums = official_archive(tmp_path)
    monkeypatch.setattr(files, "official_md5s", lambda: dict(sums))
    if case == "link":
        archive = tmp_path / "link.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        needle = "data_batch_1 is not a regular file"
    elif case == "missing":
        archive = tmp_path / "short.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tmp_path / "made" / FOLDER / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
        needle = "has no cifar-10-batches-py/data_batch_2"
    elif case == "not-a-tar":
        archive.write_bytes(b"not an archive at all")
        needle = "cannot be read as cifar-10-python.tar.gz"
    else:
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
        needle = "cannot be read as cifar-10-python.tar.gz"
    root = tmp_path / "data"
    code, out = prepare("--archive", archive, "--root", root)
    assert code == 2 and len(out.splitlines()) == 1 and needle in out, out
    assert not (root / FOLDER).exists() and not any(root.glob(".*.part"))


def test_ensure_refuses_an_archive_variable_that_names_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv(files.ARCHIVE_ENV, str(tmp_path / "gone.tar.gz"))
    with pytest.raises(UserError, match=f"{files.ARCHIVE_ENV}=.*gone.tar.gz: no such file"):
        files.ensure_cifar10(tmp_path / "data", allow_download=False)


@pytest.mark.parametrize("source", ["mirror", "official"])
def test_training_honours_the_variables(tmp_path, monkeypatch, no_checkout_mirror, tiny_cfg, source):
    from normbench.training import entry

    if source == "mirror":
        monkeypatch.setenv(files.MIRROR_ENV, str(tiny_mirror(tmp_path / "m")))
    else:
        archive, sums = official_archive(tmp_path)
        monkeypatch.setattr(files, "official_md5s", lambda: dict(sums))
        monkeypatch.setenv(files.ARCHIVE_ENV, str(archive))
        monkeypatch.setenv(files.MIRROR_ENV, str(tmp_path / "unused.npz"))  # the archive comes first
    cfg = tiny_cfg(**{"data.root": str(tmp_path / "data"), "train.epochs": 1})
    summary = entry.train(cfg)
    assert summary["status"] == "completed" and summary["data_source"] == source


@pytest.mark.slow
def test_the_bundled_mirror_decodes_to_the_files_its_prepare_script_writes(tmp_path):
    """Byte for byte the files data/prepare.py writes (data/MD5SUMS): a run's data fingerprint does
    not depend on which of the two decoded the mirror."""
    from conftest import REPO

    folder = files.decode_mirror(tmp_path, REPO / "data" / "cifar10-jpeg.npz")
    want = dict(line.split()[::-1] for line in (REPO / "data" / "MD5SUMS").read_text().splitlines())
    assert set(want) == set(ALL_FILES)
    assert {name: md5_of(folder / name) for name in ALL_FILES} == want
