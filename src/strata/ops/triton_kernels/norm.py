"""rms_norm and fused_add_rms_norm: one program per row, fp32 statistics."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import next_pow2


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, s_x, s_o, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    y = x * tl.rsqrt(var + eps) * w
    tl.store(out_ptr + row * s_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, s_x, s_r, s_o, s_ro, N, eps,
                               BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * s_r + cols, mask=mask, other=0.0).to(tl.float32)
    # The sum is rounded to the residual dtype first: the norm reads the stored residual, as the twin does.
    s = (x + r).to(rout_ptr.dtype.element_ty)
    tl.store(rout_ptr + row * s_ro + cols, s, mask=mask)
    sf = s.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(sf * sf, axis=0) / N
    y = sf * tl.rsqrt(var + eps) * w
    tl.store(out_ptr + row * s_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_cfg(N: int) -> tuple[int, int]:
    BLOCK = next_pow2(N)
    return BLOCK, min(16, max(1, BLOCK // 512))


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Twin: half types keep x's dtype; fp32 x follows torch promotion with the weight.
    return x.dtype if x.dtype != torch.float32 else torch.promote_types(torch.float32, weight.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    N = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=_out_dtype(x, weight), device=x.device)
    if x2.shape[0] > 0:
        BLOCK, warps = _launch_cfg(N)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), N, float(eps),
                                         BLOCK=BLOCK, num_warps=warps)
    return out.view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) as new tensors; inputs are left untouched."""
    assert x.shape == residual.shape, (x.shape, residual.shape)
    N = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    rdtype = torch.promote_types(x.dtype, residual.dtype)
    r_out = torch.empty(x2.shape, dtype=rdtype, device=x.device)
    probe = torch.empty(0, dtype=rdtype)
    out = torch.empty(x2.shape, dtype=_out_dtype(probe, weight), device=x.device)
    if x2.shape[0] > 0:
        BLOCK, warps = _launch_cfg(N)
        _fused_add_rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, r_out, x2.stride(0), r2.stride(0), out.stride(0), r_out.stride(0), N, float(eps),
            BLOCK=BLOCK, num_warps=warps)
    return out.view(x.shape), r_out.view(x.shape)
