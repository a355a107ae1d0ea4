"""The one declaration of the fused kernels' C interface, and everything derived from it.

:data:`KERNELS` names each kernel of fused.cpp with its parameters, written as C (``T`` stands
for the element type: each kernel exists as ``<name>_f32`` with float and ``<name>_f64`` with
double). From this table alone come

* :func:`header`: the C prototypes, which the build force-includes in front of fused.cpp
  (``g++ -include``). A definition in fused.cpp whose parameters differ from its declaration is
  then a compile error ("conflicting declaration of C function"), and
  ``-Werror=missing-declarations`` makes an exported kernel missing from the table one too;
* :func:`argtypes`: the ctypes argument types of each loaded function;
* :class:`Kernel`: the callable the Python wrappers use, which refuses a call with any other
  number of arguments (ctypes alone accepts extra ones and passes them on, unchecked).

So the Python side and the C++ side cannot disagree on a signature without the build or the
call failing; tests/test_norms.py compiles fused.cpp against wrong tables to check that they do.
"""
from __future__ import annotations

import ctypes
import re
from typing import NamedTuple

ELEMENT_TYPES = {"f32": "float", "f64": "double"}  # symbol suffix -> what T stands for

# pointers first, then the shape (B, C, S = H * W) and the layout flag (1: NHWC), then the rest
KERNELS: dict[str, str] = {
    "bc_moments": "const T* x, int64_t B, int64_t C, int64_t S, int nhwc, T* mean, T* var",
    "bc_affine": "const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* A, const T* K, const T* tau, T* y",
    "bc_grad_sums": ("const T* g, const T* x, const T* z, const T* tau, const T* center, int64_t B, int64_t C, "
                     "int64_t S, int nhwc, T* sg, T* sgx, T* sgraw"),
    "bc_grad_out": ("const T* g, const T* x, const T* z, const T* tau, int64_t B, int64_t C, int64_t S, int nhwc, "
                    "const T* A, const T* K1, const T* K0, T* gx"),
    "evo_forward": ("const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* v, const T* A, const T* beta, "
                    "T* z, T* sig"),
    "evo_grad_sums": ("const T* g, const T* x, const T* sig, int64_t B, int64_t C, int64_t S, int nhwc, T* sgq, "
                      "T* sg, T* sgv"),
    "evo_grad_out": ("const T* g, const T* x, const T* sig, int64_t B, int64_t C, int64_t S, int nhwc, const T* v, "
                     "const T* A, const T* K1, const T* K0, T* gx"),
    "frn_forward": ("const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* gamma, const T* beta, "
                    "const T* tau, double eps, T* inv, T* z"),
    "frn_backward": ("const T* g, const T* x, const T* z, const T* tau, int64_t B, int64_t C, int64_t S, int nhwc, "
                     "const T* gamma, const T* inv, T* gx, T* dgamma, T* dbeta, T* dtau, T* kout"),
    "evo_forward_full": ("const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* v, const T* gamma, "
                         "const T* beta, int64_t G, double eps, T* mean_g, T* rstd_g, T* z, T* sig"),
    "evo_backward_full": ("const T* g, const T* x, const T* sig, int64_t B, int64_t C, int64_t S, int nhwc, "
                          "const T* v, const T* gamma, int64_t G, const T* mean_g, const T* rstd_g, T* gx, T* dv, "
                          "T* dgamma, T* dbeta"),
    "gn_forward_full": ("const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* gamma, const T* beta, "
                        "int64_t G, double eps, int relu, T* mean_g, T* rstd_g, T* y"),
    "gn_backward_full": ("const T* g, const T* x, const T* y, int64_t B, int64_t C, int64_t S, int nhwc, "
                         "const T* gamma, int64_t G, const T* mean_g, const T* rstd_g, T* gx, T* dgamma, T* dbeta"),
    "cbn_forward": ("const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const T* gamma, const T* beta, "
                    "const int64_t* start, int64_t K, double eps, const T* run_mean, const T* run_std, "
                    "const T* r_lim, const T* d_lim, T* upd_mean, T* upd_second, int update_mode, double momentum, "
                    "int relu, int64_t* counter, T* y, T* stats"),
    "cbn_backward": ("const T* g, const T* x, int64_t B, int64_t C, int64_t S, int nhwc, const int64_t* start, "
                     "int64_t K, const T* stats, int renorm, const T* y, T* gx, T* dgamma, T* dbeta"),
}

