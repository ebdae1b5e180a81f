"""Persistent per-slot device state and the one CUDA graph runner (one GPU, and every pipeline stage).

`SlotBlockTables`: one row of block ids per stable request slot, on the device, updated from each step's
diff (only block ids appended since the last step travel host -> device). Row `max_num_seqs` is the
dummy slot: all zeros, i.e. the null block, used by padding rows.

`GraphRunner`: decode-only batches (a step, or a pipeline micro-batch) run as replays of graphs captured at a
fixed ladder of batch sizes. What is captured is this rank's model: its layer range and, on the last stage, the
LM head (a pipeline stage other than the first also reads a static [n, hidden] input, the residual stream the
previous stage sent). Inputs are three static buffers (token ids, positions, slots); block tables, slot mapping
and sequence lengths are derived on the device inside the graph, so a step's host work is one small copy.
Padding rows use the dummy slot and position 0: they read and write only the null block.
With async scheduling an input id may still be pending on the device: it is taken from `last_sampled[slot]`
(the runner's per-slot last sampled token) before the replay. The host staging buffer alternates between
two pinned tensors, because the copy out of the previous one may still be queued behind the step in flight.
Sends and receives between stages stay outside the graphs; the TP collectives inside a stage are captured,
every TP rank capturing the same sizes in the same order. A stage's output is copied out of the graph's buffer,
because the next micro-batch's replay of the same size writes it while a send may still be reading.

Off CUDA nothing is captured and `run` calls the same forward on the same static buffers (tests check the
padding, metadata and micro-batch logic there; only the capture itself needs a GPU).
"""
from __future__ import annotations

import torch

from strata.attention.backend import AttentionMetadata, forward_context
from strata.core.plan import StepPlan
from strata.runner.inputs import Requests, to_device


