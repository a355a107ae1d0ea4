"""Float32 accuracy of the normalizers' statistics when an input's mean is large against its spread.

A variance taken as E[x^2] - mean^2 over float32 sums cancels catastrophically once the mean is
many standard deviations; the fused kernels (normbench.norms.speed.native) and the PyTorch paths
of normbench.norms.speed.functional must not. Every check here is float32 against the same
computation in float64 on the same input values, at means of 10x and 100x the standard
deviation, in NCHW and channels_last: 1e-5 relative on the variance, on every layer's output
and on the gradient reaching the input.
"""
from __future__ import annotations

import copy

import pytest
import torch

from normbench.norms import speed
from normbench.norms.batch_renorm import BatchRenorm2d
from normbench.norms.evonorm import EvoNormS0
from normbench.norms.filter_response import FilterResponseNorm2d
from normbench.norms.ghost_batch_norm import GhostBatchNorm2d
from normbench.norms.group_norm import GroupNorm, InstanceNorm2d, LayerNorm2d
from normbench.norms.speed import functional, native

TOL = 1e-5
OFFSETS = [10.0, 100.0]
LAYOUTS = [False, True]


def need_native():
    if not speed.load():
        pytest.skip("fused kernels unavailable")


@pytest.fixture(params=["native", "fast", "generic"])
def path(request):
    """The fused kernels, the CPU fast path of normbench.norms.speed.functional, the generic ops."""
    old = functional.FAST_KERNELS, native.ENABLED
    functional.FAST_KERNELS = request.param != "generic"
    native.ENABLED = request.param == "native"
    if request.param == "native":
        need_native()
    yield request.param
    functional.FAST_KERNELS, native.ENABLED = old


@pytest.fixture(params=["fast", "generic"])
def functional_path(request):
    """normbench.norms.speed.functional's CPU fast path and its generic ops."""
    old = functional.FAST_KERNELS
    functional.FAST_KERNELS = request.param == "fast"
    yield request.param
    functional.FAST_KERNELS = old


def offset_input(shape, offset, cl, seed=0):
    """float32 x = N(0, 1) + offset * (1 + 0.1 u_c): every plane's mean is about ``offset``
    standard deviations, and the channels' means differ (so group statistics see a spread of
    means too)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, generator=g) + offset * (1 + 0.1 * torch.randn(1, c, 1, 1, generator=g))
    return x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()


def rel(actual, expected):
    """max |actual - expected| / max |expected|."""
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("shape", [(4, 32, 8, 8), (3, 24, 5, 7), (2, 16, 32, 32)], ids=str)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("cl", LAYOUTS, ids=["nchw", "channels_last"])
def test_native_moments_at_large_offsets(cl, offset, shape):
    """The per-(sample, channel) moment pass against float64 mean and variance; (3, 24, ...) is a
    channel count the NHWC lane blocks do not divide, (.., 32, 32) spans several row blocks."""
    need_native()
    x = offset_input(shape, offset, cl)
    X = x.double()
    mean, var = native.moments(x)
    var_ref = X.var((2, 3), correction=0)
    assert ((var.double() - var_ref).abs() / var_ref).max().item() < TOL
    assert ((mean.double() - X.mean((2, 3))).abs() / X.mean((2, 3)).abs()).max().item() < 1e-6


@pytest.mark.parametrize("cl", LAYOUTS, ids=["nchw", "channels_last"])
def test_native_moments_with_an_outlying_first_element(cl):
    """A zero-mean plane whose first element (the shift of the sums) lies 6 std out: the shifted
    sums' cancellation is then 1 + 6^2, which float32 partial sums would not absorb."""
    need_native()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, 8, 8, generator=g)
    x[:, :, 0, 0] = 6.0
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    _, var = native.moments(x)
    var_ref = x.double().var((2, 3), correction=0)
    assert ((var.double() - var_ref).abs() / var_ref).max().item() < 1e-6


