"""Gradient clipping modes against PyTorch, timm and hand-computed expectations."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from normbench.clip import CLIPPERS, AGCClipper, ClipStats, DynamicClipper, make_clipper
from normbench.config import CLIP_MODES, ClipConfig


class Tiny(nn.Module):
    """conv -> linear 'fc' with biases: covers ndim 4, 2 and 1 tensors and the fc exclusion."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.gain = nn.Parameter(torch.ones(5))
        self.scalar = nn.Parameter(torch.tensor(0.5))
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = self.conv(x) * self.gain.view(1, -1, 1, 1) * self.scalar
        return self.fc(h.mean((2, 3)))


def model_with_grads(seed: int = 0, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    m = Tiny()
    for p in m.parameters():
        p.grad = torch.randn_like(p) * scale
    return m


def grads(m: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in m.parameters()]


def test_every_config_mode_has_a_clipper():
    assert set(CLIPPERS) == set(CLIP_MODES)
    m = model_with_grads()
    for mode in CLIP_MODES:
        stats = make_clipper(ClipConfig(mode=mode), m)()
        assert isinstance(stats, ClipStats)
        for t in (stats.norm, stats.threshold, stats.clipped_frac):
            assert isinstance(t, torch.Tensor) and t.ndim == 0


def test_none_reports_norm_and_leaves_grads():
    m = model_with_grads()
    before = grads(m)
    stats = make_clipper(ClipConfig(mode="none"), m)()
    expected = torch.sqrt(sum((g.double() ** 2).sum() for g in before))
    assert stats.norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert math.isnan(stats.threshold.item()) and stats.clipped_frac.item() == 0
    for a, b in zip(before, grads(m)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_norm_matches_clip_grad_norm(max_norm):
    m, ref = model_with_grads(), model_with_grads()
    stats = make_clipper(ClipConfig(mode="norm", max_norm=max_norm), m)()
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    assert stats.norm.item() == pytest.approx(total.item(), rel=1e-6)
    assert stats.threshold.item() == pytest.approx(max_norm)
    assert stats.clipped_frac.item() == float(total.item() > max_norm)
    # PyTorch scales by c / (||g|| + 1e-6); normbench by c / ||g||: relative difference ~1e-6 / ||g||
    for a, b in zip(grads(m), grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if total > max_norm:
        clipped_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads(m)))
        assert clipped_norm.item() == pytest.approx(max_norm, rel=1e-6)


def test_value_matches_clip_grad_value_and_counts_elements():
    m, ref = model_with_grads(), model_with_grads()
    before = torch.cat([g.flatten() for g in grads(m)])
    stats = make_clipper(ClipConfig(mode="value", max_value=0.7), m)()
    torch.nn.utils.clip_grad_value_(ref.parameters(), 0.7)
    for a, b in zip(grads(m), grads(ref)):
        assert torch.equal(a, b)
    assert stats.clipped_frac.item() == pytest.approx((before.abs() > 0.7).float().mean().item())
    assert stats.norm.item() == pytest.approx(before.norm().item(), rel=1e-6)
    assert stats.threshold.item() == pytest.approx(0.7)


class OneParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def run_dynamic(clipper: DynamicClipper, model: OneParam, norms: list[float]):
    """Feed gradients of the given norms; return (thresholds, clipped flags, post-clip norms)."""
    out = []
    for n in norms:
        model.w.grad = torch.tensor([n * 0.6, n * 0.8])  # ||g|| = n
        stats = clipper()
        out.append((stats.threshold.item(), stats.clipped_frac.item(), model.w.grad.norm().item(), stats.norm.item()))
    return out


def test_dynamic_threshold_sequence_on_a_hand_made_history():
    cfg = ClipConfig(mode="dynamic", alpha=1.5, beta=0.1, window=3)
    model = OneParam()
    got = run_dynamic(make_clipper(cfg, model), model, [1.0, 2.0, 3.0, 10.0, 4.0, 1.0])
    # step 0: no history -> no clipping, NaN threshold; then the mean of the pre-clip norms seen
    # so far (window not yet full), then of the last 3
    expected_thr = [float("nan"), 1.5 * 1 + 0.1, 1.5 * 1.5 + 0.1, 1.5 * 2 + 0.1,
                    1.5 * (2 + 3 + 10) / 3 + 0.1, 1.5 * (3 + 10 + 4) / 3 + 0.1]
    norms = [1.0, 2.0, 3.0, 10.0, 4.0, 1.0]
    for (thr, clipped, post, pre), e, n in zip(got, expected_thr, norms):
        assert pre == pytest.approx(n, rel=1e-6)
        if math.isnan(e):
            assert math.isnan(thr) and clipped == 0 and post == pytest.approx(n, rel=1e-6)
        else:
            assert thr == pytest.approx(e, rel=1e-6)
            assert clipped == float(n > e)
            assert post == pytest.approx(min(n, e), rel=1e-6)


def test_dynamic_state_roundtrip_resumes_exactly():
    cfg = ClipConfig(mode="dynamic", alpha=1.2, beta=0.0, window=4)
    norms = [3.0, 1.0, 5.0, 2.0, 8.0, 1.5, 9.0, 0.5, 4.0]
    m_ref = OneParam()
    ref = run_dynamic(make_clipper(cfg, m_ref), m_ref, norms)
    m1 = OneParam()
    first = make_clipper(cfg, m1)
    part1 = run_dynamic(first, m1, norms[:5])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    m2 = OneParam()
    second = make_clipper(cfg, m2)
    second.load_state_dict(torch.load(buf))
    part2 = run_dynamic(second, m2, norms[5:])
    for a, b in zip(ref, part1 + part2):
        assert a == pytest.approx(b, nan_ok=True)
    with pytest.raises(ValueError):
        make_clipper(ClipConfig(mode="dynamic", window=5), OneParam()).load_state_dict(first.state_dict())


def test_dynamic_history_survives_a_non_finite_norm():
    cfg = ClipConfig(mode="dynamic", alpha=1.0, beta=0.0, window=2)
    model = OneParam()
    clipper = make_clipper(cfg, model)
    run_dynamic(clipper, model, [2.0, 4.0])
    model.w.grad = torch.tensor([float("inf"), 0.0])
    assert math.isinf(clipper().norm.item())
    assert torch.isfinite(clipper.history).all()
    assert clipper.threshold_now().item() == pytest.approx((4.0 + 3.0) / 2)  # inf recorded as the mean 3


def agc_reference(model: nn.Module, lam: float, eps: float) -> None:
    """Per-unit loop in float64 (docs/methods.md#clip-agc); skips model.fc."""
    skip = {id(p) for p in model.fc.parameters()}
    for p in model.parameters():
        if id(p) in skip:
            continue
        w, g = p.detach().double(), p.grad.double()
        if p.ndim <= 1:
            wn, gn = w.norm().reshape(1), g.norm().reshape(1)
            rows_w, rows_g = [w], [g]
        else:
            rows_w, rows_g = list(w), list(g)
            wn = torch.stack([r.norm() for r in rows_w])
            gn = torch.stack([r.norm() for r in rows_g])
        out = []
        for rg, a, b in zip(rows_g, wn, gn):
            bound = lam * max(a.item(), eps)
            out.append(rg * (bound / b) if b / max(a.item(), eps) > lam else rg)
        p.grad.copy_(torch.stack(out).reshape(p.shape) if p.ndim > 1 else out[0])


@pytest.mark.parametrize("scale", [1e-3, 0.05, 10.0])
def test_agc_matches_timm_and_the_formula(scale):
    from timm.utils.agc import adaptive_clip_grad

    lam = 0.02
    m, ref, ref64 = model_with_grads(scale=scale), model_with_grads(scale=scale), model_with_grads(scale=scale)
    fc_before = [p.grad.clone() for p in m.fc.parameters()]
    stats = make_clipper(ClipConfig(mode="agc", agc_lambda=lam, agc_eps=1e-3), m)()
    # timm: max_norm = clip_factor * max(||W_i||, eps) (the same eps convention, 1e-3), unit-wise
    # norms over all dims but the first (ndim <= 1: the whole tensor), g * max_norm / max(||G_i||,
    # 1e-6) where ||G_i|| >= max_norm; the 1e-6 never binds, since max_norm >= lam * 1e-3 > 1e-6.
    # timm has no notion of the classifier, so we pass it everything but fc.
    adaptive_clip_grad([p for n, p in ref.named_parameters() if not n.startswith("fc.")], clip_factor=lam, eps=1e-3)
    agc_reference(ref64, lam, 1e-3)
    for a, b, c in zip(grads(m), grads(ref), grads(ref64)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-8)
    for p, before in zip(m.fc.parameters(), fc_before):
        assert torch.equal(p.grad, before)
    # fraction of units clipped: conv weight has 5 units; bias, gain, scalar 1 each
    m2 = model_with_grads(scale=scale)
    units = clipped = 0
    for name, p in m2.named_parameters():
        if name.startswith("fc."):
            continue
        w = p.detach().reshape(p.shape[0], -1) if p.ndim > 1 else p.detach().reshape(1, -1)
        g = p.grad.reshape(w.shape)
        ratio = g.norm(dim=1) / w.norm(dim=1).clamp(min=1e-3)
        units += len(ratio)
        clipped += int((ratio > lam).sum())
    assert stats.clipped_frac.item() == pytest.approx(clipped / units)
    assert stats.threshold.item() == pytest.approx(lam)


def test_agc_on_nf_resnet_excludes_classifier_and_handles_gains():
    from timm.utils.agc import adaptive_clip_grad

    from normbench.config import load_config
    from normbench.models import build_model

    cfg = load_config(None, ["norm.kind=nf", "model.width=0.25"])
    torch.manual_seed(0)
    model, ref = build_model(cfg), build_model(cfg)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    for mod in (model, ref):
        for b in mod.blocks:  # non-zero residual gains, so every conv gets a gradient
            b.skip_gain.data.fill_(1.0)
        nn.functional.cross_entropy(mod(x), y).backward()
    clipper = make_clipper(cfg.clip.model_copy(update={"mode": "agc", "agc_lambda": 0.01}), model)
    assert isinstance(clipper, AGCClipper)
    assert all(p is not model.fc.weight and p is not model.fc.bias for p in clipper.clip_params)
    stats = clipper()
    adaptive_clip_grad([p for n, p in ref.named_parameters() if not n.startswith("fc.")], clip_factor=0.01)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9, msg=n)
    assert 0 < stats.clipped_frac.item() <= 1
