"""Torch twin of the fused MoE kernel (`strata.ops.triton_kernels.fused_moe`): same arguments, same result.

    fused_moe(x, w13, w2, topk_weights, topk_ids) -> [T, H]
    select_experts(router_logits, top_k, renormalize) -> (topk_weights, topk_ids)   (twin of the routing kernel)
    x: [T, H]; w13: [E, 2I, H] (gate rows then up rows); w2: [E, H, I]
    topk_weights: [T, k] (any float dtype, applied in fp32); topk_ids: [T, k] int, ids outside [0, E) are skipped
    (with expert_offset=o, ids outside [o, o + E): an expert-parallel rank's share)
    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = topk_ids[t, j]

Each expert's GEMMs run in the input dtype (as the model's linears do); the weighted sum over the k choices is
accumulated in fp32 and rounded once.

FP8 experts (weight-only, W8A16): w13 / w2 float8_e4m3fn with w13_scale / w2_scale, per output row [E, N], or
per block [E, ceil(N / bn), ceil(K / bk)] with w13_block / w2_block = (bn, bk). Each expert that a pair uses is
dequantised (`strata.ops.ref.fp8_dequantize`) to the input dtype; the activations are not quantised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.ops.ref import fp8_dequantize


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """(order, counts): pair indices (t * k + j) sorted by expert, stable; pairs per expert [E] (invalid ids dropped)."""
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    order = torch.argsort(torch.where(valid, flat, num_experts), stable=True)
    order = order[: int(valid.sum())]
    counts = torch.bincount(flat[valid], minlength=num_experts)
    return order, counts


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax over experts in fp32, top-k, optional renormalisation: (weights fp32 [T, k], ids int64 [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on its rows: x [n, H], w13 [2I, H], w2 [H, I] -> [n, H]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def expert_weight(w: torch.Tensor, e: int, scale: torch.Tensor | None, block: tuple[int, int] | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """Expert e's weight in `dtype`: as stored, or dequantised from FP8 with its row or block scales."""
    if scale is None:
        if w.dtype == torch.float8_e4m3fn:
            raise ValueError("float8_e4m3fn expert weights need their scale")
        return w[e]
    return fp8_dequantize(w[e], scale[e], block).to(dtype)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, expert_offset: int = 0, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, w13_block: tuple[int, int] | None = None,
              w2_block: tuple[int, int] | None = None) -> torch.Tensor:
    """expert_offset: topk_ids are global ids and w13 / w2 hold experts [offset, offset + E); others skipped.
    FP8 experts: see the module docstring."""
    if expert_offset:
        topk_ids = topk_ids - expert_offset
    T, H = x.shape
    k = topk_ids.shape[1]
    E = w13.shape[0]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    order, counts = sort_by_expert(topk_ids, E)
    weights = topk_weights.reshape(-1).float()
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        pairs = order[start:start + c]
        start += c
        tok = pairs // k
        y = expert_mlp(x[tok], expert_weight(w13, e, w13_scale, w13_block, x.dtype),
                       expert_weight(w2, e, w2_scale, w2_block, x.dtype))  # [c, H]
        out.index_add_(0, tok, y.float() * weights[pairs, None])
    return out.to(x.dtype)
