"""Overlapping TP communication with the computation that produces it (`--tp-comm-overlap`).

A row-parallel linear ends in an all-reduce of its [T, hidden] output. With overlap on, the GEMM is cut into
row chunks and each chunk's all-reduce is started asynchronously as soon as the chunk is computed, so the
reduction of chunk i runs (on NCCL's stream, or gloo's thread) while chunk i+1 is multiplied:

    off:  [GEMM T rows][all-reduce T rows]
    on:   [GEMM c0][GEMM c1][GEMM c2][GEMM c3]
                   [ AR c0 ][ AR c1 ][ AR c2 ][ AR c3 ]

It only pays when both parts are long: prefill-sized T. Below `min_tokens` (decode) the layer runs as before:
there a 2-chunk split would double the all-reduce latency, which is what dominates small messages. Why not
"reduce-scatter + all-gather around the norm"? That moves the same bytes in two latency-bound collectives
instead of one, and the norm it shards is ~1% of a layer's time; it pays in training (activation memory),
not in an inference engine at batch sizes where TP is used for latency.

The overlap is applied by class: `apply_comm_overlap(model)` turns every reducing RowParallelLinear into an
`OverlappedRowParallelLinear` (a subclass; same parameters, same loader), so it can be switched per engine
and measured on and off (benchmarks/parallel_gpu.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.layers.linear import RowParallelLinear
from strata.parallel import state as ps


class OverlappedRowParallelLinear(RowParallelLinear):
    chunks: int = 4
    min_tokens: int = 256  # below this many rows: one GEMM, one all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if not self.reduce_results or self.tp_size == 1 or T < self.min_tokens:
            return super().forward(x)
        out = torch.empty((T, self.weight.shape[0]), dtype=x.dtype, device=x.device)  # [T, out]
        step = (T + self.chunks - 1) // self.chunks
        works = []
        for a in range(0, T, step):
            b = min(T, a + step)
            out[a:b] = F.linear(x[a:b], self.weight, self.bias)
            works.append(ps.all_reduce_async(out[a:b]))
        for w in works:
            w.wait()
        return out


def apply_comm_overlap(model: torch.nn.Module, enabled: bool = True, *, chunks: int | None = None,
                       min_tokens: int | None = None) -> int:
    """Switch the model's reducing row-parallel linears to (or back from) the overlapped form. Returns how many."""
    n = 0
    for m in model.modules():
        if not isinstance(m, RowParallelLinear) or not m.reduce_results:
            continue
        if enabled:
            m.__class__ = OverlappedRowParallelLinear
            if chunks is not None:
                m.chunks = chunks
            if min_tokens is not None:
                m.min_tokens = min_tokens
        elif isinstance(m, OverlappedRowParallelLinear):
            m.__class__ = RowParallelLinear
        n += 1
    return n
