"""The normalization zoo, each layer proven against a reference.

References: PyTorch's own layers; float64 formulas written here from docs/methods.md;
torch.autograd.gradcheck for every hand-written backward; timm's FRN, EvoNorm-S0 and
ScaledStdConv2d. Plus the edge cases (errors that name the layer, 1x1 maps, all-zero input)
and a 50-step training run of every scheme with a clipping mode.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from normbench.config import NormConfig, load_config
from normbench.errors import UserError
from normbench.models import ARCH_OVERRIDES, build_model
from normbench.norms import available_norms, eps_of, get_scheme
from normbench.norms.batch_norm import BatchNorm2d
from normbench.norms.batch_renorm import BatchRenorm2d
from normbench.norms.evonorm import EvoNormS0
from normbench.norms.filter_response import TLU, FilterResponseNorm2d
from normbench.norms.ghost_batch_norm import GhostBatchNorm2d, ghost_chunk_sizes
from normbench.norms.group_norm import GroupNorm, InstanceNorm2d, LayerNorm2d
from normbench.norms.speed import (ChunkedBatchNormFn, Chunks, EvoNormS0Fn, FRNFn, GroupNormFn, TLUFn, functional,
                                   native)
from normbench.norms.speed import load as load_kernels
from normbench.norms.weight_standardization import (NF_RELU_GAIN, ScaledReLU, ScaledWSConv2d, WSConv2d,
                                                    scaled_standardize_weight, standardize_weight)

REPO = Path(__file__).resolve().parent.parent
ALL = ["bn", "ghost_bn", "brn", "gn", "ln", "in", "ws_gn", "frn", "evonorm_s0", "none", "nf"]
D64 = torch.float64


@pytest.fixture(params=["native", "fast", "generic"])
def kernels(request):
    """Run a test with the fused C++ kernels (normbench.norms.speed.native), with the CPU fast path
    of normbench.norms.speed.functional, and with the generic ops."""
    old = functional.FAST_KERNELS, native.ENABLED
    functional.FAST_KERNELS = request.param != "generic"
    native.ENABLED = request.param == "native"
    if request.param == "native":
        load_kernels()  # the explicit build step (the "native" cases would test the PyTorch path without it)
    yield request.param
    functional.FAST_KERNELS, native.ENABLED = old


def rand(*shape, seed=0, dtype=torch.float32, cl=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 1.5 + 0.3
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def affine_params(c, dtype=D64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_(), \
        (torch.randn(c, generator=g, dtype=dtype) * 0.3).requires_grad_()


def per_c(t):
    return t.view(1, -1, 1, 1)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 16, 4, 4), (1, 3, 2, 2)])
def test_functional_channels_last_rows_path_matches_formulas(shape):
    """The channels_last (B, H*W, C) paths of moments / mean_sq / affine_bc / affine_bc_backward
    against direct float64 formulas (and they really are taken)."""
    x = rand(*shape, dtype=D64, cl=True)
    g = rand(*shape, seed=3, dtype=D64, cl=True)
    assert functional.nhwc_rows(x) is not None and functional.nhwc_rows(x.contiguous()) is None
    b, c = shape[:2]
    a, bias, var = rand(b, c, seed=4, dtype=D64), rand(b, c, seed=5, dtype=D64), rand(b, c, seed=6, dtype=D64).abs()
    mean, rstd = functional.moments(x, None, 1e-5)
    torch.testing.assert_close(mean, x.mean((2, 3)))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var((2, 3), correction=0) + 1e-5))
    torch.testing.assert_close(functional.mean_sq(x), (x * x).mean((2, 3)))
    a4, b4, s4 = a.view(b, c, 1, 1), bias.view(b, c, 1, 1), torch.rsqrt(var + 1e-3).view(b, c, 1, 1)
    y = functional.affine_bc(x, a, bias, var, 1e-3)
    torch.testing.assert_close(y, x * a4 * s4 + b4)
    assert y.is_contiguous(memory_format=torch.channels_last) and y._base is None
    torch.testing.assert_close(functional.affine_bc(x, a), x * a4)
    gi, dot, gsum = functional.affine_bc_backward(g, x, a, var, 1e-3)
    torch.testing.assert_close(gi, g * a4 * s4)
    torch.testing.assert_close(dot, (g * x * s4).sum((2, 3)))
    torch.testing.assert_close(gsum, g.sum((2, 3)))
    gi, dot, _ = functional.affine_bc_backward(g, x, a, need_dot=False)
    torch.testing.assert_close(gi, g * a4)
    assert dot is None and gi._base is None


# ----------------------------------------------------------------------------- registry


def test_native_kernels_build_on_this_machine():
    """The fused kernels compile wherever a C++ compiler is (every machine kind of this project
    has g++); without this, the "native" cases below would silently test the PyTorch path."""
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler on PATH")
    assert load_kernels() and native.library() is not None


@pytest.mark.parametrize("dtype", [torch.float32, D64], ids=["f32", "f64"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_native_primitives_against_formulas(dtype, cl):
    """Each fused kernel against its float64 formula, in both layouts (float32 to float32 accuracy)."""
    if native.library() is None:
        pytest.skip("fused kernels unavailable")
    x = rand(3, 16, 5, 4, dtype=dtype, cl=cl)
    g = rand(3, 16, 5, 4, seed=3, dtype=dtype, cl=cl)
    gen = torch.Generator().manual_seed(4)
    a, k, k1 = (torch.randn(3, 16, generator=gen, dtype=dtype) for _ in range(3))
    tau, v, beta = (torch.randn(16, generator=gen, dtype=dtype) for _ in range(3))
    X, G, A, K, K1, T, V, Bt = (t.double() for t in (x, g, a, k, k1, tau, v, beta))
    bc = lambda t: t[:, :, None, None]  # noqa: E731
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)

    def close(actual, expected):
        torch.testing.assert_close(actual.double(), expected, **tol)

    mean, var = native.moments(x)
    close(mean, X.mean((2, 3))), close(var, X.var((2, 3), unbiased=False))
    y = native.affine(x, a, k, tau)
    Y = torch.maximum(bc(A) * X + bc(K), per_c(T))
    close(y, Y)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    close(native.affine(x, a, k), bc(A) * X + bc(K))
    Gm = torch.where(Y > per_c(T), G, 0.0)  # g' (the gradient the TLU passes)
    sg, sgx, sg_all = native.grad_sums(g, x, y, tau, raw=True)
    close(sg, Gm.sum((2, 3))), close(sgx, (Gm * X).sum((2, 3))), close(sg_all, G.sum((2, 3)))
    close(native.grad_out(g, x, a, k1, k, y, tau), bc(A) * Gm + bc(K1) * X + bc(K))
    close(native.grad_out(g, x, a, k1, k), bc(A) * G + bc(K1) * X + bc(K))
    S = torch.sigmoid(per_c(V) * X)
    z, sig = native.evo_forward(x, v, a, beta)
    close(z, X * S * bc(A) + per_c(Bt)), close(sig, S)
    for got, want in zip(native.evo_grad_sums(g, x, sig), (G * X * S, G, G * X * X * S * (1 - S))):
        close(got, want.sum((2, 3)))
    close(native.evo_grad_out(g, x, sig, v, a, k1, k),
          G * bc(A) * (S + per_c(V) * X * S * (1 - S)) + bc(K1) * X + bc(K))


def test_native_sigmoid_is_accurate_over_the_float_range():
    """The kernels' own float32 exp (for EvoNorm-S0's sigmoid) against torch.sigmoid in float64,
    from saturation to saturation, and finite at the extremes."""
    if native.library() is None:
        pytest.skip("fused kernels unavailable")
    x = torch.linspace(-120, 120, 48001).view(1, 1, 1, -1).contiguous()
    ones = torch.ones(1, 1)
    z, _ = native.evo_forward(x, torch.ones(1), ones, torch.zeros(1))  # x sigmoid(x)
    ref = x.double() * torch.sigmoid(x.double())
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.double(), ref, rtol=2e-6, atol=1e-30)


def test_registry_lists_every_scheme_with_flags():
    assert set(ALL) <= set(available_norms())
    for name in ALL:
        s = get_scheme(name)
        assert s.batch_dependent == (name in ("bn", "ghost_bn", "brn")), name
        assert s.paper and s.normalizes
    assert get_scheme("frn").default_eps == 1e-6 and eps_of(NormConfig(kind="frn")) == 1e-6
    assert eps_of(NormConfig(kind="frn", eps=1e-3)) == 1e-3
    assert NormConfig(kind="nf").kind == "nf" and "nf" in ARCH_OVERRIDES


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "methods").glob("*.yaml")), ids=lambda p: p.stem)
def test_method_configs_load_and_build(path):
    cfg = load_config(path, ["model.width=0.5"])
    model = build_model(cfg)
    model.train()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
    assert {p.stem for p in (REPO / "configs" / "methods").glob("*.yaml")} >= set(ALL)


# ----------------------------------------------------------------------------- batch family


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_bn_matches_pytorch(kernels, cl, relu):
    """normbench's BatchNorm2d (the fused kernels in training where they apply, ReLU and running
    update included) against nn.BatchNorm2d (+ F.relu): outputs, gradients, running statistics
    and the step counter over three steps, then eval mode."""
    ours, ref = BatchNorm2d(4, relu=relu), nn.BatchNorm2d(4)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 4)), m.bias.copy_(torch.linspace(-1, 1, 4))
    for step in range(3):
        x = rand(6, 4, 5, 5, seed=step, cl=cl).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = rand(6, 4, 5, 5, seed=10 + step, cl=cl)
        y, y2 = ours(x), ref(x2)
        if relu:
            y2 = F.relu(y2)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        y.backward(g), y2.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for a, b in [(ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad),
                 (ours.running_mean, ref.running_mean), (ours.running_var, ref.running_var)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), F.relu(ref(x)) if relu else ref(x))


def test_bn_family_rejects_one_value_per_channel():
    x = torch.randn(1, 4, 1, 1)
    for layer in (BatchNorm2d(4, layer="stage3.block2.norm1"),
                  GhostBatchNorm2d(4, ghost_batch_size=2, layer="stage3.block2.norm1"),
                  BatchRenorm2d(4, layer="stage3.block2.norm1")):
        with pytest.raises(UserError, match="stage3.block2.norm1"):
            layer(x)
        layer.eval()
        assert torch.isfinite(layer(x)).all()  # eval uses running statistics: fine
    GhostBatchNorm2d(4, ghost_batch_size=1)(torch.randn(3, 4, 2, 2))  # 1-sample chunks of 2x2 maps are defined
    with pytest.raises(UserError, match="one value per channel"):
        GhostBatchNorm2d(4, ghost_batch_size=1, layer="L")(torch.randn(3, 4, 1, 1))


def test_ghost_chunk_sizes_and_fold():
    assert ghost_chunk_sizes(8, 16) == [8]
    assert ghost_chunk_sizes(16, 16) == [16]
    assert ghost_chunk_sizes(32, 16) == [16, 16]
    assert ghost_chunk_sizes(10, 4) == [4, 4, 2]
    assert ghost_chunk_sizes(9, 4) == [4, 5]  # a remainder of 1 folds into the previous chunk
    assert ghost_chunk_sizes(17, 16) == [17]
    assert ghost_chunk_sizes(5, 1) == [1] * 5
    for b in range(1, 40):
        for g in range(1, 10):
            sizes = ghost_chunk_sizes(b, g)
            assert sum(sizes) == b and (b == 1 or g == 1 or min(sizes) >= 2)


@pytest.mark.parametrize("running_stats", ["per_step", "per_chunk"])
def test_ghost_bn_with_ghost_size_at_least_batch_is_batchnorm(running_stats):
    x = rand(6, 4, 5, 5).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = rand(6, 4, 5, 5, seed=3)
    ghost, ref = GhostBatchNorm2d(4, ghost_batch_size=6, running_stats=running_stats), nn.BatchNorm2d(4)
    with torch.no_grad():
        for m in (ghost, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 4))
            m.bias.copy_(torch.linspace(-1, 1, 4))
    for _ in range(2):
        y, y2 = ghost(x), ref(x2)
        torch.testing.assert_close(y, y2)
        y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ghost.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ghost.bias.grad, ref.bias.grad)
    torch.testing.assert_close(ghost.running_mean, ref.running_mean)
    torch.testing.assert_close(ghost.running_var, ref.running_var)
    ghost.eval(), ref.eval()
    torch.testing.assert_close(ghost(rand(3, 4, 5, 5, seed=9)), ref(rand(3, 4, 5, 5, seed=9)))


def ghost_reference(x, weight, bias, sizes, eps):
    """float64 per-chunk BN (docs/methods.md#ghost_bn): statistics over (b_j, H, W) of each chunk."""
    out, means, uvars = [], [], []
    for chunk in torch.split(x, sizes):
        mu = chunk.mean((0, 2, 3), keepdim=True)
        var = ((chunk - mu) ** 2).mean((0, 2, 3), keepdim=True)
        out.append((chunk - mu) / torch.sqrt(var + eps) * per_c(weight) + per_c(bias))
        n = chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
        means.append(mu.flatten())
        uvars.append(var.flatten() * n / (n - 1))
    return torch.cat(out), means, uvars


@pytest.mark.parametrize("batch,ghost", [(10, 4), (9, 4), (12, 4)])
def test_ghost_bn_per_chunk_statistics_and_running_updates(kernels, batch, ghost):
    x = rand(batch, 3, 4, 4, dtype=D64)
    w, b = affine_params(3)
    sizes = ghost_chunk_sizes(batch, ghost)
    ref, means, uvars = ghost_reference(x, w, b, sizes, 1e-5)
    for mode in ("per_step", "per_chunk"):
        layer = GhostBatchNorm2d(3, ghost_batch_size=ghost, running_stats=mode).double()
        with torch.no_grad():
            layer.weight.copy_(w), layer.bias.copy_(b)
            layer.running_mean.fill_(0.2), layer.running_var.fill_(1.5)
        torch.testing.assert_close(layer(x), ref)
        m = 0.1
        if mode == "per_step":  # one update per step from the size-weighted chunk statistics
            wts = [n / batch for n in sizes]
            exp_mean = 0.9 * 0.2 + m * sum(wj * mu for wj, mu in zip(wts, means))
            exp_var = 0.9 * 1.5 + m * sum(wj * v for wj, v in zip(wts, uvars))
        else:  # one BN update per chunk, in order
            exp_mean, exp_var = torch.full((3,), 0.2, dtype=D64), torch.full((3,), 1.5, dtype=D64)
            for mu, v in zip(means, uvars):
                exp_mean, exp_var = (1 - m) * exp_mean + m * mu, (1 - m) * exp_var + m * v
        torch.testing.assert_close(layer.running_mean, exp_mean)
        torch.testing.assert_close(layer.running_var, exp_var)


def test_ghost_bn_per_chunk_equals_bn_run_chunk_by_chunk():
    """The authors' code: each ghost batch through one standard BN (outputs, running stats, grads)."""
    x = rand(10, 4, 3, 3).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = rand(10, 4, 3, 3, seed=5)
    ghost, bn = GhostBatchNorm2d(4, ghost_batch_size=4, running_stats="per_chunk"), nn.BatchNorm2d(4)
    y = ghost(x)
    y2 = torch.cat([bn(c) for c in torch.split(x2, [4, 4, 2])])
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ghost.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean)
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    ghost.eval(), bn.eval()
    torch.testing.assert_close(ghost(x), bn(x))  # eval: running statistics, the ghost size is ignored


