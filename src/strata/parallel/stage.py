"""What every rank does with one step: the picklable step message, micro-batches, and the stage forward.

The driver turns a StepPlan into a `StepMsg` (token ids, positions implied by start/num_tokens, what to sample,
and each slot's block table as a diff against what the ranks already mirror) and broadcasts it; every rank, the driver included, runs `StageRunner.run(msg)`:

  for each micro-batch (PP > 1: as many as stages, contiguous slices of the decode-first chunk order):
      first stage: embed;  other stages: receive the residual stream from the previous stage
      forward this stage's layers (KV written into this rank's cache)
      not last: send hidden + residual (one tensor: the next layer's add-then-norm is the same sum)
      last: logits of the sampled rows (TP all-gather inside); after the last micro-batch, TP rank 0 of the
            last stage returns to the driver the argmax ids (all-greedy steps) or the logits (anything else)

Sends are asynchronous, so stage s works on micro-batch i+1 while stage s+1 works on micro-batch i.
With STRATA_PP_GRAPHS=1 a decode-only step's micro-batches run as CUDA graph replays of each stage
(`stage_graphs.py`; sends and receives stay outside the graphs).
With TP > 1 each TP rank sends only its 1/TP slice of the hidden size across the stage boundary and the
receiving stage all-gathers it over its (fast, intra-node) TP group: the boundary carries one copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple

import torch

from strata.attention.backend import forward_context
from strata.core.plan import ScheduledChunk, StepPlan
from strata.layers.sampler import to_device
from strata.parallel import state as ps
from strata.parallel.stage_graphs import StageGraphs
from strata.parallel.stage_graphs import enabled as stage_graphs_enabled
from strata.runner.cuda_graphs import SlotBlockTables
from strata.runner.model_runner import ModelRunner

RETURN_TAG = 1 << 20  # tags of the last stage's replies to the driver (activations use the micro-batch index)


class ChunkMsg(NamedTuple):  # a tuple: pickles in a fraction of a dataclass's time and bytes
    start: int
    num_tokens: int
    sample: bool
    token_ids: list[int]  # the tokens at positions [start, start + num_tokens)
    block_base: int  # this slot's block table keeps its first block_base ids ...
    new_block_ids: list[int]  # ... followed by these (each rank mirrors the tables: only the diff travels)
    slot: int  # the request's stable slot
    pending: bool = False  # overlapped steps: the input token is still being sampled; read it from last_sampled

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start > 0


@dataclass
class StepMsg:
    chunks: list[ChunkMsg]  # in ModelRunner order: decodes first, then prefill/extend chunks
    microbatches: list[tuple[int, int]]  # [a, b) ranges over chunks
    greedy_ids: bool = False  # the last stage may return argmax ids instead of logits
    num_sampled: int = 0
    new_slots: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    share_tokens: bool = False  # overlapped steps: the driver broadcasts the sampled ids over TP on the device

    # Pickled as columns (one list per ChunkMsg field): ~10x cheaper to pickle than a list of tuples.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["chunks"] = tuple(map(list, zip(*self.chunks))) if self.chunks else ()
        return state

    def __setstate__(self, state):
        cols = state["chunks"]
        state["chunks"] = list(map(tuple.__new__, [ChunkMsg] * len(cols[0]), zip(*cols))) if cols else []
        self.__dict__.update(state)


def runner_order(plan: StepPlan) -> list[ScheduledChunk]:
    """The order ModelRunner computes and samples in: decodes first (same classification)."""
    decodes = [c for c in plan.chunks if c.num_tokens == 1 and c.start > 0]
    prefills = [c for c in plan.chunks if not (c.num_tokens == 1 and c.start > 0)]
    return decodes + prefills


def split_microbatches(chunks: list[ChunkMsg], m: int) -> list[tuple[int, int]]:
    """Contiguous slices with about equal token counts (at most m, none empty)."""
    n = len(chunks)
    m = max(1, min(m, n))
    if m == 1:
        return [(0, n)]
    total = sum(c.num_tokens for c in chunks)
    out, a, acc = [], 0, 0
    for i, c in enumerate(chunks):
        acc += c.num_tokens
        left_chunks = n - (i + 1)
        left_groups = m - len(out) - 1
        if left_groups and (acc * m >= total * (len(out) + 1) or left_chunks == left_groups):
            out.append((a, i + 1))
            a = i + 1
        if len(out) == m - 1:
            break
    out.append((a, n))
    return out


class MsgEncoder:
    """The driver's side of the block-table mirror: remembers how much of each slot's table the ranks hold."""

    def __init__(self):
        self.sent: dict[int, int] = {}

    def encode(self, plan: StepPlan, pp: int, greedy_ids: bool,
               share_tokens: bool = False) -> tuple[StepMsg, list[ScheduledChunk]]:
        for s in plan.new_slots:
            self.sent[s] = 0
        ordered = runner_order(plan)
        chunks = []
        for c in ordered:
            r = c.request
            ids = r.block_ids
            base = min(self.sent.get(r.slot, 0), len(ids))
            self.sent[r.slot] = len(ids)
            pending = c.input_pending
            toks = [0] if pending else r.tokens(c.start, c.start + c.num_tokens)
            chunks.append(ChunkMsg(c.start, c.num_tokens, c.sample, toks, base, ids[base:], r.slot, pending))
        mbs = split_microbatches(chunks, pp) if pp > 1 else [(0, len(chunks))]
        msg = StepMsg(chunks, mbs, greedy_ids, sum(1 for c in ordered if c.sample), list(plan.new_slots),
                      share_tokens=share_tokens)
        return msg, ordered


class StageRunner:
    """This rank's pipeline stage: builds inputs from a StepMsg and runs the stage's layers."""

    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype, block_size: int,
                 hidden_size: int, vocab_size: int, driver_rank: int = 0, last_stage_rank: int = 0,
                 max_num_seqs: int = 256, max_model_len: int = 2048, enforce_eager: bool = True):
        # A ModelRunner supplies the KV pool, the attention metadata and (CUDA, PP = 1) the decode CUDA graphs,
        # so that all of them follow the runner's own layout; its sampling is not used here. Every TP rank
        # captures the same graphs in the same order, so the collectives inside them replay in lockstep.
        pp = ps.pp()
        self.runner = ModelRunner(model, device=device, dtype=dtype, block_size=block_size,
                                  max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                  enforce_eager=enforce_eager or pp.size > 1)
        self.model, self.device, self.dtype = model, device, dtype
        self.hidden, self.vocab = hidden_size, vocab_size
        self.pp_size, self.is_first, self.is_last = pp.size, pp.is_first, pp.is_last
        self.prev_rank = pp.ranks[pp.rank_in_group - 1] if not pp.is_first else None
        self.next_rank = pp.ranks[pp.rank_in_group + 1] if not pp.is_last else None
        tp = ps.tp()
        self.tp = tp
        self.slice_boundary = tp.size > 1 and hidden_size % tp.size == 0
        self.driver_rank, self.last_stage_rank = driver_rank, last_stage_rank
        self.rank = ps.world().ranks[ps.world().rank_in_group] if ps.is_initialized() else 0
        self.tables: dict[int, list[int]] = {}  # slot -> block ids, mirrored from the driver's diffs
        self.enforce_eager = enforce_eager
        self.stage_graphs: StageGraphs | None = None  # PP > 1, STRATA_PP_GRAPHS=1

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        if self.pp_size > 1 and stage_graphs_enabled() and not self.enforce_eager:
            r = self.runner
            if r.tables is None:  # CPU: the static-buffer path runs uncaptured (tests)
                r.tables = SlotBlockTables(r.max_num_seqs, -(-r.max_model_len // r.block_size), self.device)
            self.stage_graphs = StageGraphs(self.model, r.tables, is_first=self.is_first, is_last=self.is_last,
                                            hidden_size=self.hidden, dtype=self.dtype, max_num_seqs=r.max_num_seqs,
                                            block_size=r.block_size, max_seq_len=r.max_model_len,
                                            device=self.device)
            self.stage_graphs.capture()

    def release_graphs(self) -> None:
        """Destroy every CUDA graph of this rank (before the process groups are torn down)."""
        self.runner.release_graphs()
        if self.stage_graphs is not None:
            self.stage_graphs.release()
            self.stage_graphs = None

    def _apply_tables(self, msg: StepMsg) -> None:
        for c in msg.chunks:
            t = self.tables.setdefault(c.slot, [])
            del t[c.block_base:]
            t.extend(c.new_block_ids)

    def _inputs(self, chunks: list[ChunkMsg]):
        bs = self.runner.block_size
        ids, pos, slots, decodes, prefills, pending = [], [], [], [], [], []
        for c in chunks:
            rng = range(c.start, c.start + c.num_tokens)
            if c.pending:
                pending.append((len(ids), c.slot))
            ids.extend(c.token_ids)
            pos.extend(rng)
            table = self.tables[c.slot]
            slots.extend(table[p // bs] * bs + p % bs for p in rng)
            sc = ScheduledChunk(SimpleNamespace(block_ids=table), c.start, c.num_tokens, c.sample)
            (decodes if c.is_decode else prefills).append(sc)
        meta = self.runner.build_metadata(decodes, prefills, slots)
        dev = self.device
        input_ids = to_device(ids, torch.int64, dev)
        if pending:  # decode inputs the step before sampled, not yet on the host: every rank holds them
            at = to_device([i for i, _ in pending], torch.int64, dev)
            src = to_device([s for _, s in pending], torch.int64, dev)
            input_ids.index_copy_(0, at, self.runner.last_sampled.index_select(0, src))
        return input_ids, to_device(pos, torch.int64, dev), meta

    def share_tokens(self, msg: StepMsg, tokens: torch.Tensor | None) -> None:
        """Overlapped steps: the driver's sampled ids [num_sampled] go to every TP rank on the device (no host
        round trip) and into each rank's last_sampled at the sampled requests' slots; workers pass None."""
        slots = [c.slot for c in msg.chunks if c.sample]
        if not slots:
            return
        if tokens is None:
            tokens = torch.empty(len(slots), dtype=torch.int64, device=self.device)
        ps.broadcast(tokens, src=self.driver_rank, group=self.tp, what="sampled_ids")
        self.runner.last_sampled.index_copy_(0, to_device(slots, torch.int64, self.device), tokens)

    def _recv_boundary(self, n: int, tag: int) -> torch.Tensor:
        if self.slice_boundary:
            part = ps.recv((n, self.hidden // self.tp.size), self.dtype, self.device, self.prev_rank, tag)
            return ps.all_gather(part, dim=-1, group=self.tp, what="pp_gather")
        return ps.recv((n, self.hidden), self.dtype, self.device, self.prev_rank, tag)

    def _send_boundary(self, x: torch.Tensor, tag: int):
        if self.slice_boundary:
            w = self.hidden // self.tp.size
            x = x[:, self.tp.rank_in_group * w:(self.tp.rank_in_group + 1) * w]
        x = x.contiguous()
        return ps.send(x, self.next_rank, tag, what="send"), x

    def _sync_tables(self, msg: StepMsg) -> None:
        chunks = [SimpleNamespace(request=SimpleNamespace(slot=c.slot, block_ids=self.tables[c.slot]))
                  for c in msg.chunks]
        self.runner.tables.sync(SimpleNamespace(new_slots=msg.new_slots, chunks=chunks))

    @torch.inference_mode()
    def run(self, msg: StepMsg, defer: bool = False):
        """Run this stage over every micro-batch. Returns, on the driver, one tensor per micro-batch with
        sampled rows (logits [n, V], or argmax ids [n] when msg.greedy_ids): the rows in chunk order.
        defer (driver, PP > 1, pipeline batch queue): post the receives of the last stage's replies and return
        a function that waits for them, so that the next step can be launched meanwhile."""
        pending, out, returns = [], [], []
        is_driver = self.rank == self.driver_rank
        self._apply_tables(msg)
        if self.runner.tables is not None:
            self._sync_tables(msg)
        graphs = self.runner.graphs
        if graphs is not None and all(c.is_decode for c in msg.chunks) and graphs.fits(len(msg.chunks)):
            pend = [c.pending for c in msg.chunks]
            logits = graphs.run([c.token_ids[0] for c in msg.chunks], [c.start for c in msg.chunks],
                                [c.slot for c in msg.chunks], pend if any(pend) else None)  # [B, V]
            if is_driver:
                return [logits]
            if msg.share_tokens:
                self.share_tokens(msg, None)
            return []
        sg = self.stage_graphs
        use_sg = sg is not None and all(c.is_decode and c.sample and not c.pending for c in msg.chunks) \
            and all(sg.fits(b - a) for a, b in msg.microbatches)
        for i, (a, b) in enumerate(msg.microbatches):
            chunks = msg.chunks[a:b]
            if use_sg:  # decode micro-batch: a graph replay; every row samples
                inter = None if self.is_first else self._recv_boundary(len(chunks), i)
                y = sg.run([c.token_ids[0] for c in chunks], [c.start for c in chunks], [c.slot for c in chunks],
                           inter)
                if not self.is_last:
                    pending.append(self._send_boundary(y, i))
                    continue
                logits = y
            else:
                input_ids, positions, meta = self._inputs(chunks)
                T = input_ids.shape[0]
                inter = None if self.is_first else (self._recv_boundary(T, i), None)
                with forward_context(meta):
                    y = self.model(input_ids, positions, inter)
                if not self.is_last:
                    hidden, residual = y
                    pending.append(self._send_boundary(hidden + residual, i))
                    continue
                rows, off = [], 0
                for c in chunks:
                    off += c.num_tokens
                    if c.sample:
                        rows.append(off - 1)
                if not rows:
                    continue
                logits = self.model.compute_logits(y[torch.tensor(rows, device=self.device)])  # [n, V]
            if self.pp_size == 1:
                if is_driver:
                    out.append(logits)
            elif self.rank == self.last_stage_rank:
                payload = logits.argmax(dim=-1) if msg.greedy_ids else logits
                returns.append((payload.contiguous(), i))
        # Replies go after every micro-batch's receive has been posted: with PP = 2 they share the driver's
        # NCCL pair with the activations, and NCCL runs one pair's operations in order, so a reply posted between
        # two receives could wait on a send the driver queued behind its own receive of that reply.
        for payload, i in returns:
            pending.append((ps.send(payload, self.driver_rank, RETURN_TAG + i, what="return"), payload))
        posted = []
        if is_driver and self.pp_size > 1:
            for i, (a, b) in enumerate(msg.microbatches):
                n = sum(1 for c in msg.chunks[a:b] if c.sample)
                if not n:
                    continue
                shape, dt = ((n,), torch.int64) if msg.greedy_ids else ((n, self.vocab), self.dtype)
                if defer:
                    posted.append(ps.irecv(shape, dt, self.device, self.last_stage_rank, RETURN_TAG + i))
                else:
                    out.append(ps.recv(shape, dt, self.device, self.last_stage_rank, RETURN_TAG + i))
        for w, _ in pending:  # the tensors stay referenced until their sends complete
            w.wait()
        if msg.share_tokens and not is_driver:
            self.share_tokens(msg, None)
        if defer:
            def replies() -> list[torch.Tensor]:
                for w, _ in posted:
                    w.wait()
                return [buf for _, buf in posted]
            return replies
        return out