class SlotBlockTables:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.dummy = max_num_seqs
        self.table = torch.zeros(max_num_seqs + 1, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.synced = [0] * (max_num_seqs + 1)
        self.device = device

    def sync(self, plan: StepPlan, reqs: Requests) -> None:
        """Copy the block ids of the plan's requests that this table does not hold yet (after `reqs.apply`)."""
        for s in plan.new_slots:
            self.synced[s] = 0
        rows, cols, vals = [], [], []
        for c in plan.chunks:
            r = reqs[c.request_id]
            s, have = r.slot, self.synced[r.slot]
            ids = r.block_ids
            if len(ids) > have:
                n = len(ids) - have
                rows.extend([s] * n)
                cols.extend(range(have, len(ids)))
                vals.extend(ids[have:])
                self.synced[s] = len(ids)
        if rows:
            upd = to_device([rows, cols, vals], torch.int64, self.device)
            self.table[upd[0], upd[1]] = upd[2].to(torch.int32)


def decode_metadata(table: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, block_size: int,
                    max_seq_len: int) -> AttentionMetadata:
    """Everything attention needs for a decode batch, computed on the device (graph-capturable)."""
    bt = table.index_select(0, slots)  # [B, max_blocks]
    blk = bt.gather(1, torch.div(positions, block_size, rounding_mode="floor").unsqueeze(1)).squeeze(1)
    slot_mapping = blk.to(torch.int64) * block_size + positions % block_size
    return AttentionMetadata(slot_mapping=slot_mapping, num_decode_tokens=slots.shape[0],
                             decode_block_tables=bt, decode_seq_lens=(positions + 1).to(torch.int32),
                             decode_max_seq_len=max_seq_len, prefill_block_tables=None,
                             prefill_query_start_loc=None, prefill_seq_lens=None)


def batch_ladder(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class GraphRunner:
    def __init__(self, model: torch.nn.Module, tables: SlotBlockTables, *, max_num_seqs: int, block_size: int,
                 max_seq_len: int, device: torch.device, dtype: torch.dtype, last_sampled: torch.Tensor):
        self.model = model
        self.tables = tables
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.is_first, self.is_last = getattr(model, "is_first", True), getattr(model, "is_last", True)
        self.one_stage = self.is_first and self.is_last
        self.sizes = batch_ladder(max_num_seqs)
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.pos = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), tables.dummy, dtype=torch.int64, device=device)
        # a stage after the first: the residual stream from the stage before
        self.inter = None if self.is_first else torch.zeros(n, model.cfg.hidden_size, dtype=dtype, device=device)
        self.capture_graphs = device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        self.last_sampled = last_sampled  # [max_num_seqs + 1] int64, per slot
        # rows: (token id, position, slot, id pending); two buffers, used in turn
        self.host = [torch.zeros(n, 4, dtype=torch.int64, pin_memory=device.type == "cuda") for _ in range(2)]
        self.turn = 0
        self.ready = False
        self.runs = 0  # batches run through the graphs (tests, diagnostics)

    def _forward(self, b: int) -> torch.Tensor:
        """Logits [b, V] on the last stage, else [b, hidden]: hidden + residual, what crosses to the next stage."""
        meta = decode_metadata(self.tables.table, self.slots[:b], self.pos[:b], self.block_size, self.max_seq_len)
        with forward_context(meta):
            y = self.model(self.ids[:b], self.pos[:b], None if self.is_first else (self.inter[:b], None))
        if not self.is_last:
            hidden, residual = y
            return hidden + residual
        return self.model.compute_logits(y)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.capture_graphs:
            self.ready = True
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
                self._forward(b)  # warm-up: compiles kernels outside the capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.out[b] = self._forward(b)
                self.graphs[b] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.ready = True

    def release(self) -> None:
        """Destroy the captured graphs. A graph that captured NCCL collectives holds a reference on the
        communicator, and NCCL's communicator teardown waits for every such graph to be gone: release the
        graphs before the process groups are destroyed, or the teardown never returns."""
        self.ready = False
        if not self.graphs:
            return
        torch.cuda.synchronize()
        for g in self.graphs.values():
            g.reset()
        self.graphs.clear()
        self.out.clear()

    def fits(self, batch: int) -> bool:
        return self.ready and 0 < batch <= self.sizes[-1]

    def run(self, ids: list[int], pos: list[int], slots: list[int], pending: list[bool] | None = None,
            inter: torch.Tensor | None = None) -> torch.Tensor:
        """Replays the smallest graph that holds the batch. Returns logits [B, V] (one stage: a view of the
        graph's buffer) or the stage's output (pipeline stages: a copy). `pending[i]`: row i's input id is not
        known on the host yet; it is read from `last_sampled` on the device. `inter`: [B, hidden] from the
        stage before (stages after the first)."""
        b = len(ids)
        g = next(s for s in self.sizes if s >= b)
        self.runs += 1
        h = self.host[self.turn]
        self.turn ^= 1
        h[:b, :3] = torch.tensor([ids, pos, slots], dtype=torch.int64).T
        h[:b, 3] = torch.tensor(pending, dtype=torch.int64) if pending is not None else 0
        h[b:g, 0] = 0
        h[b:g, 1] = 0
        h[b:g, 2] = self.tables.dummy
        h[b:g, 3] = 0
        dev = h[:g].to(self.ids.device, non_blocking=True)  # [g, 4]
        if pending is not None:
            known = dev[:, 3] == 0
            self.ids[:g].copy_(torch.where(known, dev[:, 0], self.last_sampled.index_select(0, dev[:, 2])))
        else:
            self.ids[:g].copy_(dev[:, 0])
        self.pos[:g].copy_(dev[:, 1])
        self.slots[:g].copy_(dev[:, 2])
        if self.inter is not None:
            self.inter[:b].copy_(inter)
            self.inter[b:g].zero_()
        if self.graphs:
            self.graphs[g].replay()
            out = self.out[g][:b]
        else:
            out = self._forward(g)[:b]
        return out if self.one_stage else out.clone()