def test_ghost_bn_gradcheck(kernels):
    for batch, ghost in [(5, 2), (6, 3), (7, 3)]:
        chunks = Chunks(ghost_chunk_sizes(batch, ghost), "cpu", D64)
        x = rand(batch, 3, 2, 3, dtype=D64).requires_grad_()
        w, b = affine_params(3)
        assert gradcheck(lambda x, w, b: ChunkedBatchNormFn.apply(x, w, b, chunks, 1e-3, None)[0], (x, w, b))


def test_chunked_bn_fused_relu_gradcheck():
    """The fused ReLU of the native chunked kernels (Ghost BN and Batch Renorm + ReLU in one call):
    gradcheck through the kink-free inputs gradcheck draws (the mask is piecewise constant)."""
    if native.library() is None:
        pytest.skip("fused kernels unavailable")
    renorm = (torch.full((3,), 50.0, dtype=D64), torch.full((3,), 0.01, dtype=D64),
              torch.tensor(1.5, dtype=D64), torch.tensor(0.5, dtype=D64))
    for sizes, rn in [([2, 3], None), ([3, 2, 2], None), ([5], renorm)]:
        chunks = Chunks(sizes, "cpu", D64)
        x = rand(sum(sizes), 3, 2, 3, dtype=D64).requires_grad_()
        w, b = affine_params(3)
        y = ChunkedBatchNormFn.apply(x, w, b, chunks, 1e-3, rn, None, True)[0]
        torch.testing.assert_close(y, F.relu(ChunkedBatchNormFn.apply(x, w, b, chunks, 1e-3, rn)[0]))
        assert (y == 0).any() and (y > 0).any()  # the mask is exercised
        assert gradcheck(lambda x, w, b: ChunkedBatchNormFn.apply(x, w, b, chunks, 1e-3, rn, None, True)[0], (x, w, b))


