"""Model runner: turns a StepPlan into tensors, runs the model over the paged cache, samples.

Per step (see docs/ARCHITECTURE.md):
  1. order the chunks decode-first (the attention metadata splits the batch in two parts);
  2. build input ids, positions and slot mapping for every scheduled token;
  3. forward under the attention forward context (KV written into the cache inside each layer);
  4. logits only for the last token of each chunk that samples; sample; return in plan order.

`launch(plan)` queues all of that on the device without waiting for it (host inputs go through pinned,
non-blocking copies) and returns a `StepHandle`; `handle.result()` waits and returns the StepResult.
`execute(plan)` is `launch(plan).result()`. Sampled ids are also kept per slot on the device
(`last_sampled`), so that a step launched before the previous one's result is back (async scheduling) reads
a decode's input token there instead of from the host.
"""
from __future__ import annotations

import time

import torch

from strata import ops
from strata.attention.backend import AttentionMetadata, forward_context
from strata.core.plan import ScheduledChunk, StepPlan, StepResult
from strata.layers.sampler import Sampler, SamplingBatch, host_logprobs, to_device
from strata.runner.cuda_graphs import DecodeGraphs, SlotBlockTables


class ModelRunner:
    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype,
                 block_size: int, seed: int = 0, max_num_seqs: int = 256, max_model_len: int = 2048,
                 enforce_eager: bool = True):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.sampler = Sampler(seed, device)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # per step kind: [steps, seconds in execute (includes the sampler's sync), tokens]
        self.step_stats: dict[str, list] = {}
        # CUDA only: persistent per-slot block tables and decode graphs.
        self.tables: SlotBlockTables | None = None
        self.graphs: DecodeGraphs | None = None
        self.use_graphs = device.type == "cuda" and not enforce_eager
        if device.type == "cuda":
            self.tables = SlotBlockTables(max_num_seqs, -(-max_model_len // block_size), device)
        # The token each slot sampled last (row max_num_seqs: the dummy slot of graph padding rows).
        self.last_sampled = torch.zeros(max_num_seqs + 1, dtype=torch.int64, device=device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        layers = self.model.attention_layers
        self.kv_caches = []
        for attn in layers:
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.k_cache, attn.v_cache = k, v
            self.kv_caches.append((k, v))
        if self.device.type == "cuda":
            self.warmup()
        if self.use_graphs:
            self.graphs = DecodeGraphs(self.model, self.tables, max_num_seqs=self.max_num_seqs,
                                       block_size=self.block_size, max_seq_len=self.max_model_len,
                                       device=self.device, last_sampled=self.last_sampled)
            self.graphs.capture()

    def release_graphs(self) -> None:
        """Destroy the decode CUDA graphs (before tearing down NCCL groups; see DecodeGraphs.release)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile the eager path's kernel variants (Triton specialises on batch shapes) before serving,
        so that the first mixed steps of a run do not pay for compilation. Reads only the null block.
        First, the fused attention-input epilogue is checked against the unfused kernels on this device."""
        dev = self.device
        layers = self.model.attention_layers
        if layers:
            a = layers[0]
            ops.check_fused_qkv_epilogue(dev, self.dtype, a.num_heads, a.num_kv_heads, a.head_dim,
                                         bool(getattr(getattr(self.model, "cfg", None), "qk_norm", False)))
        long_len = min(2048, self.max_model_len)
        width = -(-long_len // self.block_size)
        b = 1
        while b <= min(self.max_num_seqs, 256):
            for nd in sorted({0, min(self.max_num_seqs, 4 * b)}):
                for L in ((1, long_len) if nd else (1,)):
                    T = nd + b
                    meta = AttentionMetadata(
                        slot_mapping=torch.full((T,), -1, dtype=torch.int64, device=dev), num_decode_tokens=nd,
                        decode_block_tables=torch.zeros(nd, width, dtype=torch.int32, device=dev) if nd else None,
                        decode_seq_lens=torch.full((nd,), L, dtype=torch.int32, device=dev) if nd else None,
                        decode_max_seq_len=L,
                        prefill_block_tables=torch.zeros(b, width, dtype=torch.int32, device=dev),
                        prefill_query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=dev),
                        prefill_seq_lens=torch.ones(b, dtype=torch.int32, device=dev))
                    ids = torch.zeros(T, dtype=torch.int64, device=dev)
                    # a pipeline stage other than the first takes the residual stream; only the last has a head
                    inter = None if getattr(self.model, "is_first", True) else (
                        torch.zeros(T, self.model.cfg.hidden_size, dtype=self.dtype, device=dev), None)
                    with forward_context(meta):
                        hidden = self.model(ids, torch.zeros_like(ids), inter)
                    if getattr(self.model, "is_last", True):
                        self.model.compute_logits(hidden[:1])
            b *= 2
        torch.cuda.synchronize()

    # ---- input preparation ----
    def _prepare(self, chunks: list[ScheduledChunk]):
        """Token ids, positions and slot mapping of every scheduled token, and (index, slot) of the ids
        still pending on the device (left 0 here)."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        pending: list[tuple[int, int]] = []
        for c in chunks:
            r = c.request
            end = c.start + c.num_tokens
            if c.input_pending:
                assert c.num_tokens == 1, f"{r}: a chunk of {c.num_tokens} tokens starts at a pending token"
                pending.append((len(ids), r.slot))
                ids.append(0)
            else:
                ids.extend(r.tokens(c.start, end))
            rng = range(c.start, end)
            pos.extend(rng)
            bt = r.block_ids
            slots.extend(bt[p // bs] * bs + p % bs for p in rng)
        return ids, pos, slots, pending

    def _block_table(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        width = max(len(c.request.block_ids) for c in chunks)
        rows = [c.request.block_ids + [0] * (width - len(c.request.block_ids)) for c in chunks]
        return to_device(rows, torch.int32, self.device)

    def build_metadata(self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk],
                       slots: list[int]) -> AttentionMetadata:
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=to_device(slots, torch.int64, dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=None, decode_seq_lens=None, decode_max_seq_len=0,
            prefill_block_tables=None, prefill_query_start_loc=None, prefill_seq_lens=None)
        if decodes:
            lens = [c.start + 1 for c in decodes]
            meta.decode_block_tables = self._block_table(decodes)
            meta.decode_seq_lens = to_device(lens, torch.int32, dev)
            meta.decode_max_seq_len = max(lens)
        if prefills:
            qsl = [0]
            for c in prefills:
                qsl.append(qsl[-1] + c.num_tokens)
            meta.prefill_block_tables = self._block_table(prefills)
            meta.prefill_query_start_loc = to_device(qsl, torch.int32, dev)
            meta.prefill_seq_lens = to_device([c.start + c.num_tokens for c in prefills], torch.int32, dev)
        return meta

    # ---- the step ----
    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> "StepHandle":
        """Queue the step on the device; nothing here waits for the device (on CUDA, with the Triton
        kernels, and unless a request needs penalties or min_tokens masking)."""
        t0 = time.perf_counter()
        if self.tables is not None:
            self.tables.sync(plan)
        decodes = [c for c in plan.chunks if c.num_tokens == 1 and c.start > 0]
        prefills = [c for c in plan.chunks if not (c.num_tokens == 1 and c.start > 0)]
        if not prefills and self.graphs is not None and self.graphs.fits(len(decodes)):
            kind, sample_chunks, logits = "decode_graph", plan.chunks, self._forward_graph(plan.chunks)
        else:
            kind = "decode_eager" if not prefills else ("mixed" if decodes else "prefill")
            sample_chunks, logits = self._forward_eager(decodes, prefills)
        tokens = lps = batch = None
        if sample_chunks:
            batch = SamplingBatch([c.request for c in sample_chunks])
            tokens, lps = self.sampler.sample(logits, batch)
            slots = to_device([c.request.slot for c in sample_chunks], torch.int64, self.device)
            self.last_sampled.index_copy_(0, slots, tokens)
        st = self.step_stats.setdefault(kind, [0, 0.0, 0])
        st[0] += 1
        st[1] += time.perf_counter() - t0
        st[2] += plan.num_batched_tokens
        return StepHandle(plan, sample_chunks, batch, tokens, lps, st)

    def _forward_eager(self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk]):
        """Forward a mixed step. Returns (the sampling chunks in computed order, their logits [B, V])."""
        dev = self.device
        ordered = decodes + prefills
        ids, pos, slots, pending = self._prepare(ordered)
        meta = self.build_metadata(decodes, prefills, slots)
        input_ids = to_device(ids, torch.int64, dev)
        if pending:  # decode inputs sampled by the step before, not yet on the host
            at = to_device([i for i, _ in pending], torch.int64, dev)
            src = to_device([s for _, s in pending], torch.int64, dev)
            input_ids.index_copy_(0, at, self.last_sampled.index_select(0, src))
        positions = to_device(pos, torch.int64, dev)
        with forward_context(meta):
            hidden = self.model(input_ids, positions)  # [T, hidden]
        last, sample_chunks, off = [], [], 0  # last token of each sampling chunk
        for c in ordered:
            off += c.num_tokens
            if c.sample:
                last.append(off - 1)
                sample_chunks.append(c)
        if not sample_chunks:
            return [], None
        return sample_chunks, self.model.compute_logits(hidden[to_device(last, torch.int64, dev)])

    def _forward_graph(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """A decode-only step (every chunk samples) as a CUDA graph replay. Returns logits [B, V]."""
        pending = [c.input_pending for c in chunks]
        ids = [0 if p else c.request.token_at(c.start) for c, p in zip(chunks, pending)]
        pos = [c.start for c in chunks]
        slots = [c.request.slot for c in chunks]
        return self.graphs.run(ids, pos, slots, pending if any(pending) else None)


class StepHandle:
    """A launched step. Its sampled ids (and logprobs) are copied to pinned host memory behind the step,
    with an event recorded after the copy; `result()` waits for that event only."""

    def __init__(self, plan: StepPlan, sample_chunks: list[ScheduledChunk], batch: SamplingBatch | None,
                 tokens: torch.Tensor | None, lps: tuple | None, stats: list):
        self.plan, self.batch, self.stats = plan, batch, stats
        self.event = None
        # position in sample_chunks of each sampling chunk, in plan order
        by_chunk = {id(c): i for i, c in enumerate(sample_chunks)}
        self.order = [by_chunk[id(c)] for c in plan.chunks if c.sample]
        if tokens is not None and tokens.is_cuda:
            tokens, lps = _to_host(tokens), (tuple(_to_host(t) for t in lps) if lps is not None else None)
            self.event = torch.cuda.Event()
            self.event.record()
        self.tokens, self.lps = tokens, lps

    def result(self) -> StepResult:
        t0 = time.perf_counter()
        if self.event is not None:
            self.event.synchronize()
        res = StepResult()
        if self.tokens is not None:
            tokens = self.tokens.tolist()
            lps = host_logprobs(self.lps, self.batch)
            res.sampled_token_ids = [tokens[i] for i in self.order]
            res.logprobs = [lps[i] if lps is not None else None for i in self.order]
        self.stats[1] += time.perf_counter() - t0
        return res


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a non-blocking copy of a device tensor into pinned host memory."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
