"""Kernel entry points: the names of `strata.ops.ref`, dispatched per call.

On the CPU, float32 paged decode attention runs the C kernel of `strata.ops.cpu` when it builds.
Triton runs when the tensors are on CUDA, triton imports and STRATA_DISABLE_TRITON is unset, or always when
STRATA_FORCE_TRITON=1 (CPU tests, with TRITON_INTERPRET=1 set before triton is imported). Otherwise the
pure-torch twin in `ref.py` runs. triton is imported lazily, on the first call that wants it, so CPU-only
users never pay for it. The settings (`strata.settings`) are read on every call so tests can flip them.
"""
from __future__ import annotations

from types import ModuleType

import torch

from strata import settings
from strata.ops import cpu, ref
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
    "qkv_epilogue",
    "apply_token_bitmask",
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
    if settings.FORCE_TRITON.get():
        if _kernels() is None:
            raise RuntimeError(f"STRATA_FORCE_TRITON=1 but triton kernels failed to import: {_tk_error!r}")
        return True
    if t.device.type != "cuda" or settings.DISABLE_TRITON.get():
        return False
    return _kernels() is not None


# The KV ops take an fp8 cache (float8_e4m3fn) with per-layer k_scale / v_scale tensors (ref.py's docstring).
def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> None:
    if use_triton(key):
        return _tk.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return ref.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int | None = None, sliding_window: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(q):
        return _tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len,
                                          sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale)
    # the C kernel reads float32 caches only: with an fp8 cache it declines (None) and the twin runs
    if q.device.type == "cpu" and (out := cpu.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                                     scale, sliding_window)) is not None:
        return out
    return ref.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len,
                                      sliding_window, k_scale, v_scale)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float,
                            sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(q):
        return _tk.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                           sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale)
    return ref.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                       sliding_window, k_scale, v_scale)


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


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Structured outputs: forbidden tokens of logits[rows] to -inf, in place (see ref.apply_token_bitmask)."""
    if use_triton(logits):
        return _tk.apply_token_bitmask(logits, bitmask, rows)
    return ref.apply_token_bitmask(logits, bitmask, rows)


# The fused epilogue is checked against the composition of the unfused kernels on the real device once, at
# the runner's warm-up (`check_fused_qkv_epilogue`); a mismatch turns it off for the process, with a warning.
_fused_epilogue_ok = True


def qkv_epilogue(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
    args = (qkv, positions, cos_sin_cache, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
            num_heads, num_kv_heads, head_dim)
    # the fused kernel stores K/V in the cache's dtype unscaled: an fp8 cache takes the unfused kernels
    if use_triton(qkv) and _fused_epilogue_ok and not ref.is_fp8_kv(k_cache):
        return _tk.qkv_epilogue(*args)
    return ref.qkv_epilogue(*args, ops=_this(), k_scale=k_scale, v_scale=v_scale)


def _this():
    import sys
    return sys.modules[__name__]


def check_fused_qkv_epilogue(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                             head_dim: int, qk_norm: bool, eps: float = 1e-6) -> bool:
    """Run the fused kernel and the unfused kernels on the same random inputs on `device`; disable the fused
    one for this process if they disagree. Returns whether the fused kernel is in use."""
    global _fused_epilogue_ok
    if not use_triton(torch.empty(0, device=device)):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    T, bs, nb = 5, 16, 4
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(T, width, generator=g).to(device=device, dtype=dtype)
    pos = torch.tensor([0, 3, 17, 40, 63], device=device)
    freqs = torch.outer(torch.arange(64).float(), torch.rand(head_dim // 2, generator=g))
    cs = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
    w = (torch.rand(head_dim, generator=g) + 0.5).to(device=device, dtype=dtype) if qk_norm else None
    slots = torch.tensor([1, 18, -1, 40, 63], device=device)
    caches = [torch.zeros(nb, bs, num_kv_heads, head_dim, device=device, dtype=dtype) for _ in range(4)]
    q1 = _tk.qkv_epilogue(qkv, pos, cs, w, w, eps, caches[0], caches[1], slots, num_heads, num_kv_heads, head_dim)
    q2 = ref.qkv_epilogue(qkv, pos, cs, w, w, eps, caches[2], caches[3], slots, num_heads, num_kv_heads, head_dim,
                          ops=_this())
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    ok = all(torch.allclose(a.float(), b.float(), **tol) for a, b in ((q1, q2), (caches[0], caches[2]),
                                                                   (caches[1], caches[3])))
    if not ok:
        import logging
        logging.getLogger("strata.ops").warning("fused qkv epilogue disagrees with the unfused kernels on %s; "
                                                "using the unfused ones", device)
        _fused_epilogue_ok = False
    return ok




# ---- FP8 linear layers (docs/QUANTIZATION.md). Up to ref.FP8_W8A16_MAX_M rows: weight-only, the Triton W8A16
# kernel; more: activations quantised, torch._scaled_mm or the Triton W8A8 kernel (triton_kernels/fp8_gemm.py).
# Elsewhere (and on GPUs older than sm_89, which have no e4m3) the twin, which dequantises on every call (correct,
# not fast) and follows the same rule on M.
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               block_size: tuple[int, int] | None = None, input_scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, act_group: int | None = None) -> torch.Tensor:
    if not use_triton(x) or not _tk.fp8_supported(x.device):
        return ref.fp8_linear(x, weight, weight_scale, block_size, input_scale, bias, act_group)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] <= ref.FP8_W8A16_MAX_M:
        y = _tk.fp8_w8a16_linear(x2, weight, weight_scale, block_size, bias)
    else:
        y = _tk.fp8_w8a8_linear(x2, weight, weight_scale, block_size, input_scale, bias, act_group)
    return y.reshape(*x.shape[:-1], weight.shape[0])