@pytest.mark.parametrize("make", [lambda relu: GhostBatchNorm2d(4, ghost_batch_size=3, relu=relu),
                                  lambda relu: _brn_chunked(4, relu=relu)], ids=["ghost_bn", "brn"])
def test_fused_relu_layers_equal_the_layer_then_relu(kernels, make):
    """GhostBatchNorm2d / BatchRenorm2d with relu=True (fused where the kernels apply) equal the
    same layer followed by F.relu: outputs, all gradients and running statistics, train and eval."""
    torch.manual_seed(0)
    fused, plain = make(True).double(), make(False).double()
    plain.load_state_dict(fused.state_dict())
    x = rand(8, 4, 3, 3, dtype=D64, cl=True).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = rand(8, 4, 3, 3, seed=5, dtype=D64)
    for _ in range(2):
        y, y2 = fused(x), F.relu(plain(x2))
        torch.testing.assert_close(y, y2)
        y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for p, q in zip(fused.buffers(), plain.buffers()):
        torch.testing.assert_close(p, q)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), F.relu(plain(x2)))
    assert fused.dead_floor == 0.0 and plain.dead_floor is None


@pytest.mark.parametrize("g_cl", [False, True], ids=["grad_nchw", "grad_channels_last"])
@pytest.mark.parametrize("make", [lambda: GhostBatchNorm2d(3, ghost_batch_size=2),
                                  lambda: _brn_chunked(3)], ids=["ghost_bn", "brn"])
