"""Build (once) and load the CPU kernel: ``kernel.cpp`` (ternary product), ``head.cpp`` (float lm_head GEMV) and
``layer.cpp`` (the decode step's norms / attention / SwiGLU) -> one shared library loaded with ctypes.

Why ctypes and a plain ``g++`` call rather than a torch C++ extension: the kernel needs no torch headers (it works
on raw pointers), so it compiles in about a second with no ninja and no coupling to the torch ABI, and the build
cannot break when torch is upgraded. ``-march=native`` picks the widest dot-product instructions of the machine it
is built on (AVX-512 VNNI, else AVX2, else scalar C++), so the library is cached per source, flags and CPU: in
``$BITKERNELS_CACHE`` or ``~/.cache/bitkernels/cpu_ref``. ``$BITKERNELS_CPU_MARCH`` (default ``native``) builds for an older
target instead, e.g. ``haswell`` (AVX2) or ``x86-64`` (scalar): the only way to run and measure those paths on a
newer CPU. OpenMP links ``libgomp.so.1``, the same soname as the
runtime that pip's torch loads, so both share one thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import re
import shutil
import subprocess
import tempfile
import threading

SOURCE = pathlib.Path(__file__).with_name("kernel.cpp")
HEAD_SOURCE = pathlib.Path(__file__).with_name("head.cpp")
LAYER_SOURCE = pathlib.Path(__file__).with_name("layer.cpp")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno",
         "-ffp-contract=off"]  # no FMA contraction: the epilogue rounds like torch's separate mul and add
_lock = threading.Lock()
_lib = None


class KernelBuildError(RuntimeError):
    pass


def cache_dir() -> pathlib.Path:
    root = os.environ.get("BITKERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bitkernels")
    return pathlib.Path(root) / "cpu_ref"


def _march_flag() -> str:
    march = os.environ.get("BITKERNELS_CPU_MARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", march):
        raise KernelBuildError(f"BITKERNELS_CPU_MARCH={march!r} is not a -march target (e.g. native, haswell, "
                               "skylake-avx512, x86-64)")
    return f"-march={march}"


def _flags() -> list[str]:
    return [*FLAGS, _march_flag()]


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise KernelBuildError(
            "cpu_ref needs a C++ compiler with OpenMP to build its kernel (none of $CXX, g++, c++, clang++ found). "
            "Install one, e.g. `apt-get install g++` (Debian/Ubuntu) or `conda install gxx_linux-64`.")
    return cxx


def _torch_openmp_link_flags() -> list[str]:
    """Link flags that make the kernel use torch's own OpenMP runtime when torch bundles one under another soname
    (auditwheel's ``libgomp-<hash>.so.1``): two runtimes would keep two spinning thread pools fighting for cores."""
    import glob

    import torch

    root = pathlib.Path(torch.__file__).parent
    found = sorted(glob.glob(str(root / "lib" / "libgomp*.so*")) + glob.glob(str(root.parent / "torch.libs" / "libgomp*.so*")))
    if not found or pathlib.Path(found[0]).name == "libgomp.so.1":  # same soname: the loader shares it already
        return []
    lib = pathlib.Path(found[0])
    return ["-Wl,--as-needed", f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]


def _sources() -> list[pathlib.Path]:
    return [SOURCE, HEAD_SOURCE, LAYER_SOURCE]


def library_path() -> pathlib.Path:
    cxx = _compiler()
    sources = b"".join(s.read_bytes() for s in _sources())
    setup = " ".join([cxx, *_flags(), *_torch_openmp_link_flags(), _cpu_signature()]).encode()
    key = hashlib.sha256(sources + setup).hexdigest()[:16]
    return cache_dir() / f"ternary_kernel-{key}.so"


def build(verbose: bool = False) -> pathlib.Path:
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name in the same folder, then rename: concurrent builders never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [_compiler(), *_flags(), *map(str, _sources()), "-o", tmp, *_torch_openmp_link_flags()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"building the cpu_ref kernel failed:\n$ {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    if verbose:
        print(" ".join(cmd))
    os.replace(tmp, path)
    return path


def load() -> ctypes.CDLL:
    """The kernel library, built on first use."""
    global _lib
    with _lock:
        if _lib is None:
            import torch  # noqa: F401  (load torch's libgomp first so the kernel shares its OpenMP runtime)

            lib = ctypes.CDLL(str(build()))
            P, I, I64, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
            lib.tk_isa.restype = ctypes.c_char_p
            lib.tk_gemm_i32.argtypes = [P, I, I64, P, I64, P, I]
            lib.tk_gemm_i32.restype = None
            lib.tk_quantize.argtypes = [P, I, I64, I64, P, P, F, F, P, P, I]
            lib.tk_quantize.restype = None
            lib.tk_bitlinear_f32.argtypes = [P, I, I64, I64, P, P, F, F, P, I64, P, I, P, P, I]
            lib.tk_bitlinear_f32.restype = None
            lib.tk_linear.argtypes = [P, P, I, P, P, I]
            lib.tk_linear.restype = None
            lib.tk_linear_desc_size.argtypes = []
            lib.tk_linear_desc_size.restype = I64
            lib.tk_layer_vectorized.restype = I
            lib.tk_attn_desc_size.restype = I64
            lib.tk_add_rmsnorm.argtypes = [I, P, P, P, F, I64, P]
            lib.tk_add_rmsnorm.restype = None
            lib.tk_swiglu.argtypes = [I, P, P, I64, P]
            lib.tk_swiglu.restype = None
            lib.tk_attn_decode.argtypes = [P, P, P, P, P, P, I64, P, I]
            lib.tk_attn_decode.restype = None
            for name in ("tk_head_f32", "tk_head_bf16"):
                getattr(lib, name).argtypes = [P, I64, I64, P, I, P, I]
                getattr(lib, name).restype = None
            from .layer_ops import AttnDesc
            from .ops import _LinearDesc

            for c_size, struct in ((lib.tk_linear_desc_size(), _LinearDesc), (lib.tk_attn_desc_size(), AttnDesc)):
                if c_size != ctypes.sizeof(struct):
                    raise KernelBuildError(f"the C struct behind {struct.__name__} is {c_size} bytes, the ctypes "
                                           f"one {ctypes.sizeof(struct)}: keep them in sync")
            _lib = lib
    return _lib


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime files mapped in this process (one is the healthy case)."""
    load()
    try:
        return sorted({line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line or "libiomp" in line})
    except OSError:
        return []


def isa() -> str:
    """The instruction set the kernel was compiled for: 'avx512vnni', 'avx2' or 'scalar'."""
    return load().tk_isa().decode()
