"""Parallel state: the rank mesh and its named process groups.

Mesh order is DP x PP x TP with TP innermost (consecutive global ranks form a TP group, so TP stays
inside a node). Before `init_parallel` is called, everything behaves as a single process (sizes 1,
collectives are no-ops); `require_initialized()` lets code that needs a real group fail loudly.

Groups: "tp", "pp", "dp", "ep" (the TP group when expert parallelism is on), "world" (every rank) and
"ctrl" (every rank, always gloo, no practical timeout: the driver's step messages travel on it, and an idle
engine must not time its workers out; a dead peer still fails it at once because its sockets close).

Every collective here counts what it moves (`comm_stats()`): calls and payload bytes per (group, op), where
the payload is what one would count by hand: the tensor for an all-reduce, the gathered result for an
all-gather, the bytes that leave this rank for an all-to-all, the message for a send. `tests/test_plan_comm.py`
compares these counts with `strata.plan`'s formulas.
"""
from __future__ import annotations

import datetime
import logging
import math
from collections import defaultdict
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


_ep_dispatch = "all_reduce"


def ep_dispatch() -> str:
    """How expert-parallel MoE layers exchange tokens: "all_reduce" or "all_to_all" (--expert-parallel-dispatch)."""
    return _ep_dispatch


def world() -> GroupInfo:
    return get_group("world")


def ctrl() -> GroupInfo:
    return get_group("ctrl")


CTRL_TIMEOUT_S = 365 * 24 * 3600.0  # idle engines wait on the control group; dead peers still fail it at once


def init_parallel(*, tensor_parallel_size: int, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                  rank: int, world_size: int, backend: str, init_method: str,
                  timeout_s: float = 120.0, enable_expert_parallel: bool = False,
                  ep_dispatch: str = "all_reduce") -> None:
    """Create the default group and the named TP / PP / DP / EP / world / ctrl groups for this process."""
    global _initialized, _ep_dispatch
    if ep_dispatch not in ("all_reduce", "all_to_all"):
        raise ValueError(f"expert_parallel_dispatch must be all_reduce or all_to_all, not {ep_dispatch!r}")
    _ep_dispatch = ep_dispatch
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
    if enable_expert_parallel:  # the TP ranks, under their own name (so its traffic is counted apart)
        t = _groups["tp"]
        _groups["ep"] = GroupInfo("ep", t.ranks, t.rank_in_group, t.group)
    everyone = list(range(world_size))
    _groups["world"] = GroupInfo("world", everyone, rank, dist.group.WORLD if world_size > 1 else None)
    # The control plane is CPU (pickled step messages): a gloo group even when the data plane is NCCL. It is
    # made with the ordinary timeout, so that a failed connection surfaces, then relaxed for idle waits.
    cg = None
    if world_size > 1:
        cg = dist.new_group(everyone, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        dist.barrier(group=cg)
        relax = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if relax is not None:
            relax(datetime.timedelta(seconds=CTRL_TIMEOUT_S), cg)
    _groups["ctrl"] = GroupInfo("ctrl", everyone, rank, cg)
    _initialized = True


def destroy_parallel() -> None:
    global _initialized, _fast_ar
    _fast_ar = None
    _groups.clear()
    _initialized = False
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- communication accounting ----
_stats: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])


def _count(g: GroupInfo, op: str, nbytes: int) -> None:
    st = _stats[(g.name, op)]
    st[0] += 1
    st[1] += int(nbytes)


def comm_stats() -> dict[str, dict[str, int]]:
    """{"group.op": {"calls": n, "bytes": payload}} since the last reset, for this process."""
    return {f"{g}.{op}": {"calls": c, "bytes": b} for (g, op), (c, b) in sorted(_stats.items())}


def reset_comm_stats() -> None:
    _stats.clear()


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# ---- a low-latency all-reduce for small TP messages (opt-in: STRATA_TP_ALLREDUCE=symm_mem, CUDA) ----
class SymmMemAllReduce:
    """One-shot all-reduce through PyTorch symmetric memory: each GPU reads its peers' copies directly over
    NVLink (no NCCL protocol round trips), which pays for the small per-layer messages of decode steps.
    Messages above `max_bytes` (prefill) stay on NCCL. Capturable in CUDA graphs. No multicast is used."""

    def __init__(self, g: GroupInfo, device: torch.device, dtype: torch.dtype, max_bytes: int = 8 << 20):
        import torch.distributed._symmetric_memory as symm_mem
        self.name = g.group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(self.name)
        self.dtype = dtype
        self.max_numel = max_bytes // torch.empty((), dtype=dtype).element_size()
        self.buf = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buf, self.name)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.max_numel and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.buf[: x.numel()]
        b.copy_(x.view(-1))
        x.view(-1).copy_(torch.ops.symm_mem.one_shot_all_reduce(b, "sum", self.name))
        return x


_fast_ar: SymmMemAllReduce | None = None


def enable_fast_allreduce(device: torch.device, dtype: torch.dtype) -> bool:
    """Use SymmMemAllReduce for the TP group's small all-reduces (the engine calls this when
    STRATA_TP_ALLREDUCE=symm_mem). Returns whether it is on (any failure leaves NCCL in place, with a warning)."""
    global _fast_ar
    if tp().size == 1 or device.type != "cuda":
        return False
    try:
        _fast_ar = SymmMemAllReduce(tp(), device, dtype)
    except Exception as e:  # noqa: BLE001 - an optional fast path
        logging.getLogger("strata.parallel").warning("symmetric-memory all-reduce unavailable (%s); using NCCL", e)
        _fast_ar = None
    return _fast_ar is not None


