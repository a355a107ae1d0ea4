"""Fused CPU kernels (fused.cpp) for FRN + TLU, EvoNorm-S0, GroupNorm / LayerNorm /
InstanceNorm (+ ReLU) and the chunked BatchNorm of Ghost BN / Batch Renorm (+ ReLU): one call per
layer and direction, two passes over the activation each way, instead of the 3-8 passes (and
temporaries) that the same maths costs as PyTorch ops.

The C++ file has no PyTorch headers: :func:`library` compiles it (build.py: ``g++ -O3
-march=native -fopenmp``, a few seconds, cached on disk) and loads it; the kernels are called
through ctypes on tensors' memory, each through binding.py's one declaration of its parameters.
Their OpenMP loops run in the process's libgomp, which is PyTorch's own (same soname, already
loaded), so ``torch.set_num_threads`` sizes them too.

Loading is a step of its own, normbench.norms.speed.load() (which calls :func:`library`): the
engine takes it when it picks the memory format of a scheme whose channels_last speed needs the
kernels, and the benchmarks and tests take it first. :func:`applies` takes the same step the
first time it meets a tensor the kernels could take and no caller has yet, so that a layer
computes the same whichever code built and runs its model.

Used only where it applies: CPU tensors of float32 / float64, 4-d, contiguous in NCHW or
channels_last, outside ``torch.compile`` tracing, not in a forked child. Everything else, and
any machine where the build fails (one warning on stderr), takes the layers' PyTorch path
(normbench.norms.speed.functional, or PyTorch's GroupNorm kernel), which computes the same
maths; ``NORMBENCH_NATIVE=0`` forces that path. The tests run the layers both ways, and
gradcheck runs on the kernels too (they have float64 versions).

The statistics are offset-stable in both layouts: per-(sample, channel) moments from sums shifted
by each plane's first element, accumulated in double, and the backward's sums about the mean
(tests/test_kernel_numerics.py checks float32 against float64 at means of 10 and 100 std).
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import torch

from normbench.norms.speed.native import binding, build

ENABLED = os.environ.get("NORMBENCH_NATIVE", "1") != "0"  # tests switch it per case


def _disable_in_forked_child() -> None:
    """A forked child must not start OpenMP regions in a pool its parent created (libgomp can
    hang there; PyTorch turns its own intra-op parallelism off in forked children for the same
    reason), so the kernels stand down in it and the PyTorch path runs."""
    global ENABLED
    ENABLED = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disable_in_forked_child)

_lib: Optional[ctypes.CDLL] = None
_tried = False
_fns: dict[tuple[str, str], binding.Kernel] = {}


def library() -> Optional[ctypes.CDLL]:
    """Build (or take from the cache) and load the kernels, once per process; the loaded library,
    or None if disabled or the build failed (said once on stderr)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if ENABLED:
            try:
                lib = ctypes.CDLL(str(build.build()))
                _fns.update(binding.bind(lib))
                _lib = lib
            except Exception as err:  # noqa: BLE001  (any failure: fall back, say so once)
                _fns.clear()
                print(f"normbench: fused CPU kernels unavailable ({err}); using the PyTorch path", file=sys.stderr)
                _lib = None
    return _lib


def loaded() -> bool:
    """Whether the kernels are loaded (never builds anything)."""
    return _lib is not None


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels can take ``x`` (and are enabled and available; loaded now if no caller
    has loaded them yet)."""
    if (not ENABLED or x.device.type != "cpu" or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64)
            or torch.compiler.is_compiling()):
        return False
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return False
    return library() is not None


def _layout(x: torch.Tensor) -> int:
    """1 for channels_last storage (NHWC), 0 for NCHW; shapes where both coincide count as NCHW."""
    return 0 if x.is_contiguous() else 1


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's memory layout (a no-op when it already is)."""
    fmt = torch.channels_last if _layout(x) else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) and t.dtype == x.dtype else t.to(x.dtype).contiguous(memory_format=fmt)