def test_native_moments_of_constant_planes_are_exactly_zero():
    need_native()
    for cl in LAYOUTS:
        x = torch.full((2, 16, 4, 4), 1234.5678)
        x[1] = -0.1
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        mean, var = native.moments(x)
        assert torch.equal(var, torch.zeros(2, 16))
        assert torch.equal(mean, x[:, :, 0, 0].contiguous())


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("cl", LAYOUTS, ids=["nchw", "channels_last"])
def test_native_grad_sums_about_a_centre(cl, offset):
    """sum g' (x - centre): the backward's centred sums, against float64."""
    need_native()
    x = offset_input((3, 32, 6, 6), offset, cl)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format)
    centre = x.double().mean((2, 3)).float()
    sg, sgx, _ = native.grad_sums(g, x, center=centre)
    X, G = x.double(), g.double()
    want = (G * (X - centre.double()[:, :, None, None])).sum((2, 3))
    assert rel(sgx, want) < TOL and rel(sg, G.sum((2, 3))) < TOL


LAYERS = {
    "ghost_bn": lambda c: GhostBatchNorm2d(c, ghost_batch_size=2),
    "ghost_bn+relu": lambda c: GhostBatchNorm2d(c, ghost_batch_size=2, relu=True),
    "brn": lambda c: BatchRenorm2d(c, warmup_epochs=1.0),  # r = 1, d = 0: the batch variance counts
    "gn": lambda c: GroupNorm(8, c),
    "gn+relu": lambda c: GroupNorm(8, c, relu=True),
    "ln": lambda c: LayerNorm2d(c),
    "in": lambda c: InstanceNorm2d(c),
    "frn": lambda c: FilterResponseNorm2d(c),  # a mean square, no variance: a guard on its sums
    "evonorm_s0": lambda c: EvoNormS0(c),
    "evonorm_s0_noact": lambda c: EvoNormS0(c, apply_act=False),
}
# the layers whose statistics come from normbench.norms.speed.functional when the kernels are off
# (GroupNorm / LayerNorm / InstanceNorm then run PyTorch's own GroupNorm kernel)
FUNCTIONAL_LAYERS = ["ghost_bn", "brn", "frn", "evonorm_s0", "evonorm_s0_noact"]


def layer_pair(kind, c, seed=1):
    """A float32 layer with perturbed parameters (chunked path for Batch Renorm) and its float64 copy."""
    torch.manual_seed(seed)
    m = LAYERS[kind](c).train()
    if isinstance(m, BatchRenorm2d):
        m.path = "chunked"
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m, copy.deepcopy(m).double()