# ---- collectives: explicit calls, no-ops at size 1 ----
def all_reduce(x: torch.Tensor, group: GroupInfo | None = None) -> torch.Tensor:
    g = group or tp()
    if g.size == 1:
        return x
    _count(g, "all_reduce", _nbytes(x))
    if _fast_ar is not None and g.name == "tp" and _fast_ar.fits(x):
        return _fast_ar(x)
    dist.all_reduce(x, group=g.group)
    return x


def all_reduce_async(x: torch.Tensor, group: GroupInfo | None = None):
    """Start an in-place all-reduce of `x` (contiguous); returns a handle with .wait() (None at size 1)."""
    g = group or tp()
    if g.size == 1:
        return None
    _count(g, "all_reduce", _nbytes(x))
    return dist.all_reduce(x, group=g.group, async_op=True)


def broadcast(x: torch.Tensor, src: int, group: GroupInfo | None = None, what: str = "broadcast") -> torch.Tensor:
    """In-place broadcast of `x` from global rank `src` over the group (device tensors on NCCL)."""
    g = group or tp()
    if g.size == 1:
        return x
    _count(g, what, _nbytes(x) * (g.size - 1))
    dist.broadcast(x, src=src, group=g.group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1, group: GroupInfo | None = None,
               what: str = "all_gather") -> torch.Tensor:
    g = group or tp()
    if g.size == 1:
        return x
    _count(g, what, _nbytes(x) * g.size)
    parts = [torch.empty_like(x) for _ in range(g.size)]
    dist.all_gather(parts, x.contiguous(), group=g.group)
    return torch.cat(parts, dim=dim)


def all_gather_rows(x: torch.Tensor, counts: list[int], group: GroupInfo | None = None) -> torch.Tensor:
    """Concatenate every rank's rows: rank i contributes `counts[i]` rows (x: [counts[rank], ...])."""
    g = group or tp()
    if g.size == 1:
        return x
    width = max(counts)
    pad = x.new_zeros((width,) + tuple(x.shape[1:]))
    pad[: x.shape[0]] = x
    _count(g, "all_gather", sum(counts) * math.prod(x.shape[1:]) * x.element_size())
    parts = [torch.empty_like(pad) for _ in range(g.size)]
    dist.all_gather(parts, pad, group=g.group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


def all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                    group: GroupInfo | None = None) -> torch.Tensor:
    """Row all-to-all: the first send_counts[0] rows of x go to rank 0 of the group, the next to rank 1, ...
    Returns the received rows ([sum(recv_counts), ...]) in source-rank order."""
    g = group or ep()
    if g.size == 1:
        return x
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    row = math.prod(x.shape[1:]) * x.element_size()
    _count(g, "all_to_all", row * (sum(send_counts) - send_counts[g.rank_in_group]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv_counts),
                           input_split_sizes=list(send_counts), group=g.group)
    return out


def all_to_all_counts(counts: torch.Tensor, group: GroupInfo | None = None) -> torch.Tensor:
    """Exchange equal-sized int64 blocks: counts [size * n] -> received [size * n] (metadata, counted apart)."""
    g = group or ep()
    if g.size == 1:
        return counts
    out = torch.empty_like(counts)
    _count(g, "all_to_all_meta", _nbytes(counts) * (g.size - 1) // g.size)
    dist.all_to_all_single(out, counts.contiguous(), group=g.group)
    return out


def all_reduce_min_ints(values: list[int], group: GroupInfo | None = None) -> list[int]:
    """Element-wise minimum of small integer lists over a group (CPU, through the control group)."""
    g = group or ctrl()
    if g.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g.group)
    return t.tolist()


# ---- point to point (pipeline stages; global ranks) ----
def send(x: torch.Tensor, dst: int, tag: int = 0, what: str = "send"):
    """Asynchronous send of a contiguous tensor to global rank `dst`; returns the work handle."""
    _count(pp(), what, _nbytes(x))
    return dist.isend(x.contiguous(), dst=dst, tag=tag)


def recv(shape, dtype: torch.dtype, device, src: int, tag: int = 0) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, src=src, tag=tag)
    return buf


def irecv(shape, dtype: torch.dtype, device, src: int, tag: int = 0):
    """A posted receive: (work, buffer); the buffer holds the data after work.wait()."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    return dist.irecv(buf, src=src, tag=tag), buf


# ---- control plane ----
def broadcast_object(obj=None, src: int = 0):
    """Pickled broadcast on the control group: the source passes obj, everyone gets it back."""
    g = ctrl()
    if g.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=g.group)
    return box[0]


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's obj, in rank order, on `dst` (None elsewhere)."""
    g = ctrl()
    if g.size == 1:
        return [obj]
    out = [None] * g.size if g.rank_in_group == dst else None
    dist.gather_object(obj, out, dst=dst, group=g.group)
    return out


def all_gather_objects(obj) -> list:
    """Every rank's obj, in rank order, on every rank (control group)."""
    g = ctrl()
    if g.size == 1:
        return [obj]
    out = [None] * g.size
    dist.all_gather_object(out, obj, group=g.group)
    return out


def forget_parallel() -> None:
    """Drop the groups without tearing the process group down (a peer is dead; teardown could block)."""
    global _initialized, _fast_ar
    _fast_ar = None
    _groups.clear()
    _initialized = False