def _per_bc(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (broadcastable to (B, C)) as a contiguous (B, C) array of x's dtype."""
    return t.detach().to(x.dtype).expand(x.shape[0], x.shape[1]).contiguous()


def _per_c(t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """t (C values) as a contiguous 1-d array of x's dtype (None stays None)."""
    if t is None or (t.dtype is x.dtype and t.is_contiguous() and t.numel() == x.shape[1]):
        return t  # the common case (a parameter): no copy, no extra op
    return t.detach().to(x.dtype).reshape(x.shape[1]).contiguous()


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _fn(name: str, x: torch.Tensor):
    if not _fns and library() is None:
        raise RuntimeError("normbench's fused CPU kernels are unavailable (see the warning above)")
    return _fns[(name, "f32" if x.dtype == torch.float32 else "f64")]


def _dims(x: torch.Tensor):
    b, c, h, w = x.shape
    return b, c, h * w, _layout(x)


# ----------------------------------------------------------------------------- the passes
# One pass over the activation each. The layers call the one-call kernels further down (which
# run these passes inside C++); the passes are exported so that tests/test_norms.py checks each
# of them on its own against its formula.


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) over (H, W) per sample and channel, each (B, C)."""
    b, c, s, nhwc = _dims(x)
    mean, var = x.new_empty(b, c), x.new_empty(b, c)
    _fn("bc_moments", x)(x.data_ptr(), b, c, s, nhwc, mean.data_ptr(), var.data_ptr())
    return mean, var


def affine(x: torch.Tensor, a: torch.Tensor, k: torch.Tensor, tau: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a x + k (a, k of shape (B, C)), then max(., tau) per channel when tau is given; x's layout."""
    b, c, s, nhwc = _dims(x)
    a, k, tau = _per_bc(a, x), _per_bc(k, x), _per_c(tau, x)
    y = torch.empty_like(x)
    _fn("bc_affine", x)(x.data_ptr(), b, c, s, nhwc, a.data_ptr(), k.data_ptr(), _ptr(tau), y.data_ptr())
    return y


def grad_sums(g: torch.Tensor, x: torch.Tensor, z: Optional[torch.Tensor] = None, tau: Optional[torch.Tensor] = None,
              raw: bool = False, center: Optional[torch.Tensor] = None):
    """(sum g', sum g' (x - center), sum g or None) over (H, W), each (B, C); g' = g where z > tau
    (else 0) when z and tau are given, else g; ``center`` (broadcastable to (B, C)) defaults to 0."""
    b, c, s, nhwc = _dims(x)
    g = _like(g, x)
    z = None if z is None else _like(z, x)
    tau = _per_c(tau, x)
    center = None if center is None else _per_bc(center, x)
    sg, sgx = x.new_empty(b, c), x.new_empty(b, c)
    sgraw = x.new_empty(b, c) if raw else None
    _fn("bc_grad_sums", x)(g.data_ptr(), x.data_ptr(), _ptr(z), _ptr(tau), _ptr(center), b, c, s, nhwc,
                           sg.data_ptr(), sgx.data_ptr(), _ptr(sgraw))
    return sg, sgx, sgraw


def grad_out(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, k1: torch.Tensor, k0: torch.Tensor,
             z: Optional[torch.Tensor] = None, tau: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a g' + k1 x + k0 (a, k1, k0 of shape (B, C); g' as in :func:`grad_sums`); x's layout."""
    b, c, s, nhwc = _dims(x)
    g = _like(g, x)
    z = None if z is None else _like(z, x)
    a, k1, k0, tau = _per_bc(a, x), _per_bc(k1, x), _per_bc(k0, x), _per_c(tau, x)
    gx = torch.empty_like(x)
    _fn("bc_grad_out", x)(g.data_ptr(), x.data_ptr(), _ptr(z), _ptr(tau), b, c, s, nhwc, a.data_ptr(),
                          k1.data_ptr(), k0.data_ptr(), gx.data_ptr())
    return gx


def evo_forward(x: torch.Tensor, v: torch.Tensor, a: torch.Tensor, beta: torch.Tensor):
    """(z, s): s = sigmoid(v x), z = x s a + beta (v, beta per channel, a of shape (B, C)); x's layout."""
    b, c, s, nhwc = _dims(x)
    v, a, beta = _per_c(v, x), _per_bc(a, x), _per_c(beta, x)
    z, sig = torch.empty_like(x), torch.empty_like(x)
    _fn("evo_forward", x)(x.data_ptr(), b, c, s, nhwc, v.data_ptr(), a.data_ptr(), beta.data_ptr(), z.data_ptr(),
                          sig.data_ptr())
    return z, sig


def evo_grad_sums(g: torch.Tensor, x: torch.Tensor, sig: torch.Tensor):
    """(sum g x s, sum g, sum g x^2 s (1 - s)) over (H, W) with s = sigmoid(v x) as stored by
    :func:`evo_forward`, each (B, C)."""
    b, c, s, nhwc = _dims(x)
    g, sig = _like(g, x), _like(sig, x)
    out = [x.new_empty(b, c) for _ in range(3)]
    _fn("evo_grad_sums", x)(g.data_ptr(), x.data_ptr(), sig.data_ptr(), b, c, s, nhwc, *(t.data_ptr() for t in out))
    return tuple(out)


def evo_grad_out(g: torch.Tensor, x: torch.Tensor, sig: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 k1: torch.Tensor, k0: torch.Tensor) -> torch.Tensor:
    """g a (s + v x s (1 - s)) + k1 x + k0 with s = sigmoid(v x) as stored; x's layout."""
    b, c, s, nhwc = _dims(x)
    g, sig = _like(g, x), _like(sig, x)
    v, a, k1, k0 = _per_c(v, x), _per_bc(a, x), _per_bc(k1, x), _per_bc(k0, x)
    gx = torch.empty_like(x)
    _fn("evo_grad_out", x)(g.data_ptr(), x.data_ptr(), sig.data_ptr(), b, c, s, nhwc, v.data_ptr(), a.data_ptr(),
                           k1.data_ptr(), k0.data_ptr(), gx.data_ptr())
    return gx


# ----------------------------------------------------------------------------- one call per layer and direction


def frn_forward(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, tau: Optional[torch.Tensor], eps: float):
    """FRN (+ TLU) forward in one call: (z, inv) with inv = 1 / sqrt(nu^2 + eps) of shape (B, C)."""
    b, c, s, nhwc = _dims(x)
    gamma, beta, tau = _per_c(gamma, x), _per_c(beta, x), _per_c(tau, x)
    z, inv = torch.empty_like(x), x.new_empty(b, c)
    _fn("frn_forward", x)(x.data_ptr(), b, c, s, nhwc, gamma.data_ptr(), beta.data_ptr(), _ptr(tau), float(eps),
                          inv.data_ptr(), z.data_ptr())
    return z, inv


def frn_backward(g: torch.Tensor, x: torch.Tensor, z: Optional[torch.Tensor], tau: Optional[torch.Tensor],
                 gamma: torch.Tensor, inv: torch.Tensor):
    """FRN (+ TLU) backward in one call: (dx, dgamma, dbeta, dtau or None, k) with k (B, C) =
    gamma inv^3 mean(g' x) (a learned eps gets -N/2 sum k)."""
    b, c, s, nhwc = _dims(x)
    g = _like(g, x)
    z = None if z is None else _like(z, x)
    gamma, tau = _per_c(gamma, x), _per_c(tau, x)
    gx = torch.empty_like(x)
    dgamma, dbeta, k = x.new_empty(c), x.new_empty(c), x.new_empty(b, c)
    dtau = x.new_empty(c) if tau is not None else None
    _fn("frn_backward", x)(g.data_ptr(), x.data_ptr(), _ptr(z), _ptr(tau), b, c, s, nhwc, gamma.data_ptr(),
                           inv.data_ptr(), gx.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr(), _ptr(dtau), k.data_ptr())
    return gx, dgamma, dbeta, dtau, k


def evo_forward_full(x: torch.Tensor, v: Optional[torch.Tensor], gamma: torch.Tensor, beta: torch.Tensor,
                     groups: int, eps: float):
    """EvoNorm-S0 forward in one call (v None: group-std scaling only): (z, mean_g, rstd_g, s),
    the group statistics of shape (B, G) and s = sigmoid(v x) for backward (None without v)."""
    b, c, s, nhwc = _dims(x)
    v, gamma, beta = _per_c(v, x), _per_c(gamma, x), _per_c(beta, x)
    z, mean_g, rstd_g = torch.empty_like(x), x.new_empty(b, groups), x.new_empty(b, groups)
    sig = torch.empty_like(x) if v is not None else None
    _fn("evo_forward_full", x)(x.data_ptr(), b, c, s, nhwc, _ptr(v), gamma.data_ptr(), beta.data_ptr(), groups,
                               float(eps), mean_g.data_ptr(), rstd_g.data_ptr(), z.data_ptr(), _ptr(sig))
    return z, mean_g, rstd_g, sig


def evo_backward_full(g: torch.Tensor, x: torch.Tensor, sig: Optional[torch.Tensor], v: Optional[torch.Tensor],
                      gamma: torch.Tensor, groups: int, mean_g: torch.Tensor, rstd_g: torch.Tensor):
    """EvoNorm-S0 backward in one call (sig: the forward's s): (dx, dv or None, dgamma, dbeta)."""
    b, c, s, nhwc = _dims(x)
    g = _like(g, x)
    sig = None if sig is None else _like(sig, x)
    v, gamma = _per_c(v, x), _per_c(gamma, x)
    gx, dgamma, dbeta = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    dv = x.new_empty(c) if v is not None else None
    _fn("evo_backward_full", x)(g.data_ptr(), x.data_ptr(), _ptr(sig), b, c, s, nhwc, _ptr(v), gamma.data_ptr(), groups,
                                mean_g.data_ptr(), rstd_g.data_ptr(), gx.data_ptr(), _ptr(dv), dgamma.data_ptr(),
                                dbeta.data_ptr())
    return gx, dv, dgamma, dbeta


def chunk_starts(sizes: list[int]) -> torch.Tensor:
    """The int64 offsets [0, n_0, n_0 + n_1, ...] of consecutive chunks (for the cbn kernels)."""
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int64)


