"""Kernel entry points: the names of `strata.ops.ref`, dispatched per call.

Triton runs when the tensors are on CUDA, triton imports and STRATA_DISABLE_TRITON is unset, or always when
STRATA_FORCE_TRITON=1 (CPU tests, with TRITON_INTERPRET=1 set before triton is imported). Otherwise the
pure-torch twin in `ref.py` runs. triton is imported lazily, on the first call that wants it, so CPU-only
users never pay for it. The environment is read on every call (a dict lookup) so tests can flip it.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from strata.ops import ref
from strata.ops.ref import gather_kv  # noqa: F401  (a twin-only helper, re-exported for completeness)

__all__ = [
    "reshape_and_cache",
    "gather_kv",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "triton_available",
    "use_triton",
]

_tk: ModuleType | None = None
_tk_error: Exception | None = None


def _kernels() -> ModuleType | None:
    """strata.ops.triton_kernels, or None when triton does not import (the error is kept in _tk_error)."""
    global _tk, _tk_error
    if _tk is None and _tk_error is None:
        try:
            from strata.ops import triton_kernels
            _tk = triton_kernels
        except Exception as e:  # ImportError, or a broken triton install
            _tk_error = e
    return _tk


def triton_available() -> bool:
    return _kernels() is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call whose main tensor is `t` goes to Triton."""
    if os.environ.get("STRATA_FORCE_TRITON", "") == "1":
        if _kernels() is None:
            raise RuntimeError(f"STRATA_FORCE_TRITON=1 but triton kernels failed to import: {_tk_error!r}")
        return True
    if t.device.type != "cuda" or os.environ.get("STRATA_DISABLE_TRITON"):
        return False
    return _kernels() is not None


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    if use_triton(key):
        return _tk.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    return ref.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int | None = None) -> torch.Tensor:
    if use_triton(q):
        return _tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)
    return ref.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if use_triton(q):
        return _tk.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)
    return ref.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return _tk.rms_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _tk.fused_add_rms_norm(x, residual, weight, eps)
    return ref.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return _tk.silu_and_mul(x)
    return ref.silu_and_mul(x)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _tk.rotary_embedding(positions, q, k, cos_sin_cache, head_dim)
    return ref.rotary_embedding(positions, q, k, cos_sin_cache, head_dim)
