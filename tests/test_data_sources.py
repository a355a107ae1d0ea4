"""Where CIFAR-10 comes from when the data folder is empty: a downloaded official archive
(--archive, $NORMBENCH_CIFAR_ARCHIVE), the JPEG mirror (--mirror, $NORMBENCH_CIFAR_MIRROR),
and the one line naming them when there is none; training honours the variables too."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

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