def can_update_in_place(buffer: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a running-statistics buffer can be handed to the kernels to update in place."""
    return buffer.dtype is x.dtype and buffer.is_contiguous() and buffer.numel() == x.shape[1]


UPDATE_MODES = {"std": 1, "var": 2}  # running-statistics updates the cbn kernel can do in place


def cbn_forward(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, starts: torch.Tensor, eps: float,
                renorm=None, update=None, relu: bool = False, counter: Optional[torch.Tensor] = None):
    """Chunked BatchNorm forward in one call; ``renorm`` = (running_mean, running_std, r_limit,
    d_limit) for Batch Renorm. Returns (y, stats) with stats (6, K, C): per chunk mean, var, rstd,
    A (the scale applied), r and d (r, d only with renorm).

    ``update`` = (mode, mean_buffer, second_buffer, momentum) moves running statistics in place
    (buffers that pass :func:`can_update_in_place`, which the caller checks): mode "std" (Batch
    Renorm, one chunk) towards mean and sqrt(var + eps), after r and d used the old values;
    mode "var" (BatchNorm, Ghost BN per step) towards the n_j / B-weighted chunk means and
    unbiased variances. ``counter`` (an int64 buffer) is then incremented. ``relu``: the output
    is max(y, 0) (a fused ReLU; hand the output to :func:`cbn_backward`)."""
    b, c, s, nhwc = _dims(x)
    k = starts.numel() - 1
    gamma, beta = _per_c(gamma, x), _per_c(beta, x)
    y, stats = torch.empty_like(x), x.new_empty(6, k, c)
    if renorm is not None:
        run_mean, run_std, r_lim, d_lim = renorm
        run_mean, run_std = _per_c(run_mean, x), _per_c(run_std, x)
        r_lim = r_lim if r_lim.dtype == x.dtype else r_lim.to(x.dtype)
        d_lim = d_lim if d_lim.dtype == x.dtype else d_lim.to(x.dtype)
        ptrs = (run_mean.data_ptr(), run_std.data_ptr(), r_lim.data_ptr(), d_lim.data_ptr())
    else:
        ptrs = (None, None, None, None)
    if update is not None:
        mode, upd_mean, upd_second, momentum = update
        if upd_mean.dtype is not x.dtype or upd_second.dtype is not x.dtype or (mode == "std" and k != 1):
            raise ValueError("in-place running statistics need buffers of x's dtype (and one chunk for 'std')")
        upd = (upd_mean.data_ptr(), upd_second.data_ptr(), UPDATE_MODES[mode], float(momentum), _ptr(counter))
    else:
        upd = (None, None, 0, 0.0, None)
    _fn("cbn_forward", x)(x.data_ptr(), b, c, s, nhwc, gamma.data_ptr(), beta.data_ptr(), starts.data_ptr(), k,
                          float(eps), *ptrs, *upd[:4], int(relu), upd[4], y.data_ptr(), stats.data_ptr())
    return y, stats


def cbn_backward(g: torch.Tensor, x: torch.Tensor, starts: torch.Tensor, stats: torch.Tensor, renorm: bool,
                 y: Optional[torch.Tensor] = None):
    """Chunked BatchNorm backward in one call (r, d constants) from the forward's ``stats``:
    (dx, dgamma, dbeta); ``y``: the forward's output when it had a fused ReLU (g is then masked
    where y <= 0)."""
    b, c, s, nhwc = _dims(x)
    g = _like(g, x)
    y = None if y is None else _like(y, x)
    gx, dgamma, dbeta = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    _fn("cbn_backward", x)(g.data_ptr(), x.data_ptr(), b, c, s, nhwc, starts.data_ptr(), starts.numel() - 1,
                           stats.data_ptr(), int(renorm), _ptr(y), gx.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr())
    return gx, dgamma, dbeta


def gn_forward_full(x: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], groups: int,
                    eps: float, relu: bool = False):
    """GroupNorm forward in one call (``relu``: a fused ReLU): (y, mean_g, rstd_g), the group
    statistics of shape (B, G)."""
    b, c, s, nhwc = _dims(x)
    gamma, beta = _per_c(gamma, x), _per_c(beta, x)
    y, mean_g, rstd_g = torch.empty_like(x), x.new_empty(b, groups), x.new_empty(b, groups)
    _fn("gn_forward_full", x)(x.data_ptr(), b, c, s, nhwc, _ptr(gamma), _ptr(beta), groups, float(eps), int(relu),
                              mean_g.data_ptr(), rstd_g.data_ptr(), y.data_ptr())
    return y, mean_g, rstd_g


def gn_backward_full(g: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                     groups: int, mean_g: torch.Tensor, rstd_g: torch.Tensor):
    """GroupNorm backward in one call: (dx, dgamma, dbeta); ``y``: the forward's output when it
    had a fused ReLU (g is then masked where y <= 0)."""
    b, c, s, nhwc = _dims(x)
    g = _like(g, x)
    y = None if y is None else _like(y, x)
    gamma = _per_c(gamma, x)
    gx, dgamma, dbeta = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    _fn("gn_backward_full", x)(g.data_ptr(), x.data_ptr(), _ptr(y), b, c, s, nhwc, _ptr(gamma), groups,
                               mean_g.data_ptr(), rstd_g.data_ptr(), gx.data_ptr(), dgamma.data_ptr(),
                               dbeta.data_ptr())
    return gx, dgamma, dbeta
