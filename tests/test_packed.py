"""Packed runs: K seeds trained as one grouped network equal the same cells trained alone."""
from __future__ import annotations

import pytest
import torch

from conftest import SignalAtStep
from normbench.training import entry
from normbench.models import build_model
from normbench.training.packed import train_packed
from normbench.training.packing import pack_key, pack_models, unpack_state, why_not_packable
from normbench.tracking import RunDir


@pytest.mark.parametrize("kind", ["bn", "ghost_bn", "gn", "ln", "in", "frn", "none"])
def test_packed_forward_equals_members(tiny_cfg, kind):
    extra = {"norm.kind": kind, "norm.groups": 2} if kind == "gn" else {"norm.kind": kind}
    if kind == "ghost_bn":
        extra["norm.ghost_batch_size"] = 2  # 3 chunks of the batch of 6 (so not plain BN)
    models = [build_model(tiny_cfg(seed=s, **extra)) for s in range(3)]
    packed = pack_models(models)
    xs = [torch.randn(6, 3, 32, 32) for _ in models]
    out = packed(torch.cat(xs, 1))
    assert out.shape == (6, 3, 10)
    for k, (m, x) in enumerate(zip(models, xs)):
        torch.testing.assert_close(out[:, k], m(x), rtol=1e-4, atol=1e-5)
    solo = models[1].state_dict()
    back = unpack_state(packed.state_dict(), solo, 1, 3)
    for name in solo:
        torch.testing.assert_close(back[name], solo[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_packed_gradients_are_each_members_own_in_float64(tiny_cfg, kind):
    """Exactness of packing, free of float32 rounding: one forward/backward in float64."""
    extra = {"norm.kind": kind, "norm.groups": 2} if kind == "gn" else {"norm.kind": kind}
    models = [build_model(tiny_cfg(seed=s, **extra)).double() for s in range(3)]
    packed = pack_models(models)
    xs = [torch.randn(5, 3, 32, 32, dtype=torch.float64) for _ in models]
    ys = [torch.randint(0, 10, (5,)) for _ in models]
    out = packed(torch.cat(xs, 1))
    torch.nn.functional.cross_entropy(out.transpose(1, 2), torch.stack(ys, 1), reduction="none").mean(0).sum().backward()
    grads = {n: p.grad for n, p in packed.named_parameters()}
    for k, (m, x, y) in enumerate(zip(models, xs, ys)):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(grads[n].chunk(3, 0)[k].reshape(p.shape), p.grad, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.slow
def test_three_seeds_packed_equal_three_alone(tiny_cfg, tmp_path):
    """End to end in float32, against the rounding floor of training alone.

    Rounding differs between grouped and plain convolution kernels, and a small-batch BN
    network amplifies it step by step; float64 exactness is shown above. The floor is
    measured: the same cell alone on 2 threads instead of 1 (other float32 reduction orders,
    nothing else changed). Measured on the 2-core CPU: up to 4.7e-3 on a weight after the
    20 steps, and 3 of the 100 test images flip (0.12 -> 0.15), as many as packing moves; a
    packing bug (a member's batch, gradient or momentum mixed with another's) moves
    weights by far more."""
    common = {"train.epochs": 2, "clip.mode": "norm", "clip.max_norm": 0.5}
    alone = [tiny_cfg(seed=s, **{"log.out_dir": str(tmp_path / "alone")}, **common) for s in range(3)]
    floor = [tiny_cfg(seed=s, threads=2, **{"log.out_dir": str(tmp_path / "floor")}, **common) for s in range(3)]
    # the packed side also checkpoints at every log flush inside the epochs (unpacking into the
    # members there must not disturb training)
    packed = [tiny_cfg(seed=s, **{"log.out_dir": str(tmp_path / "packed"), "log.checkpoint_every_s": 1e-6}, **common)
              for s in range(3)]
    assert len({pack_key(c) for c in packed}) == 1 and why_not_packable(packed[0]) is None
    solo_summaries = [entry.train(c) for c in alone]
    floor_summaries = [entry.train(c) for c in floor]
    packed_summaries = train_packed(packed)
    for a, f, p, ca, cf, cp in zip(solo_summaries, floor_summaries, packed_summaries, alone, floor, packed):
        assert p["status"] == "completed" and p["packed_members"] == 3 and p["steps"] == a["steps"]
        # Near-chance accuracy on 100 images moves by whole images: rounding alone moved 3 of
        # them (threads 1 -> 2, seed 2, measured); 5 are allowed, the weights and losses below
        # are held to the measured floor.
        acc_floor = abs(f["final_test_acc"] - a["final_test_acc"])
        assert p["final_test_acc"] == pytest.approx(a["final_test_acc"], abs=max(0.05, 2 * acc_floor))
        wa, wf, wp = (RunDir(c.run_dir()).load_checkpoint()["model"] for c in (ca, cf, cp))
        for name in wa:
            if not wa[name].is_floating_point():
                assert torch.equal(wp[name], wa[name]), name
                continue
            diff = (wp[name] - wa[name]).abs().max().item()
            rounding = (wf[name] - wa[name]).abs().max().item()
            assert diff <= max(2e-3 + 1e-2 * wa[name].abs().max().item(), 4 * rounding), (name, diff, rounding)
        ma, mf, mp = (RunDir(c.run_dir()).read_metrics() for c in (ca, cf, cp))
        assert [r["step"] for r in ma] == [r["step"] for r in mp] == [r["step"] for r in mf]
        for ra, rf, rp in zip(ma, mf, mp):
            for tag in ("train/loss", "grad/norm", "test/loss"):
                if tag in ra:
                    rounding = abs(rf[tag] - ra[tag])
                    assert abs(rp[tag] - ra[tag]) <= max(1e-2 * abs(ra[tag]) + 1e-3, 4 * rounding), tag
    again = train_packed(packed)
    assert all(s.get("skipped") for s in again)


def test_unpackable_cells_are_named(tiny_cfg):
    assert "clip mode 'agc'" in why_not_packable(tiny_cfg(**{"clip.mode": "agc"}))
    assert pack_key(tiny_cfg(seed=0)) != pack_key(tiny_cfg(seed=0, **{"train.batch_size": 10}))


def whole_and_cut_packs(tiny_cfg, tmp_path, at_step: int = 4):
    """Two packs of seeds 0 and 1 (2 epochs): one trained through, one sent SIGTERM at
    ``at_step``; (the whole pack's configs, the cut pack's, the cut pack's summaries)."""
    import signal

    common = {"train.epochs": 2, "train.log_every": 2}
    whole = [tiny_cfg(seed=s, **{"log.out_dir": str(tmp_path / "whole")}, **common) for s in range(2)]
    cut = [tiny_cfg(seed=s, **{"log.out_dir": str(tmp_path / "cut")}, **common) for s in range(2)]
    train_packed(whole)
    return whole, cut, train_packed(cut, progress=SignalAtStep(at_step, signal.SIGTERM))


@pytest.mark.slow
def test_sigterm_checkpoints_packed_members_and_resume_equals_uninterrupted(tiny_cfg, tmp_path):
    """SIGTERM during packed training: every member checkpoints and is marked interrupted;
    training the pack again resumes and ends bit-identical to a pack never interrupted."""
    whole, cut, first = whole_and_cut_packs(tiny_cfg, tmp_path)
    assert [s["status"] for s in first] == ["interrupted", "interrupted"]
    assert all(s["steps"] == 4 for s in first)
    assert all(RunDir(c.run_dir()).load_checkpoint() is not None for c in cut)
    again = train_packed(cut)
    assert [s["status"] for s in again] == ["completed", "completed"]
    for a, b in zip(whole, cut):
        sa = RunDir(a.run_dir()).load_checkpoint()["model"]
        sb = RunDir(b.run_dir()).load_checkpoint()["model"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), a.run_name
        untimed = [[{k: v for k, v in r.items() if not k.startswith("perf/")} for r in RunDir(c.run_dir()).read_metrics()]
                   for c in (a, b)]
        assert untimed[0] == untimed[1], a.run_name
