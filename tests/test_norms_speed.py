"""The speed seam of normbench.norms: every layer, in every path, against its family's
plain-PyTorch reference; and the binding of the fused kernels, whose one declaration the C++
must match (a wrong declaration fails the build or the call is refused, never runs).
"""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from normbench.norms import speed
from normbench.norms.batch_norm import BatchNorm2d, batch_norm_reference
from normbench.norms.batch_renorm import BatchRenorm2d, batch_renorm_reference
from normbench.norms.evonorm import EvoNormS0, evonorm_s0_reference
from normbench.norms.filter_response import TLU, FilterResponseNorm2d, filter_response_norm_reference, tlu_reference
from normbench.norms.ghost_batch_norm import GhostBatchNorm2d, ghost_batch_norm_reference, ghost_chunk_sizes
from normbench.norms.group_norm import GroupNorm, InstanceNorm2d, LayerNorm2d, group_norm_reference
from normbench.norms.speed import functional, native
from normbench.norms.speed.native import binding, build

D64 = torch.float64
HAS_CXX = bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"))


@pytest.fixture(params=["native", "fast", "generic"])
def path(request):
    """The fused kernels, the CPU fast path of speed.functional, the generic ops."""
    old = functional.FAST_KERNELS, native.ENABLED
    functional.FAST_KERNELS = request.param != "generic"
    native.ENABLED = request.param == "native"
    if request.param == "native" and not speed.load():
        pytest.skip("fused kernels unavailable")
    yield request.param
    functional.FAST_KERNELS, native.ENABLED = old


def relu_of(reference):
    return lambda x, m: torch.relu(reference(x, m))


def _brn(relu=False, path="chunked"):
    layer = BatchRenorm2d(4, r_max=1.5, d_max=0.5, relu=relu)
    layer.path = path
    layer.set_progress(10.0)
    with torch.no_grad():  # channel 0: r, d inside the limits; the others clipped
        layer.running_mean.copy_(torch.tensor([0.3, 2.0, -3.0, 0.0]))
        layer.running_std.copy_(torch.tensor([1.2, 0.2, 5.0, 1.0]))
    return layer


def _brn_reference(x, m):
    return batch_renorm_reference(x, m.weight, m.bias, m.running_mean, m.running_std, float(m.r_limit),
                                  float(m.d_limit), m.eps)[0]


def _perturbed(layer):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


# name: (layer, reference(x, a copy of the layer before the step) -> output)
CASES = {
    "bn": (lambda: BatchNorm2d(4), lambda x, m: batch_norm_reference(x, m.weight, m.bias, m.eps)[0]),
    "ghost_bn": (lambda: GhostBatchNorm2d(4, ghost_batch_size=3),
                 lambda x, m: ghost_batch_norm_reference(x, m.weight, m.bias, ghost_chunk_sizes(x.shape[0], 3),
                                                         m.eps)[0]),
    "brn_chunked": (_brn, _brn_reference),
    "brn_kernel": (lambda: _brn(path="kernel"), _brn_reference),
    "gn": (lambda: GroupNorm(2, 4), lambda x, m: group_norm_reference(x, 2, m.weight, m.bias, m.eps)),
    "ln": (lambda: LayerNorm2d(4), lambda x, m: group_norm_reference(x, 1, m.weight, m.bias, m.eps)),
    "in": (lambda: InstanceNorm2d(4), lambda x, m: group_norm_reference(x, 4, m.weight, m.bias, m.eps)),
    "frn": (lambda: FilterResponseNorm2d(4),
            lambda x, m: filter_response_norm_reference(x, m.weight, m.bias, m.tau, m.effective_eps())),
    "frn_no_tlu": (lambda: FilterResponseNorm2d(4, tlu=False),
                   lambda x, m: filter_response_norm_reference(x, m.weight, m.bias, None, m.effective_eps())),
    "frn_learned_eps": (lambda: FilterResponseNorm2d(4, learn_eps=True),
                        lambda x, m: filter_response_norm_reference(x, m.weight, m.bias, m.tau, m.effective_eps())),
    "tlu": (lambda: TLU(4), lambda x, m: tlu_reference(x, m.tau)),
    "evonorm_s0": (lambda: EvoNormS0(4, groups=2),
                   lambda x, m: evonorm_s0_reference(x, m.v, m.weight, m.bias, 2, m.eps)),
    "evonorm_s0_noact": (lambda: EvoNormS0(4, groups=2, apply_act=False),
                         lambda x, m: evonorm_s0_reference(x, None, m.weight, m.bias, 2, m.eps)),
}
for _name in ("bn", "ghost_bn", "brn_chunked", "brn_kernel", "gn", "ln", "in"):  # + the ReLU the layer carries
    _make, _ref = CASES[_name]
    CASES[f"{_name}+relu"] = ((lambda make: lambda: _relu_on(make()))(_make), relu_of(_ref))