def test_chunked_bn_channels_last_matches_nchw(make, g_cl):
    x = rand(6, 3, 4, 4)
    g = rand(6, 3, 4, 4, seed=2, cl=g_cl)
    outs = []
    for cl in (False, True):
        layer = make()
        xi = (x.contiguous(memory_format=torch.channels_last) if cl else x.clone()).requires_grad_()
        y = layer(xi)
        y.backward(g)
        outs.append((y, xi.grad, layer.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _brn_chunked(c, relu=False):
    layer = BatchRenorm2d(c, r_max=2.0, d_max=1.0, relu=relu)
    layer.path = "chunked"
    layer.set_progress(10.0)
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
    return layer


@pytest.mark.parametrize("path", ["kernel", "chunked"])
def test_brn_with_rmax_1_dmax_0_is_batchnorm(path):
    x = rand(6, 4, 5, 5).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = rand(6, 4, 5, 5, seed=3)
    brn = BatchRenorm2d(4, r_max=1.0, d_max=0.0)
    brn.path = path
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        brn.running_mean.fill_(3.0), brn.running_std.fill_(0.1)  # far from the batch: r, d would clip
        for m in (brn, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 4)), m.bias.copy_(torch.linspace(-1, 1, 4))
    y, y2 = brn(x), ref(x2)
    torch.testing.assert_close(y, y2)
    y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(brn.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brn.bias.grad, ref.bias.grad)


def brn_reference(x, w, b, mu, sigma, r_max, d_max, eps):
    """float64 Batch Renorm (Ioffe 2017, Alg. 1) with r, d detached; returns (y, mu_B, sigma_B)."""
    mu_b = x.mean((0, 2, 3))
    sigma_b = torch.sqrt(((x - per_c(mu_b)) ** 2).mean((0, 2, 3)) + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - mu) / sigma, -d_max, d_max).detach()
    xhat = (x - per_c(mu_b)) / per_c(sigma_b) * per_c(r) + per_c(d)
    return xhat * per_c(w) + per_c(b), mu_b.detach(), sigma_b.detach()


