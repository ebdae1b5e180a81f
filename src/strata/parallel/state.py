"""Parallel state: the rank mesh and its named process groups.

Mesh order is DP x PP x TP with TP innermost (consecutive global ranks form a TP group, so TP stays
inside a node). Before `init_parallel` is called, everything behaves as a single process (sizes 1,
collectives are no-ops); `require_initialized()` lets code that needs a real group fail loudly.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GroupInfo:
    name: str
    ranks: list[int]
    rank_in_group: int
    group: object | None  # torch ProcessGroup or None when size 1

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last(self) -> bool:
        return self.rank_in_group == self.size - 1


_SINGLE = GroupInfo("single", [0], 0, None)
_groups: dict[str, GroupInfo] = {}
_initialized = False


def is_initialized() -> bool:
    return _initialized


def require_initialized() -> None:
    if not _initialized:
        raise RuntimeError("strata.parallel.state used before init_parallel(); call it first")


def get_group(name: str) -> GroupInfo:
    return _groups.get(name, _SINGLE)


def tp() -> GroupInfo:
    return get_group("tp")


def pp() -> GroupInfo:
    return get_group("pp")


def dp() -> GroupInfo:
    return get_group("dp")


def ep() -> GroupInfo:
    """Expert-parallel group: the TP group when expert parallelism is on (experts spread over TP ranks)."""
    return get_group("ep")


def init_parallel(*, tensor_parallel_size: int, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                  rank: int, world_size: int, backend: str, init_method: str,
                  timeout_s: float = 120.0, enable_expert_parallel: bool = False) -> None:
    """Create the default group and the named TP / PP / DP groups for this process."""
    global _initialized
    expected = tensor_parallel_size * pipeline_parallel_size * data_parallel_size
    if world_size != expected:
        raise ValueError(f"world size {world_size} does not match the mesh: data_parallel_size "
                         f"{data_parallel_size} x pipeline_parallel_size {pipeline_parallel_size} x "
                         f"tensor_parallel_size {tensor_parallel_size} = {expected}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    T, P, D = tensor_parallel_size, pipeline_parallel_size, data_parallel_size

    def rank_of(d: int, p: int, t: int) -> int:
        return (d * P + p) * T + t

    def make(name: str, all_groups: list[list[int]]) -> None:
        for ranks in all_groups:  # every process must create every group, in the same order
            g = dist.new_group(ranks, backend=backend) if len(ranks) > 1 else None
            if rank in ranks:
                _groups[name] = GroupInfo(name, ranks, ranks.index(rank), g)

    make("tp", [[rank_of(d, p, t) for t in range(T)] for d in range(D) for p in range(P)])
    make("pp", [[rank_of(d, p, t) for p in range(P)] for d in range(D) for t in range(T)])
    make("dp", [[rank_of(d, p, t) for d in range(D)] for p in range(P) for t in range(T)])
    if enable_expert_parallel:
        _groups["ep"] = _groups["tp"]
    _initialized = True


def destroy_parallel() -> None:
    global _initialized
    _groups.clear()
    _initialized = False
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- collectives: explicit calls, no-ops at size 1 ----
def all_reduce(x: torch.Tensor, group: GroupInfo | None = None) -> torch.Tensor:
    g = group or tp()
    if g.size == 1:
        return x
    dist.all_reduce(x, group=g.group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1, group: GroupInfo | None = None) -> torch.Tensor:
    g = group or tp()
    if g.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(g.size)]
    dist.all_gather(parts, x.contiguous(), group=g.group)
    return torch.cat(parts, dim=dim)
