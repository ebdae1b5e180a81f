"""Tensor-parallel linear layers. Each parameter knows how it is sharded through its `weight_loader`,
which copies only this rank's shard of a full checkpoint tensor. At TP size 1 they are plain linears.

Each layer says which rows of a checkpoint tensor (of a packed part: `shard_id`) are this rank's and where they
go (`out_slice`), and which columns (`in_slice`); weights, biases and FP8 scales are all copied through that.
With `quant` (a `QuantSpec`) the weights are FP8 (`strata.layers.quant.Fp8Scheme`) and the forward is
`ops.fp8_linear`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.parallel import state as ps


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by tensor_parallel_size ({b})")
    return a // b


class LinearBase(nn.Module):
    n_sharded = False  # TP splits the checkpoint's rows (column-parallel)
    k_sharded = False  # TP splits its columns (row-parallel)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None,
                 quant=None, parts: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # this rank's
        self.quant = None
        if quant is not None:
            from strata.layers.quant import Fp8Scheme
            self.quant = Fp8Scheme(quant, self, out_features, in_features, parts or [out_features],
                                   self.n_sharded, self.k_sharded)
            if self.input_scale is not None:
                self.input_scale.weight_loader = self.weight_loader
            self.weight_scale.weight_loader = self.weight_loader
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def out_slice(self, shard_id) -> tuple[int, int, int]:
        """(destination row, source row, rows) of this rank's part of a checkpoint tensor."""
        return 0, 0, self.out_features

    def in_slice(self) -> tuple[int, int]:
        """(source column, columns) of this rank's part of a checkpoint weight."""
        return 0, self.in_features

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        dst, src, size = self.out_slice(shard_id)
        k0, kl = self.in_slice()
        if param is self.bias:
            if self.k_sharded and self.tp_rank != 0:  # added once, on rank 0
                loaded = torch.zeros_like(loaded)
            param.data.narrow(0, dst, size).copy_(loaded.narrow(0, src, size))
        elif self.quant is not None:
            self.quant.load(self, param, loaded, dst, src, size, k0, kl)
        else:
            param.data.narrow(0, dst, size).copy_(loaded.narrow(0, src, size).narrow(1, k0, kl))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.apply(self, x)
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Splits the output dimension; output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, quant=None,
                 parts: list[int] | None = None):
        self.tp_rank, self.tp_size = ps.tp().rank_in_group, ps.tp().size
        self.n_sharded = self.tp_size > 1
        super().__init__(in_features, _divide(out_features, self.tp_size, "output features"), bias, dtype, quant,
                         parts)

    def out_slice(self, shard_id):
        n = self.out_features
        return 0, self.tp_rank * n, n


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs packed in one matrix (gate_up_proj): shard_id indexes the part."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, dtype=None, quant=None):
        self.output_sizes = output_sizes
        tp = ps.tp().size
        super().__init__(in_features, sum(output_sizes), bias, dtype, quant,
                         [_divide(s, tp, "output features") for s in output_sizes])

    def out_slice(self, shard_id):
        part = self.output_sizes[shard_id] // self.tp_size
        off = sum(self.output_sizes[:shard_id]) // self.tp_size
        return off, self.tp_rank * part, part


class QKVParallelLinear(ColumnParallelLinear):
    """Packed Q, K, V. KV heads are replicated when there are fewer KV heads than TP ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype=None, quant=None):
        tp_size = ps.tp().size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "key/value heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp_size, num_kv_heads, "tensor_parallel_size over key/value heads")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, out, bias, dtype, quant, [q, kv, kv])

    def out_slice(self, shard_id):
        d = self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            return 0, self.tp_rank * q, q
        off = q if shard_id == "k" else q + kv
        return off, (self.tp_rank // self.kv_replicas) * kv, kv


class RowParallelLinear(LinearBase):
    """Splits the input dimension; the partial outputs are summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None,
                 reduce_results: bool = True, quant=None):
        self.tp_rank, self.tp_size = ps.tp().rank_in_group, ps.tp().size
        self.k_sharded = self.tp_size > 1
        self.reduce_results = reduce_results
        super().__init__(_divide(in_features, self.tp_size, "input features"), out_features, bias, dtype, quant)

    def in_slice(self):
        return self.tp_rank * self.in_features, self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = LinearBase.forward(self, x)
        return ps.all_reduce(y) if self.reduce_results else y