@pytest.mark.parametrize("path", ["kernel", "chunked"])
def test_brn_forward_backward_and_moving_stats_against_formula(kernels, path):
    x = rand(8, 3, 4, 4, dtype=D64).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w, b = affine_params(3)
    w2, b2 = (t.detach().clone().requires_grad_() for t in (w, b))
    layer = BatchRenorm2d(3, eps=1e-5, momentum=0.01, r_max=1.5, d_max=0.5, warmup_epochs=0, r_max_epochs=0,
                          d_max_epochs=0).double()
    layer.path = path
    mu0 = torch.tensor([0.2, 0.5, -1.0], dtype=D64)  # channel 0: r, d inside the limits; 1, 2: clipped
    sigma0 = torch.tensor([1.3, 0.5, 4.0], dtype=D64)
    with torch.no_grad():
        layer.weight.copy_(w), layer.bias.copy_(b)
        layer.running_mean.copy_(mu0), layer.running_std.copy_(sigma0)
    y = layer(x)
    y_ref, mu_b, sigma_b = brn_reference(x2, w2, b2, mu0, sigma0, 1.5, 0.5, 1e-5)
    torch.testing.assert_close(y, y_ref)
    g = rand(8, 3, 4, 4, seed=7, dtype=D64)
    y.backward(g), y_ref.backward(g)  # stop-gradient: autograd of the reference with r, d detached
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, w2.grad)
    torch.testing.assert_close(layer.bias.grad, b2.grad)
    torch.testing.assert_close(layer.running_mean, mu0 + 0.01 * (mu_b - mu0))  # from BEFORE this step
    torch.testing.assert_close(layer.running_std, sigma0 + 0.01 * (sigma_b - sigma0))
    layer.eval()
    xe = rand(3, 3, 4, 4, seed=4, dtype=D64)
    expected = (xe - per_c(layer.running_mean)) / per_c(layer.running_std) * per_c(layer.weight) + per_c(layer.bias)
    torch.testing.assert_close(layer(xe), expected)


def test_brn_gradcheck_with_r_and_d_clipped(kernels):
    # gradcheck differentiates r, d numerically: put them at their limits, where they are constant
    chunks = Chunks([5], "cpu", D64)
    x = rand(5, 3, 2, 3, dtype=D64).requires_grad_()
    w, b = affine_params(3)
    renorm = (torch.full((3,), 50.0, dtype=D64), torch.full((3,), 0.01, dtype=D64),
              torch.tensor(1.5, dtype=D64), torch.tensor(0.5, dtype=D64))
    assert gradcheck(lambda x, w, b: ChunkedBatchNormFn.apply(x, w, b, chunks, 1e-3, renorm)[0], (x, w, b))


def test_brn_schedule_and_checkpoint():
    layer = BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_epochs=1.0, r_max_epochs=5.0, d_max_epochs=3.0)
    assert layer.limits_at(0.0) == (1.0, 0.0) and layer.limits_at(1.0) == (1.0, 0.0)
    assert layer.limits_at(2.0) == pytest.approx((1.5, 2.5))
    assert layer.limits_at(3.0) == pytest.approx((2.0, 5.0))
    assert layer.limits_at(9.0) == pytest.approx((3.0, 5.0))
    layer.set_progress(2.0)
    assert layer.r_limit.item() == pytest.approx(1.5) and layer.d_limit.item() == pytest.approx(2.5)
    fresh = BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_epochs=1.0, r_max_epochs=5.0, d_max_epochs=3.0)
    assert fresh.r_limit.item() == 1.0
    fresh.load_state_dict(layer.state_dict())  # the limits in force travel in the checkpoint
    assert fresh.r_limit.item() == pytest.approx(1.5) and fresh.d_limit.item() == pytest.approx(2.5)
    model = build_model(load_config(None, ["norm.kind=brn", "model.width=0.25"]))
    assert sum(hasattr(m, "set_progress") for m in model.modules()) == 19  # every norm of ResNet-20


# ----------------------------------------------------------------------------- per-sample family


