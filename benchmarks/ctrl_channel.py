"""The executor's control path alone: one step message from the driver to a worker and a tiny ack back, per step.

    python benchmarks/ctrl_channel.py

old: the dataclass message of commit 462e31d (whole block tables every step) over gloo; gloo: the NamedTuple
chunks with block-table diffs of the former `StepMsg` (commits before issue 19's `StepPlan`; the chunk is
defined here) over gloo; shm: the same chunks through the shared-memory ring. Two processes on this machine;
the ack (a multiprocessing pipe) is the same for all three. It measures the transport of those payloads, not
`StepPlan` itself.
"""
import os, sys, time, pickle, statistics
import torch, torch.distributed as dist
import torch.multiprocessing as mp
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
from dataclasses import dataclass
from typing import NamedTuple

@dataclass
class OldChunk:  # the dataclass message of 462e31d: whole block table every step
    start: int; num_tokens: int; sample: bool; token_ids: list; block_ids: list; slot: int

class ChunkMsg(NamedTuple):  # the former strata.parallel.stage.ChunkMsg (9994b6a and before)
    start: int
    num_tokens: int
    sample: bool
    token_ids: list
    block_base: int
    new_block_ids: list
    slot: int
    pending: bool = False

def make(kind, B, step):
    if kind == "old":
        return [OldChunk(1000 + step, 1, True, [5], list(range(40)), i) for i in range(B)]
    # new: a decode appends a block every 16 steps
    return [ChunkMsg(1000 + step, 1, True, [5], 40, [41] if step % 16 == 0 else [], i, False) for i in range(B)]

def run(rank, mode, B, n, q, ack):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29633", rank=rank, world_size=2)
    from strata.parallel.shm_channel import ShmBroadcast
    chan = None
    if mode == "shm":
        box = [None]
        if rank == 0:
            chan = ShmBroadcast.create(readers=1); box = [chan.name]
        dist.broadcast_object_list(box, src=0)
        if rank == 1:
            chan = ShmBroadcast.attach(box[0], 1, 0)
    kind = "old" if mode == "old" else "new"
    ts = []
    for step in range(n):
        if rank == 0:
            t = time.perf_counter()
            msg = ("step", make(kind, B, step))
            if chan: chan.send(msg)
            else: dist.broadcast_object_list([msg], src=0)
            ack.recv()
            ts.append(time.perf_counter() - t)
        else:
            if chan: msg, _ = chan.recv()
            else:
                box = [None]; dist.broadcast_object_list(box, src=0); msg = box[0]
            ack.send(1)
    if rank == 0:
        q.put(statistics.median(ts[5:]) * 1e6)
    dist.barrier()

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    for B in (1, 256):
        for mode in ("old", "gloo", "shm"):
            q = ctx.Queue(); a, b = ctx.Pipe()
            ps = [ctx.Process(target=run, args=(r, mode, B, 300, q, a if r == 0 else b)) for r in range(2)]
            [p.start() for p in ps]; v = q.get(); [p.join() for p in ps]
            print(f"B={B:4d} {mode:5s}: {v:8.0f} us per step message (send, receive, unpickle, ack)", flush=True)
