"""Small host-side helpers shared by the kernel launchers."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 132 (an H100/H200) where there is no CUDA device (interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots (matching the twins); half types ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then take the interpreter-safe dot, see `mm`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def mm(a, b, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    """tl.dot(a, b) with an fp32 result. The CPU interpreter multiplies bf16 operands as raw uint16 (triton
    3.9), so there the operands are widened to fp32 first; rounding them to bf16 beforehand is the caller's."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


_KERNEL_MODULES = ("activation", "cache", "decode_attention", "epilogue", "fused_moe", "norm", "prefill_attention",
                   "rotary")


def compiled_variants() -> dict[str, int]:
    """Compiled variants per Triton kernel in this process (kernel name -> count, summed over devices).

    Benchmarks read it before and after a timed run: a kernel that compiles during serving stalls that step by
    the compile time (hundreds of ms), so the difference should be zero after warm-up. Empty under the
    interpreter, which compiles nothing."""
    import importlib

    from triton.runtime.jit import JITFunction

    counts: dict[str, int] = {}
    for mod in _KERNEL_MODULES:
        m = importlib.import_module(f"strata.ops.triton_kernels.{mod}")
        for name, fn in vars(m).items():
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                caches = getattr(fn, "device_caches", None) or {}
                n = sum(len(c[0]) for c in caches.values())
                if n:
                    counts[name] = n
    return counts