def group_norm_reference(x, groups, w, b, eps):
    bsz, c, h, wd = x.shape
    xg = x.reshape(bsz, groups, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    return ((xg - mu) / torch.sqrt(var + eps)).reshape(x.shape) * per_c(w) + per_c(b)


def test_gn_ln_in_against_formulas_and_each_other():
    x = rand(3, 8, 4, 4, dtype=D64)
    w, b = affine_params(8)
    layers = {"gn": GroupNorm(4, 8), "ln": LayerNorm2d(8), "in": InstanceNorm2d(8)}
    groups = {"gn": 4, "ln": 1, "in": 8}
    for name, layer in layers.items():
        layer = layer.double()
        with torch.no_grad():
            layer.weight.copy_(w), layer.bias.copy_(b)
        torch.testing.assert_close(layer(x), group_norm_reference(x, groups[name], w, b, 1e-5))
    xf = rand(3, 8, 4, 4)
    gn1, ln = nn.GroupNorm(1, 8), LayerNorm2d(8)
    torch.testing.assert_close(gn1(xf), ln(xf))
    torch.testing.assert_close(ln(xf), F.layer_norm(xf, xf.shape[1:]))  # gamma = 1, beta = 0 at init
    gnc, inn, ref_in = nn.GroupNorm(8, 8), InstanceNorm2d(8), nn.InstanceNorm2d(8, affine=True)
    with torch.no_grad():
        for m in (gnc, inn, ref_in):
            m.weight.copy_(torch.linspace(0.5, 2, 8)), m.bias.copy_(torch.linspace(-1, 1, 8))
    ref_in.train()
    torch.testing.assert_close(gnc(xf), inn(xf))
    torch.testing.assert_close(inn(xf), ref_in(xf), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_groupnorm_layers_match_pytorch_in_every_path(kernels, cl, relu):
    """normbench's GroupNorm / LayerNorm2d / InstanceNorm2d (fused kernels where they apply, with
    the following ReLU fused in) against nn.GroupNorm (+ F.relu): outputs and every gradient."""
    for groups in (1, 4, 8):
        ours, ref = GroupNorm(groups, 8, relu=relu), nn.GroupNorm(groups, 8)
        with torch.no_grad():
            for m in (ours, ref):
                m.weight.copy_(torch.linspace(0.5, 2, 8)), m.bias.copy_(torch.linspace(-1, 1, 8))
        x = rand(3, 8, 5, 4, cl=cl).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = ours(x), ref(x2)
        if relu:
            y2 = F.relu(y2)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        g = rand(3, 8, 5, 4, seed=2, cl=cl)
        y.backward(g), y2.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
        for a, b in [(ours.weight, ref.weight), (ours.bias, ref.bias)]:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    assert LayerNorm2d(8, relu=True).num_groups == 1 and InstanceNorm2d(8).num_groups == 8


def test_groupnorm_fn_gradcheck():
    if native.library() is None:
        pytest.skip("fused kernels unavailable")
    x = rand(3, 6, 3, 2, dtype=D64).requires_grad_()
    w, b = affine_params(6)
    for groups in (1, 3, 6):
        for relu in (False, True):
            assert gradcheck(lambda x, w, b: GroupNormFn.apply(x, w, b, groups, 1e-3, relu), (x, w, b))


def test_group_count_not_dividing_a_layer_names_it():
    with pytest.raises(UserError, match=r"stem\.norm"):
        build_model(load_config(None, ["norm.kind=gn", "norm.groups=3"]))
    with pytest.raises(UserError, match=r"stage1\.block0\.norm1|stem\.norm"):
        build_model(load_config(None, ["norm.kind=evonorm_s0", "norm.group_size=5"]))
    with pytest.raises(UserError, match=r"does not divide the 8 channels of layer stem\.norm"):
        build_model(load_config(None, ["norm.kind=ws_gn", "norm.group_size=16", "model.width=0.5"]))


def frn_reference(x, w, b, tau, eps):
    nu2 = (x ** 2).mean((2, 3), keepdim=True)
    y = x / torch.sqrt(nu2 + eps) * per_c(w) + per_c(b)
    return torch.maximum(y, per_c(tau)) if tau is not None else y


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_frn_tlu_against_formula_and_gradcheck(kernels, cl):
    x = rand(3, 4, 3, 3, dtype=D64, cl=cl).requires_grad_()
    w, b = affine_params(4)
    tau = (torch.randn(4, dtype=D64) * 0.3).requires_grad_()
    layer = FilterResponseNorm2d(4, eps=1e-6).double()
    with torch.no_grad():
        layer.weight.copy_(w), layer.bias.copy_(b), layer.tau.copy_(tau)
    torch.testing.assert_close(layer(x), frn_reference(x, w, b, tau, 1e-6))
    assert gradcheck(lambda x, w, b, t: FRNFn.apply(x, w, b, t, 1e-3), (x, w, b, tau))
    assert gradcheck(lambda x, w, b: FRNFn.apply(x, w, b, None, 1e-3), (x, w, b))
    eps_l = torch.tensor(0.05, dtype=D64, requires_grad=True)  # learned eps: 1e-6 + |eps_l|
    assert gradcheck(lambda x, w, b, e: FRNFn.apply(x, w, b, tau.detach(), 1e-6 + e.abs()), (x, w, b, eps_l))
    assert gradcheck(lambda x, t: TLUFn.apply(x, t), (x, tau))
    tlu = TLU(4).double()
    with torch.no_grad():
        tlu.tau.copy_(tau)
    torch.testing.assert_close(tlu(x), torch.maximum(x, per_c(tau)))


def test_frn_learned_eps_and_defaults():
    layer = FilterResponseNorm2d(4, learn_eps=True)
    assert layer.eps_l.item() == pytest.approx(1e-4)
    assert float(layer.effective_eps().detach()) == pytest.approx(1e-6 + 1e-4)
    x = rand(2, 4, 3, 3).requires_grad_()
    layer(x).sum().backward()
    assert layer.eps_l.grad is not None and torch.isfinite(layer.eps_l.grad)
    fresh = FilterResponseNorm2d(4)
    assert torch.all(fresh.tau == 0) and torch.all(fresh.weight == 1) and torch.all(fresh.bias == 0)
    assert fresh.eps == 1e-6


def test_frn_matches_timm():
    from timm.layers import FilterResponseNormTlu2d

    x = rand(3, 6, 5, 5).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ours, ref = FilterResponseNorm2d(6, eps=1e-6), FilterResponseNormTlu2d(6, eps=1e-6)  # timm's default eps is 1e-5
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 6)), m.bias.copy_(torch.linspace(-1, 1, 6))
            m.tau.copy_(torch.linspace(-0.5, 0.3, 6))
    y, y2 = ours(x), ref(x2)
    torch.testing.assert_close(y, y2)
    g = rand(3, 6, 5, 5, seed=2)
    y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for a, b in [(ours.weight, ref.weight), (ours.bias, ref.bias), (ours.tau, ref.tau)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)


