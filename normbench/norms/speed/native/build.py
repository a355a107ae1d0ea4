"""Compiling fused.cpp into a shared library, against the prototypes of binding.KERNELS.

The library is built with the system's C++ compiler (``g++ -O3 -march=native -fopenmp``, a few
seconds) into ``$NORMBENCH_NATIVE_CACHE`` (default ``~/.cache/normbench/native``), under a name
keyed by a hash of the source, the generated header, the flags, the compiler's version and the
CPU's feature flags, so a changed kernel or declaration builds afresh and an unchanged one loads
from the cache. The header of :func:`binding.header` is force-included (``-include``): a kernel
defined with other parameters than its declaration, or exported without one, fails the build.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from normbench.norms.speed.native import binding

SOURCE = Path(__file__).with_name("fused.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]
CHECK_FLAGS = ["-Werror=missing-declarations"]  # every exported kernel is declared in binding.KERNELS


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    return cxx


def cache_dir() -> Path:
    return Path(os.environ.get("NORMBENCH_NATIVE_CACHE", Path.home() / ".cache" / "normbench" / "native"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _first_error(stderr: str, returncode: int) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line]
    return (errors or lines or [f"exit {returncode}"])[0]


def compile_source(out: Path | None, kernels: dict[str, str] = binding.KERNELS, cxx: str | None = None) -> None:
    """Compile fused.cpp against the prototypes of ``kernels`` into ``out``; ``out=None`` only
    checks (``-fsyntax-only``: the source against the declarations, no code generated).
    RuntimeError with the compiler's first error when it fails."""
    cxx = cxx or compiler()
    with tempfile.TemporaryDirectory(prefix="normbench-native-") as tmp:
        hdr = Path(tmp) / "fused_kernels.h"
        hdr.write_text(binding.header(kernels))
        target = ["-fsyntax-only"] if out is None else ["-o", str(out)]
        res = subprocess.run([cxx, *FLAGS, *CHECK_FLAGS, "-include", str(hdr), str(SOURCE), *target],
                             capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{cxx} failed: {_first_error(res.stderr, res.returncode)}")


def build() -> Path:
    """The shared library for this source, declaration, compiler and CPU: from the cache, or
    compiled now (atomically: concurrent builders, e.g. sweep workers, never see half a file)."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), binding.header(), " ".join(FLAGS + CHECK_FLAGS), version,
                                    _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / f"fused-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            compile_source(Path(tmp), cxx=cxx)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target