def _relu_on(layer):
    layer.relu = True
    return layer


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_in_each_path_matches_its_family_reference(path, cl, case):
    """A training step in float64: the output and the gradients of the input and of every
    parameter, the layer (whatever path speed takes) against autograd through the reference."""
    make, reference = CASES[case]
    layer = _perturbed(make().double().train())
    ref_layer = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 3, 5, generator=g, dtype=D64) * 1.5 + 0.4
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1), reference(x2, ref_layer)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn(y_ref.shape, generator=g, dtype=D64)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("path_name", ["chunked", "kernel"])
def test_brn_moving_statistics_follow_the_reference(path, path_name):
    """mu += rate (mu_B - mu), sigma += rate (sigma_B - sigma), after r and d used the old ones."""
    layer = _brn(path=path_name).double()
    mu0, sigma0 = layer.running_mean.clone(), layer.running_std.clone()
    x = torch.randn(8, 4, 3, 5, generator=torch.Generator().manual_seed(2), dtype=D64) + 0.5
    _, mu_b, sigma_b = batch_renorm_reference(x, layer.weight, layer.bias, mu0, sigma0, 1.5, 0.5, layer.eps)
    layer(x)
    torch.testing.assert_close(layer.running_mean, mu0 + 0.01 * (mu_b - mu0))
    torch.testing.assert_close(layer.running_std, sigma0 + 0.01 * (sigma_b - sigma0))
    assert int(layer.num_batches_tracked) == 1


def test_group_norm_seam_says_none_where_the_kernels_do_not_apply(path):
    x = torch.randn(2, 4, 3, 3)
    w, b = torch.ones(4), torch.zeros(4)
    out = speed.group_norm(x, w, b, 2, 1e-5, False)
    assert (out is None) == (path != "native")
    assert speed.group_norm(x.to(torch.bfloat16), w, b, 2, 1e-5, False) is None


# ----------------------------------------------------------------------------- the binding


def test_the_declaration_is_well_formed():
    sigs = binding.signatures()
    assert set(sigs) == set(binding.KERNELS)
    hdr = binding.header()
    for name, params in sigs.items():
        for suffix in binding.ELEMENT_TYPES:
            assert f" {name}_{suffix}(" in hdr
        assert len(binding.argtypes(params)) == len(params)
    with pytest.raises(ValueError, match="not one of"):
        binding.parse("const float* x")  # only T (float / double per symbol) and the listed types
    with pytest.raises(ValueError, match="new identifier"):
        binding.parse("const T* x, int64_t x")


needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on PATH")


@needs_cxx
def test_fused_cpp_compiles_against_the_declaration():
    build.compile_source(None)  # syntax only: the definitions against the generated prototypes


def _with(name, decl):
    kernels = dict(binding.KERNELS)
    if decl is None:
        del kernels[name]
    else:
        kernels[name] = decl
    return kernels


_MOMENTS = binding.KERNELS["bc_moments"]
WRONG = {
    "a parameter's type": _with("bc_moments", _MOMENTS.replace("int nhwc", "int64_t nhwc")),
    "a parameter left out": _with("frn_forward", binding.KERNELS["frn_forward"].replace(" double eps,", "")),
    "a parameter too many": _with("cbn_backward", binding.KERNELS["cbn_backward"] + ", int extra"),
    "two parameters swapped": _with("bc_moments", _MOMENTS.replace("int64_t S, int nhwc", "int nhwc, int64_t S")),
    "a pointer's constness": _with("gn_forward_full", binding.KERNELS["gn_forward_full"].replace("const T* gamma",
                                                                                                  "T* gamma")),
    "a kernel not declared": _with("evo_grad_out", None),
}


@needs_cxx
@pytest.mark.parametrize("what", list(WRONG))
def test_a_wrong_declaration_fails_the_build(what):
    with pytest.raises(RuntimeError, match="conflicting declaration|no previous declaration"):
        build.compile_source(None, WRONG[what])


def test_a_declared_kernel_the_library_lacks_is_refused():
    if not speed.load():
        pytest.skip("fused kernels unavailable")
    with pytest.raises(RuntimeError, match="no_such_kernel_f32"):
        binding.bind(native.library(), {**binding.KERNELS, "no_such_kernel": "const T* x, int64_t n"})


def test_a_call_with_another_number_of_arguments_is_refused():
    """ctypes alone would pass an extra argument on unchecked; the binding refuses the call."""
    if not speed.load():
        pytest.skip("fused kernels unavailable")
    kernel = binding.bind(native.library())[("bc_moments", "f32")]
    x = torch.randn(2, 3, 4, 5)
    mean, var = x.new_empty(2, 3), x.new_empty(2, 3)
    args = (x.data_ptr(), 2, 3, 20, 0, mean.data_ptr(), var.data_ptr())
    for wrong in (args + (0,), args[:-1]):
        with pytest.raises(TypeError, match="bc_moments_f32 takes 7 arguments"):
            kernel(*wrong)
    kernel(*args)
    torch.testing.assert_close(mean, x.mean((2, 3)))
    torch.testing.assert_close(var, x.var((2, 3), correction=0))