def evonorm_reference(x, v, w, b, groups, eps):
    bsz = x.shape[0]
    xg = x.reshape(bsz, groups, -1)
    std = torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + eps).expand_as(xg).reshape(x.shape)
    num = x * torch.sigmoid(per_c(v) * x) if v is not None else x
    return num / std * per_c(w) + per_c(b)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_evonorm_s0_against_formula_and_gradcheck(kernels, cl):
    x = rand(3, 4, 3, 3, dtype=D64, cl=cl).requires_grad_()
    w, b = affine_params(4)
    v = (torch.randn(4, dtype=D64) + 1).requires_grad_()
    for act in (True, False):
        layer = EvoNormS0(4, groups=2, eps=1e-5, apply_act=act).double()
        with torch.no_grad():
            layer.weight.copy_(w), layer.bias.copy_(b)
            if act:
                layer.v.copy_(v)
        torch.testing.assert_close(layer(x), evonorm_reference(x, v if act else None, w, b, 2, 1e-5))
    assert gradcheck(lambda x, v, w, b: EvoNormS0Fn.apply(x, v, w, b, 2, 1e-3), (x, v, w, b))
    assert gradcheck(lambda x, w, b: EvoNormS0Fn.apply(x, None, w, b, 2, 1e-3), (x, w, b))


def test_evonorm_s0_matches_timm():
    from timm.layers import EvoNorm2dS0

    x = rand(3, 8, 5, 5).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    # timm: groups given explicitly (its default is 32), eps 1e-5 inside the root like ours; its
    # apply_act=False variant is a bare affine (ours keeps the group-std scaling), so only act=True
    ours, ref = EvoNormS0(8, groups=4, eps=1e-5), EvoNorm2dS0(8, groups=4, eps=1e-5)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 8)), m.bias.copy_(torch.linspace(-1, 1, 8))
            m.v.copy_(torch.linspace(-1, 2, 8))
    y, y2 = ours(x), ref(x2)
    torch.testing.assert_close(y, y2)
    g = rand(3, 8, 5, 5, seed=2)
    y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for a, b in [(ours.weight, ref.weight), (ours.bias, ref.bias), (ours.v, ref.v)]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["frn", "frn_learned", "evonorm_s0", "evonorm_s0_noact"])
@pytest.mark.parametrize("inputs", ["1x1", "zeros", "zeros_1x1"])
def test_frn_and_evonorm_stay_finite_on_degenerate_inputs(kernels, kind, inputs):
    shape = (2, 4, 1, 1) if "1x1" in inputs else (2, 4, 3, 3)
    x = (torch.zeros(shape) if "zeros" in inputs else torch.randn(shape)).requires_grad_()
    layer = {"frn": lambda: FilterResponseNorm2d(4),
             "frn_learned": lambda: FilterResponseNorm2d(4, learn_eps=True),
             "evonorm_s0": lambda: EvoNormS0(4, groups=2),
             "evonorm_s0_noact": lambda: EvoNormS0(4, groups=2, apply_act=False)}[kind]()
    y = layer(x)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


# ----------------------------------------------------------------------------- weight standardization


def test_ws_conv_against_formula():
    conv = WSConv2d(3, 5, 3).double()
    x = rand(2, 3, 6, 6, dtype=D64)
    w = conv.weight.detach()
    mu = w.mean((1, 2, 3), keepdim=True)
    var = ((w - mu) ** 2).mean((1, 2, 3), keepdim=True)
    w_hat = (w - mu) / torch.sqrt(var + 1e-5)  # the paper's Eq. 5 (biased var, eps in the root)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, padding=1))
    assert gradcheck(lambda w: F.conv2d(x[:1, :, :4, :4], standardize_weight(w)), (w.clone().requires_grad_(),))


def test_scaled_ws_conv_against_formula_and_timm():
    from timm.layers import ScaledStdConv2d

    torch.manual_seed(0)
    conv = ScaledWSConv2d(4, 6, 3, stride=2).double()
    with torch.no_grad():
        conv.gain.copy_(torch.linspace(0.5, 1.5, 6)), conv.bias.copy_(torch.linspace(-0.2, 0.2, 6))
    x = rand(2, 4, 7, 7, dtype=D64)
    w = conv.weight.detach()
    mu = w.mean((1, 2, 3), keepdim=True)
    var = ((w - mu) ** 2).mean((1, 2, 3), keepdim=True)
    w_hat = conv.gain.view(-1, 1, 1, 1) * (w - mu) / torch.sqrt(torch.clamp(var * 36, min=1e-4))
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, stride=2, padding=1))
    # timm: gain * scale * (W - mean) / sqrt(var + eps) with scale = 1/sqrt(fan_in), i.e. dividing by
    # sqrt(fan_in * var + fan_in * eps); a negligible eps (PyTorch's batch_norm wants eps > 0) makes
    # it ours wherever var * fan_in > 1e-4 (our floor; var here is ~1/fan_in)
    ref = ScaledStdConv2d(4, 6, 3, stride=2, padding=1, eps=1e-14).double()
    with torch.no_grad():
        ref.weight.copy_(conv.weight), ref.bias.copy_(conv.bias), ref.gain.copy_(conv.gain.view(-1, 1, 1, 1))
    torch.testing.assert_close(conv(x), ref(x))
    # the floor: a constant filter gives 0, never NaN
    with torch.no_grad():
        conv.weight[0].fill_(0.3)
    assert torch.isfinite(conv(x)).all()
    w0, g0 = w.clone().requires_grad_(), conv.gain.detach().clone().requires_grad_()
    assert gradcheck(lambda w, g: F.conv2d(x[:1, :, :4, :4], scaled_standardize_weight(w, g)), (w0, g0))


