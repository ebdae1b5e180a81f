"""Tensor-parallel linear layers. Each parameter knows how it is sharded through its `weight_loader`,
which copies only this rank's shard of a full checkpoint tensor. At TP size 1 they are plain linears."""
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
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Splits the output dimension; output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None):
        self.tp_rank, self.tp_size = ps.tp().rank_in_group, ps.tp().size
        super().__init__(in_features, _divide(out_features, self.tp_size, "output features"), bias, dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs packed in one matrix (gate_up_proj): shard_id indexes the part."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, dtype=None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        part = self.output_sizes[shard_id] // self.tp_size
        off = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, off, part).copy_(loaded.narrow(0, self.tp_rank * part, part))


class QKVParallelLinear(ColumnParallelLinear):
    """Packed Q, K, V. KV heads are replicated when there are fewer KV heads than TP ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype=None):
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
        super().__init__(hidden_size, out, bias, dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        d = self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            off, size, src = 0, q, self.tp_rank * q
        else:
            off = q if shard_id == "k" else q + kv
            size, src = kv, (self.tp_rank // self.kv_replicas) * kv
        param.data.narrow(0, off, size).copy_(loaded.narrow(0, src, size))


class RowParallelLinear(LinearBase):
    """Splits the input dimension; the partial outputs are summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None,
                 reduce_results: bool = True):
        self.tp_rank, self.tp_size = ps.tp().rank_in_group, ps.tp().size
        self.reduce_results = reduce_results
        super().__init__(_divide(in_features, self.tp_size, "input features"), out_features, bias, dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: added once, on rank 0
            param.data.copy_(loaded if self.tp_rank == 0 else torch.zeros_like(loaded))
            return
        n = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return ps.all_reduce(y) if self.reduce_results else y
