"""CPU kernels in C, built on first use with the system's C compiler and loaded with ctypes.

torch's CPU ops cannot read the paged KV cache in place: decode attention gathered every sequence's blocks into
a padded copy, then ran SDPA over it, and on 2 cores that was half of a decode step. `paged_decode.c` reads the
blocks where they are. It is built once per machine (`cc -O3 -march=native`, no torch headers: well under a
second) into `$XDG_CACHE_HOME/strata/cpu-kernels/`, keyed by the source, the compiler and the CPU's flags.
Without a compiler, or with `STRATA_CPU_KERNELS=0`, the torch twin in `strata.ops.ref` runs; the reason is
logged once. The twin is what the kernel is tested against (tests/test_cpu_kernels.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from strata import settings

log = logging.getLogger("strata.ops")

_SRC = os.path.join(os.path.dirname(__file__), "paged_decode.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared"]
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "strata", "cpu-kernels")


def _build() -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    with open(_SRC, "rb") as f:
        src = f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(b"\0".join([src, " ".join(_FLAGS).encode(), repr(version).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"paged_decode-{key}.so")
    if not os.path.isfile(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        try:
            r = subprocess.run([cc, *_FLAGS, "-o", tmp, _SRC, "-lpthread", "-lm"], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}")
            os.replace(tmp, path)  # atomic: two processes building at once both end with a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(path)
    f = lib.strata_paged_decode_f32
    f.restype = ctypes.c_int
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    f.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, i32, ctypes.c_float, i32, i32]
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernels, or None (compiler missing or build failed: logged once; or disabled by setting)."""
    global _lib, _error
    if not settings.CPU_KERNELS.get():
        return None
    if _lib is None and _error is None:
        try:
            _lib = _build()
        except Exception as e:  # no compiler, a read-only cache, a failed build: the twin runs instead
            _error = str(e)
            log.warning("CPU kernels unavailable, using the torch twins (slower): %s", _error)
    return _lib


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor | None:
    """The kernel's answer, or None when it does not apply (not float32 on the CPU, e.g. an fp8 KV cache, which
    the torch twin reads; or no kernel library)."""
    if not (q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and q.device.type == "cpu"
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    lib = library()
    if lib is None:
        return None
    B, H, d = q.shape
    _, bs, kvh, dk = k_cache.shape
    if dk != d or H % kvh:
        return None
    q = q.contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    # the C code trusts its indices: check them here (a few hundred ints) rather than read out of bounds
    if B and (int(lens.max()) > bt.shape[-1] * bs or int(lens.min()) < 1
              or int(bt.min()) < 0 or int(bt.max()) >= k_cache.shape[0]):
        raise ValueError(f"paged decode attention: seq_lens {lens.tolist()} or block ids outside a table of "
                         f"{bt.shape[-1]} blocks of {bs} over a cache of {k_cache.shape[0]} blocks")
    out = torch.empty_like(q)
    rc = lib.strata_paged_decode_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), bt.data_ptr(),
                                     bt.stride(0) if bt.dim() == 2 and B else 0, lens.data_ptr(), out.data_ptr(),
                                     B, H, kvh, d, bs, float(scale), int(sliding_window or 0),
                                     torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"strata_paged_decode_f32 failed with status {rc}")
    return out
