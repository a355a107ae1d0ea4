"""Data: layout reading, checksums, balanced subsets, batched augmentation, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normbench import data as D
from normbench.errors import UserError


def naive_crop_flip(img, oy, ox, flip):
    padded = F.pad(img, (4, 4, 4, 4))
    out = padded[:, oy:oy + 32, ox:ox + 32]
    return out.flip(-1) if flip else out


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    oy, ox = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.randint(0, 2, (16,), generator=g).bool()
    out = D.crop_flip(x, oy, ox, flip)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for i in range(16):
        assert torch.equal(out[i], naive_crop_flip(x[i], int(oy[i]), int(ox[i]), bool(flip[i])))


def test_crop_bounds_identity_and_padding():
    x = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    centre = D.crop_flip(x, torch.tensor([4, 0]), torch.tensor([4, 8]), torch.tensor([False, False]))
    assert torch.equal(centre[0], x[0])  # offset (4, 4) is the original image
    assert (centre[1, :, :4, :] == 0).all() and (centre[1, :, :, -4:] == 0).all()  # padding shows
    assert (centre[1, :, 4:, :-4] == 200).all()


def test_epoch_plan_depends_only_on_seed_and_epoch(synth_root):
    folder, source = D.ensure_cifar10(synth_root, allow_download=False)
    assert source == "synthetic"
    x, y = D.load_split(folder, train=True)
    data = D.Cifar10(x, y, x[:10], y[:10], source)
    a = D.EpochPlan(len(y), 8, seed=3, epoch=1, augment=True, device=torch.device("cpu"))
    b = D.EpochPlan(len(y), 8, seed=3, epoch=1, augment=True, device=torch.device("cpu"))
    c = D.EpochPlan(len(y), 8, seed=3, epoch=2, augment=True, device=torch.device("cpu"))
    assert a.steps == len(y) // 8
    for step in (0, 5, a.steps - 1):
        assert torch.equal(a.batch(data, step)[0], b.batch(data, step)[0])
    assert not torch.equal(a.order, c.order)
    seen = torch.cat([a.batch(data, s)[1] for s in range(a.steps)])
    assert len(seen) == a.steps * 8


def test_balanced_subset():
    labels = torch.arange(1000) % 10
    idx = D.balanced_subset(labels, 105)
    counts = torch.bincount(labels[idx], minlength=10)
    assert len(idx) == 105 and counts.max() - counts.min() <= 1 and len(set(idx.tolist())) == 105


def test_normalizer_standardizes():
    norm = D.Normalizer(torch.device("cpu"), channels_last=True)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = norm(x)
    expected = (1.0 - torch.tensor(D.MEAN)) / torch.tensor(D.STD)
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_corrupt_and_missing_files_are_named(tmp_path):
    D.synthetic_cifar(tmp_path, n_train=50, n_test=20)
    folder = tmp_path / D.FOLDER
    blob = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob[:-10])
    with pytest.raises(UserError, match="data_batch_2 is corrupt"):
        D.ensure_cifar10(tmp_path, allow_download=False)
    (folder / "data_batch_2").unlink()
    # missing file -> rebuilt? No: a partial folder is re-made from the mirror only when files are
    # missing; here verify names the missing file when called directly.
    with pytest.raises(UserError, match="data_batch_2 is missing"):
        D.verify(folder)


def test_uncreatable_data_root_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot be created"):
        D.ensure_cifar10(blocker / "data", allow_download=False)


@pytest.mark.slow
def test_bundled_mirror_decodes_to_full_cifar10(tmp_path):
    """The offline mirror: 50,000 + 10,000 images, 10 balanced classes, official layout."""
    folder = D.decode_mirror(tmp_path)
    assert D.verify(folder) == "mirror"
    x, y = D.load_split(folder, train=True)
    tx, ty = D.load_split(folder, train=False)
    assert x.shape == (50000, 3, 32, 32) and tx.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [5000] * 10
    assert torch.bincount(ty).tolist() == [1000] * 10
    assert 100 < float(x[:1000].float().mean()) < 140  # real images, not blank
