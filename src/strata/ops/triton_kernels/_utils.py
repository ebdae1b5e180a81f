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
