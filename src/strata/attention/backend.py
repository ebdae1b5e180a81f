"""Attention behind a backend interface. The runner builds one `AttentionMetadata` per step and
publishes it through the forward context; each `Attention` layer reads it from there.

Token order inside a step: all decode tokens (one per sequence) first, then prefill/extend chunks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from strata import ops
from strata.core.errors import ModelLoadError


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, -1 = don't write
    num_decode_tokens: int
    # decode part (first num_decode_tokens tokens)
    decode_block_tables: torch.Tensor | None  # [Bd, max_blocks] int32
    decode_seq_lens: torch.Tensor | None  # [Bd] int32, incl. the new token
    decode_max_seq_len: int
    # prefill part (remaining tokens)
    prefill_block_tables: torch.Tensor | None  # [Bp, max_blocks]
    prefill_query_start_loc: torch.Tensor | None  # [Bp+1], offsets relative to the prefill part
    prefill_seq_lens: torch.Tensor | None  # [Bp]


_ctx: AttentionMetadata | None = None


def get_forward_context() -> AttentionMetadata:
    if _ctx is None:
        raise RuntimeError("attention called outside a forward context")
    return _ctx


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata):
    global _ctx
    prev, _ctx = _ctx, meta
    try:
        yield
    finally:
        _ctx = prev


class Attention(nn.Module):
    """Paged attention for one layer. The runner binds `k_cache`/`v_cache` after allocating the pool.

    `sliding_window` (None = full causal attention): each query sees only its own key and the
    sliding_window - 1 keys before it. Per layer, so models that mix windowed and full layers work.

    `k_scale`/`v_scale`: the layer's FP8 KV-cache scales (float32, one element each; stored = x / scale, read =
    stored * scale), 1.0 unless the checkpoint has them (`load_kv_scale`). Used only when the runner allocated an
    fp8 cache (`--kv-cache-dtype fp8`). They are fixed after loading, so CUDA graphs that read them stay valid."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def load_kv_scale(self, which: str, value: torch.Tensor) -> None:
        """A checkpoint's per-tensor KV-cache scale: which = "k_scale" or "v_scale"."""
        if value.numel() != 1:
            raise ModelLoadError(f"KV-cache {which}: one scale per layer is supported, got shape "
                                 f"{tuple(value.shape)}")
        v = float(value.float().reshape(()))
        if not v > 0 or v == float("inf"):
            raise ModelLoadError(f"KV-cache {which} must be positive and finite, got {v}")
        getattr(self, which).fill_(v)

    def kv_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) for the KV ops: the scales with an fp8 cache, else (None, None)."""
        if self.k_cache is not None and ops.ref.is_fp8_kv(self.k_cache):
            return self.k_scale, self.v_scale
        return None, None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H*d], k/v: [T, kvh*d] -> [T, H*d]."""
        m = get_forward_context()
        T = q.shape[0]
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        ops.reshape_and_cache(k, v, self.k_cache, self.v_cache, m.slot_mapping, *self.kv_scales())
        return self._attend(q, m)

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, rotary, q_norm=None,
                    k_norm=None) -> torch.Tensor:
        """From the fused qkv projection [T, (H + 2 kvh) d]: (q/k RMSNorm,) rotary and the cache write in one
        op (`ops.qkv_epilogue`: one kernel on CUDA), then attention. Returns [T, H*d]."""
        m = get_forward_context()
        q = ops.qkv_epilogue(qkv, positions, rotary.cos_sin_cache, q_norm.weight if q_norm is not None else None,
                             k_norm.weight if k_norm is not None else None,
                             q_norm.eps if q_norm is not None else 0.0, self.k_cache, self.v_cache,
                             m.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim, *self.kv_scales())
        return self._attend(q, m)

    def _attend(self, q: torch.Tensor, m) -> torch.Tensor:
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        nd, w = m.num_decode_tokens, self.sliding_window
        ks, vs = self.kv_scales()
        if nd == T:
            out = ops.paged_decode_attention(q, self.k_cache, self.v_cache, m.decode_block_tables,
                                             m.decode_seq_lens, self.scale, m.decode_max_seq_len, w, ks, vs)
        elif nd == 0:
            out = ops.paged_prefill_attention(q, self.k_cache, self.v_cache, m.prefill_block_tables,
                                              m.prefill_query_start_loc, m.prefill_seq_lens, self.scale, w, ks, vs)
        else:
            out = torch.empty_like(q)
            out[:nd] = ops.paged_decode_attention(q[:nd], self.k_cache, self.v_cache, m.decode_block_tables,
                                                  m.decode_seq_lens, self.scale, m.decode_max_seq_len, w, ks, vs)
            out[nd:] = ops.paged_prefill_attention(q[nd:], self.k_cache, self.v_cache, m.prefill_block_tables,
                                                   m.prefill_query_start_loc, m.prefill_seq_lens, self.scale, w,
                                                   ks, vs)
        return out.view(T, self.num_heads * self.head_dim)
