"""silu_and_mul: x [T, 2I] (gate | up) -> silu(gate) * up, computed in fp32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, s_xt, s_ot, I, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + t * s_xt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * s_xt + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + t * s_ot + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    I = shape[-1] // 2
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    out = torch.empty((T, I), dtype=x.dtype, device=x.device)
    if T > 0 and I > 0:
        BLOCK = 1024
        _silu_and_mul_kernel[(T, triton.cdiv(I, BLOCK))](x2, out, x2.stride(0), out.stride(0), I,
                                                        BLOCK=BLOCK, num_warps=4)
    return out.view(*shape[:-1], I)
