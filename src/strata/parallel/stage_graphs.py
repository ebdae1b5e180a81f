"""Decode micro-batches of one pipeline stage as CUDA graph replays (opt-in: STRATA_PP_GRAPHS=1).

Why: with PP > 1 every stage ran eagerly, and at small batches the host then sets the pace: on 4 x H200,
Llama-3-70B at TP=2 x PP=2 took 48.7 ms per token at batch 1 against 13.1 ms for TP=4 (docs/PARALLELISM.md).

What is captured: the stage's layers (and, on the last stage, the LM head) for a decode micro-batch of a size from
the runner's ladder, reading three static buffers (token ids, positions, slots) and, after the first stage, a
static [n, hidden] input. Attention metadata comes from the per-slot block tables on the device, as in
`strata.runner.cuda_graphs`. The point-to-point sends and receives between stages stay outside the graph
(eager, as before); the TP collectives inside a stage are captured, every TP rank of a stage capturing the same
sizes in the same order. The output is copied out of the graph's buffer before it is sent, because the next
micro-batch's replay of the same size writes the same buffer while the send may still be reading.

On CPU (tests) the same static-buffer path runs without capture, so the padding, metadata and micro-batch
logic is checked against the eager stage; only the capture itself needs a GPU.
"""
from __future__ import annotations

import os

import torch

from strata.attention.backend import forward_context
from strata.runner.cuda_graphs import SlotBlockTables, batch_ladder, decode_metadata


def enabled() -> bool:
    return os.environ.get("STRATA_PP_GRAPHS", "0").lower() in ("1", "true", "yes", "on")


class StageGraphs:
    def __init__(self, model: torch.nn.Module, tables: SlotBlockTables, *, is_first: bool, is_last: bool,
                 hidden_size: int, dtype: torch.dtype, max_num_seqs: int, block_size: int, max_seq_len: int,
                 device: torch.device):
        self.model, self.tables = model, tables
        self.is_first, self.is_last = is_first, is_last
        self.block_size, self.max_seq_len = block_size, max_seq_len
        self.sizes = batch_ladder(max_num_seqs)
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.pos = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), tables.dummy, dtype=torch.int64, device=device)
        self.inter = None if is_first else torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.capture_graphs = device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        self.runs = 0  # micro-batches run through this path (tests, diagnostics)

    def _forward(self, b: int) -> torch.Tensor:
        """[b, hidden] (hidden + residual, what crosses to the next stage) or, on the last stage, logits [b, V]."""
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
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
                self._forward(b)  # warm-up outside the capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.out[b] = self._forward(b)
                self.graphs[b] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def release(self) -> None:
        """Destroy the graphs before the process groups (NCCL's teardown waits for graphs holding its
        communicators; see DecodeGraphs.release)."""
        if self.graphs:
            torch.cuda.synchronize()
            for g in self.graphs.values():
                g.reset()
        self.graphs.clear()
        self.out.clear()

    def fits(self, batch: int) -> bool:
        return 0 < batch <= self.sizes[-1] and (bool(self.graphs) or not self.capture_graphs)

    @torch.inference_mode()
    def run(self, ids: list[int], pos: list[int], slots: list[int], inter: torch.Tensor | None) -> torch.Tensor:
        """One decode micro-batch (one token per row). Returns a fresh tensor (not the graph's buffer)."""
        b = len(ids)
        g = next(s for s in self.sizes if s >= b)
        self.runs += 1
        rows = torch.tensor([ids + [0] * (g - b), pos + [0] * (g - b), slots + [self.tables.dummy] * (g - b)],
                            dtype=torch.int64).to(self.ids.device, non_blocking=True)
        self.ids[:g].copy_(rows[0])
        self.pos[:g].copy_(rows[1])
        self.slots[:g].copy_(rows[2])
        if self.inter is not None:
            self.inter[:b].copy_(inter)
            self.inter[b:g].zero_()
        if self.graphs:
            self.graphs[g].replay()
            return self.out[g][:b].clone()
        return self._forward(g)[:b].clone()