# the C types a parameter may have, and how ctypes passes each (pointers: a tensor's data_ptr() or None)
C_TYPES = {
    "const T*": ctypes.c_void_p, "T*": ctypes.c_void_p,
    "const int64_t*": ctypes.c_void_p, "int64_t*": ctypes.c_void_p,
    "int64_t": ctypes.c_int64, "int": ctypes.c_int, "double": ctypes.c_double,
}


_T = re.compile(r"\bT\b")


class Param(NamedTuple):
    name: str
    ctype: str  # one of C_TYPES


def parse(decl: str) -> tuple[Param, ...]:
    """The parameters of one declaration string ("const T* x, int64_t B, ..."); ValueError on a
    type outside :data:`C_TYPES`, a bad or repeated name."""
    params = []
    for part in decl.split(","):
        words = part.replace("*", "* ").split()
        if len(words) < 2:
            raise ValueError(f"parameter {part.strip()!r}: expected a C type and a name")
        ctype, name = " ".join(words[:-1]).replace(" *", "*"), words[-1]
        if ctype not in C_TYPES:
            raise ValueError(f"parameter {name}: type {ctype!r} is not one of {', '.join(C_TYPES)}")
        if not name.isidentifier() or name in (p.name for p in params):
            raise ValueError(f"parameter name {name!r} is not a new identifier")
        params.append(Param(name, ctype))
    return tuple(params)


def signatures(kernels: dict[str, str] = KERNELS) -> dict[str, tuple[Param, ...]]:
    return {name: parse(decl) for name, decl in kernels.items()}


def argtypes(params: tuple[Param, ...]) -> list:
    return [C_TYPES[p.ctype] for p in params]


def header(kernels: dict[str, str] = KERNELS) -> str:
    """C prototypes of every kernel in both element types (a header fused.cpp is compiled against)."""
    lines = ["// Generated from normbench/norms/speed/native/binding.py (KERNELS); do not edit.",
             "#include <cstdint>", 'extern "C" {']
    for name, params in signatures(kernels).items():
        for suffix, element in ELEMENT_TYPES.items():
            args = ", ".join(f"{_T.sub(element, p.ctype)} {p.name}" for p in params)
            lines.append(f"void {name}_{suffix}({args});")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Kernel:
    """One loaded kernel (``name_f32`` / ``name_f64``): ctypes argument types from the
    declaration, and a call with exactly the declared number of arguments."""

    __slots__ = ("symbol", "params", "_fn")

    def __init__(self, library: ctypes.CDLL, symbol: str, params: tuple[Param, ...]):
        fn = getattr(library, symbol)  # AttributeError: declared but not exported by the library
        fn.argtypes, fn.restype = argtypes(params), None
        self.symbol, self.params, self._fn = symbol, params, fn

    def __call__(self, *args) -> None:
        if len(args) != len(self.params):
            raise TypeError(f"{self.symbol} takes {len(self.params)} arguments "
                            f"({', '.join(p.name for p in self.params)}); got {len(args)}")
        self._fn(*args)


def bind(library: ctypes.CDLL, kernels: dict[str, str] = KERNELS) -> dict[tuple[str, str], Kernel]:
    """{(name, suffix): Kernel} for every declared kernel; a symbol the library lacks is an error."""
    table = {}
    for name, params in signatures(kernels).items():
        for suffix in ELEMENT_TYPES:
            try:
                table[(name, suffix)] = Kernel(library, f"{name}_{suffix}", params)
            except AttributeError:
                raise RuntimeError(f"the kernel library has no {name}_{suffix}, which binding.KERNELS "
                                   "declares") from None
    return table
