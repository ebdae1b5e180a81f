"""FP8 linear weights (docs/QUANTIZATION.md): float8_e4m3fn weights with float32 scales, TP-sharded with them.

`Fp8Scheme` is what a TP linear layer (`strata.layers.linear`) holds when its weights are FP8. It registers the
layer's parameters and loads checkpoint tensors into this rank's shard; the forward is `ops.fp8_linear`.

    weight        [N_local, K_local] float8_e4m3fn
    weight_scale  per row: [N_local] (a checkpoint's per-tensor scale is written on each row of its part, so a
                  packed qkv / gate_up layer keeps every part's own scale, exactly);
                  block-wise: [ceil(N_local / bn), ceil(K_local / bk)] with the layer's `block_size` (bn, bk)
    input_scale   [] (static activations only): the largest of the parts' scales, as they share one input

Block scales are sharded with their weights. Where a part or a TP shard does not start on a block boundary
(a packed part or a shard of rows that is not a multiple of bn, or a K shard not a multiple of bk), the scales
are expanded along that dimension to one per row (bn -> 1) or per column (bk -> 1): exact, a little more memory,
and the layer's `block_size` says so. In steps of more than `ops.ref.FP8_W8A16_MAX_M` tokens the activations are
quantised too (W8A8): for block-wise layers per token and checkpoint-bk columns, else per token (dynamic) or with
the static scale; smaller steps (decode) are weight-only, activations as they are (`ops.fp8_linear`).

Online quantisation (`--quantization fp8`): each 16/32-bit checkpoint part is quantised per row as it is
loaded (scale = amax / 448), so no full-precision copy of the layer is ever held.
"""
from __future__ import annotations

import torch
from torch import nn

from strata import ops
from strata.ops.ref import fp8_quantize_rows

FP8 = torch.float8_e4m3fn


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class Fp8Scheme:
    """The FP8 form of one linear layer. `spec`: the model's `strata.models.config.QuantSpec` (not imported:
    layers sit below models); `parts`: this rank's row count of each packed part (one for a plain layer);
    `n_sharded` / `k_sharded`: whether TP splits rows / columns of the checkpoint tensors."""

    def __init__(self, spec, layer: nn.Module, n: int, k: int, parts: list[int],
                 n_sharded: bool, k_sharded: bool):
        self.spec = spec
        self.act_group = None
        self.block_size = None
        if spec.weight == "block":
            bn, bk = spec.block_size
            n_ok = all(p % bn == 0 for p in parts) or (len(parts) == 1 and not n_sharded)
            k_ok = k % bk == 0 or not k_sharded
            self.ckpt_block = (bn, bk)
            self.block_size = (bn if n_ok else 1, bk if k_ok else 1)
            self.act_group = bk
            shape = (_cdiv(n, self.block_size[0]), _cdiv(k, self.block_size[1]))
        else:
            shape = (n,)
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=FP8), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.ones(shape, dtype=torch.float32), requires_grad=False)
        if spec.activation == "static":
            layer.input_scale = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
        else:
            layer.input_scale = None

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, layer.weight, layer.weight_scale, self.block_size, layer.input_scale,
                              layer.bias, self.act_group)

    # ---- loading
    def load(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, dst: int, src: int, size: int,
             k0: int, kl: int) -> None:
        """Copy this rank's part of checkpoint tensor `loaded` into `param`: rows [src, src + size) of the
        checkpoint tensor go to rows [dst, dst + size), columns [k0, k0 + kl) are this rank's."""
        if param is layer.weight:
            w = loaded.narrow(0, src, size).narrow(1, k0, kl)
            if w.dtype == FP8:
                param.data.narrow(0, dst, size).copy_(w)
                return
            if self.spec.checkpoint and self.spec.weight == "block":
                raise ValueError(f"a {w.dtype} weight in a block-wise FP8 checkpoint (expected float8_e4m3fn)")
            q, s = fp8_quantize_rows(w)  # online, or an unquantised tensor in an FP8 checkpoint: per row
            param.data.narrow(0, dst, size).copy_(q)
            if self.block_size is None:
                layer.weight_scale.data.narrow(0, dst, size).copy_(s)
            return
        if param is layer.input_scale:
            param.data.copy_(torch.maximum(param.data, loaded.float().reshape(())))
            return
        if param is not layer.weight_scale:
            raise ValueError("not an FP8 parameter")
        s = loaded.float()
        if self.block_size is None:
            rows = param.data.narrow(0, dst, size)
            if s.numel() == 1:  # per tensor: the part's one scale on each of its rows
                rows.fill_(s.reshape(()).item())
            else:  # per channel: [N] or [N, 1]
                rows.copy_(s.reshape(-1).narrow(0, src, size))
            return
        self._load_block_scale(param, s, dst, src, size, k0, kl)

    def _load_block_scale(self, param, s: torch.Tensor, dst: int, src: int, size: int, k0: int, kl: int) -> None:
        (bn, bk), (en, ek) = self.ckpt_block, self.block_size
        if s.dim() != 2:
            raise ValueError(f"block-wise weight scale of shape {tuple(s.shape)} (expected 2 dimensions)")
        # rows: checkpoint blocks -> this layer's row granularity (bn, or 1 when expanded)
        if en == 1:
            s = s.repeat_interleave(bn, dim=0).narrow(0, src, size)
            d0, dn = dst, size
        else:
            s = s.narrow(0, src // bn, _cdiv(size, bn))
            d0, dn = dst // bn, _cdiv(size, bn)
        if ek == 1:
            s = s.repeat_interleave(bk, dim=1).narrow(1, k0, kl)
        else:
            s = s.narrow(1, k0 // bk, _cdiv(kl, bk))
        param.data.narrow(0, d0, dn).copy_(s)


@torch.no_grad()
def init_dummy_fp8(layer: nn.Module, generator: torch.Generator) -> None:
    """--load-format dummy: uniform(-0.05, 0.05) weights, stored as FP8 with a scale per row (or block)."""
    w = torch.empty(layer.weight.shape, device=layer.weight.device).uniform_(-0.05, 0.05, generator=generator)
    scale = 0.05 / 448.0
    layer.weight.data.copy_((w / scale).to(FP8))
    layer.weight_scale.data.fill_(scale)
    if getattr(layer, "input_scale", None) is not None:
        layer.input_scale.data.fill_(1.0 / 448.0)