def compare_layer(kind, x, check_params):
    m32, m64 = layer_pair(kind, x.shape[1])
    xi, Xi = x.clone().requires_grad_(), x.double().requires_grad_()
    y, Y = m32(xi), m64(Xi)
    gy = torch.randn(Y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y.backward(gy.float().contiguous(memory_format=torch.channels_last if not x.is_contiguous()
                                     else torch.contiguous_format))
    Y.backward(gy)
    errs = {"out": rel(y, Y.detach()), "dx": rel(xi.grad, Xi.grad)}
    if check_params:
        for (name, p), q in zip(m32.named_parameters(), m64.parameters()):
            # EvoNorm-S0's dv sums x^2 s (1 - s), s = sigmoid(v x): at these offsets s is within
            # 1e-4 of 1 (at 100x, within an ulp), so 1 - s from the stored float32 s keeps few
            # digits; a property of the sigmoid, not of the statistics checked here
            if name != "v" and q.grad.abs().max() > 0:
                errs[f"d{name}"] = rel(p.grad, q.grad)
        for (name, bf), bd in zip(m32.named_buffers(), m64.buffers()):
            if bf.is_floating_point():
                errs[name] = rel(bf, bd)
    return errs


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("cl", LAYOUTS, ids=["nchw", "channels_last"])
def test_native_layers_match_float64_at_large_offsets(cl, offset, kind):
    """Output, input gradient, parameter gradients and running statistics of every fused-kernel
    layer against the same layer in float64."""
    need_native()
    for shape in [(4, 32, 8, 8), (4, 16, 12, 12)]:
        errs = compare_layer(kind, offset_input(shape, offset, cl), check_params=True)
        assert max(errs.values()) < TOL, (shape, errs)


@pytest.mark.parametrize("kind", FUNCTIONAL_LAYERS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("cl", LAYOUTS, ids=["nchw", "channels_last"])
def test_functional_layers_match_float64_in_every_path(path, cl, offset, kind):
    """The layers built on normbench.norms.speed.functional, in each path: output and input gradient."""
    errs = compare_layer(kind, offset_input((4, 32, 8, 8), offset, cl), check_params=False)
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("shape", [(4, 32, 8, 8), (32, 16, 32, 32)], ids=str)
@pytest.mark.parametrize("groups", [1, 8, None])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("cl", LAYOUTS, ids=["nchw", "channels_last"])
def test_functional_moments_at_large_offsets(functional_path, cl, offset, groups, shape):
    """functional.moments (the PyTorch paths' statistics) against float64 group variances and
    means; (.., 32, 32): a float32 mean over 1024 rows is ~10 ulps off, which a variance
    combined across channels would feel."""
    x = offset_input(shape, offset, cl)
    mean, rstd = functional.moments(x, groups)
    n_groups = shape[1] if groups is None else groups
    var_ref, mean_ref = torch.var_mean(x.double().reshape(shape[0], n_groups, -1), -1, correction=0)
    assert ((rstd.double().pow(-2) - var_ref).abs() / var_ref).max().item() < TOL
    assert ((mean.double() - mean_ref).abs() / mean_ref.abs()).max().item() < 1e-6


@pytest.mark.parametrize("apply_act", [True, False], ids=["act", "noact"])
@pytest.mark.parametrize("cl", LAYOUTS, ids=["nchw", "channels_last"])
def test_evonorm_zero_variance_group(path, cl, apply_act):
    """A constant group has variance 0 exactly, so EvoNorm-S0 scales it by 1 / sqrt(eps): any
    spurious variance from rounding (of the order of eps here) changes that group's output."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 32, 6, 6, generator=g) + 3.0
    x[:, :4] = 3.7  # group 0 of 8
    x[1, 4:8] = -21.25  # group 1 of sample 1
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    m = EvoNormS0(32, apply_act=apply_act)
    y = m(x)
    Y = copy.deepcopy(m).double()(x.double())
    X = x.double()
    q = X * torch.sigmoid(X) if apply_act else X
    const = q[:, :4] / (1e-5) ** 0.5  # gamma = 1, beta = 0 at init
    torch.testing.assert_close(Y[:, :4], const, rtol=1e-12, atol=0)  # the reference itself
    assert rel(y[:, :4], const) < TOL
    assert rel(y[1, 4:8], Y[1, 4:8].detach()) < TOL
    assert rel(y, Y.detach()) < TOL


@pytest.mark.parametrize("offset", [10.0, 100.0])
def test_syncbn_moments_are_two_pass_and_match_float64(offset):
    """SyncBN's global moments (one rank: the reduce is the identity) against float64, at a
    mean of 10x and 100x the std; the variance never comes from Q / n - mean^2."""
    from normbench.norms.sync_batch_norm import global_moments

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 8, 8, generator=g) + offset
    n, mean, var = global_moments(x, lambda t: t)
    ref = x.double()
    ref_var = ref.var(dim=(0, 2, 3), unbiased=False)
    assert int(n) == 4 * 8 * 8
    assert torch.allclose(mean.double(), ref.mean(dim=(0, 2, 3)), rtol=1e-6)
    assert ((var.double() - ref_var).abs() / ref_var).max() < 1e-5