# ----------------------------------------------------------------------------- NF-ResNet


def test_nf_resnet_structure_and_init():
    cfg = load_config(None, ["norm.kind=nf", "model.width=0.5"])
    model = build_model(cfg)
    assert type(model).__name__ == "NFResNet"
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    alpha = 0.2
    expected, var = [], 1.0
    for s in range(3):
        for b in range(3):
            expected.append(math.sqrt(var))
            var = 1 + alpha ** 2 if (s > 0 and b == 0) else var + alpha ** 2
    assert model.betas == pytest.approx(expected)
    assert all(b.skip_gain.item() == 0 for b in model.blocks)
    assert [b.shortcut is not None for b in model.blocks] == [False] * 3 + [True, False, False] * 2
    assert 0.008 < model.fc.weight.std().item() < 0.012 and torch.all(model.fc.bias == 0)
    assert NF_RELU_GAIN == 1.7139588594 and ScaledReLU().gain == NF_RELU_GAIN
    convs = [m for m in model.modules() if isinstance(m, ScaledWSConv2d)]
    assert convs and all(torch.all(c.gain == 1) and torch.all(c.bias == 0) for c in convs)
    # signal propagation at init with unit residual gains: activations stay O(1), Var(h) grows slowly
    torch.manual_seed(0)
    for b in model.blocks:
        b.skip_gain.data.fill_(1.0)
    h = model.stem(torch.randn(16, 3, 32, 32))
    for i, block in enumerate(model.blocks):
        h = block(h)
        assert 0.3 < h.var().item() < 3.0, i


def test_nf_alpha_from_config():
    model = build_model(load_config(None, ["norm.kind=nf", "norm.nf_alpha=0.5", "model.width=0.25"]))
    assert model.betas[1] == pytest.approx(math.sqrt(1.25))


# ----------------------------------------------------------------------------- training


CLIP_FOR = {"bn": "agc", "ghost_bn": "norm", "brn": "dynamic", "gn": "value", "ln": "agc", "in": "dynamic",
            "ws_gn": "norm", "frn": "agc", "evonorm_s0": "dynamic", "none": "agc", "nf": "agc"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ALL)
def test_every_scheme_trains_50_steps_with_clipping(kind):
    from normbench.clip import make_clipper

    mode = CLIP_FOR[kind]
    sets = [f"norm.kind={kind}", "model.width=0.25", "norm.groups=2", "norm.ghost_batch_size=3",
            f"clip.mode={mode}", "clip.max_norm=0.5", "clip.max_value=0.05", "clip.agc_lambda=0.05",
            "clip.window=10", "clip.alpha=1.0"]
    cfg = load_config(None, sets)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    clipper = make_clipper(cfg.clip, model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.arange(8) % 10
    progress = [m for m in model.modules() if hasattr(m, "set_progress")]
    losses, clipped = [], []
    for step in range(50):
        for m in progress:
            m.set_progress(step / 10)  # 10 steps per "epoch": Batch Renorm's r/d limits rise mid-run
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stats = clipper()
        opt.step()
        losses.append(loss.item())
        clipped.append(stats.clipped_frac.item())
        assert math.isfinite(stats.norm.item())
    assert all(math.isfinite(v) for v in losses), kind
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, (kind, losses[:5], losses[-5:])
    assert max(clipped) > 0, f"{kind}: clip mode {mode} never clipped"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("kind", ["ghost_bn", "brn", "frn", "evonorm_s0"])
def test_custom_units_under_bf16_autocast(kind):
    """The engine's bf16 autocast: NormAct runs the norm in fp32 (the chunk matmuls must not
    drop to bf16); the post-add TLU takes bf16 input directly."""
    cfg = NormConfig(kind=kind, groups=2, ghost_batch_size=2)
    scheme = get_scheme(kind)
    unit = scheme.norm_act(cfg, 4, True, "L").train()
    post = scheme.post_add_act(cfg, 4, "L.act")
    for m in unit.modules():
        if isinstance(m, BatchRenorm2d):
            m.path = "chunked"
            m.set_progress(10.0)
    x = rand(6, 4, 3, 3).to(torch.bfloat16).requires_grad_()
    with torch.no_grad():
        unit_fp32 = copy.deepcopy(unit)(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = unit(x)
        z = post(x.clone())  # (an in-place ReLU cannot take a leaf)
    torch.testing.assert_close(y, unit_fp32)  # identical: the norm ran in fp32
    (y.sum() + z.float().sum()).backward()
    assert z.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in list(unit.parameters()) + list(post.parameters()))
