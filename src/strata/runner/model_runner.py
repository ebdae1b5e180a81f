"""Model runner: turns a StepPlan into tensors, runs the model over the paged cache, samples.

Per step (see docs/ARCHITECTURE.md):
  1. order the chunks decode-first (the attention metadata splits the batch in two parts);
  2. build input ids, positions and slot mapping for every scheduled token;
  3. forward under the attention forward context (KV written into the cache inside each layer);
  4. logits only for the last token of each chunk that samples; sample; return in plan order.
"""
from __future__ import annotations

import time

import torch

from strata.attention.backend import AttentionMetadata, forward_context
from strata.core.plan import ScheduledChunk, StepPlan, StepResult
from strata.layers.sampler import Sampler, SamplingBatch
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
                                       device=self.device)
            self.graphs.capture()

    def release_graphs(self) -> None:
        """Destroy the decode CUDA graphs (before tearing down NCCL groups; see DecodeGraphs.release)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile the eager path's kernel variants (Triton specialises on batch shapes) before serving,
        so that the first mixed steps of a run do not pay for compilation. Reads only the null block."""
        dev = self.device
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
                    with forward_context(meta):
                        hidden = self.model(ids, torch.zeros_like(ids))
                    self.model.compute_logits(hidden[:1])
            b *= 2
        torch.cuda.synchronize()

    # ---- input preparation ----
    def _prepare(self, chunks: list[ScheduledChunk]):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        for c in chunks:
            r = c.request
            end = c.start + c.num_tokens
            ids.extend(r.tokens(c.start, end))
            rng = range(c.start, end)
            pos.extend(rng)
            bt = r.block_ids
            slots.extend(bt[p // bs] * bs + p % bs for p in rng)
        return ids, pos, slots

    def _block_table(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        width = max(len(c.request.block_ids) for c in chunks)
        rows = [c.request.block_ids + [0] * (width - len(c.request.block_ids)) for c in chunks]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def build_metadata(self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk],
                       slots: list[int]) -> AttentionMetadata:
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=None, decode_seq_lens=None, decode_max_seq_len=0,
            prefill_block_tables=None, prefill_query_start_loc=None, prefill_seq_lens=None)
        if decodes:
            lens = [c.start + 1 for c in decodes]
            meta.decode_block_tables = self._block_table(decodes)
            meta.decode_seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            meta.decode_max_seq_len = max(lens)
        if prefills:
            qsl = [0]
            for c in prefills:
                qsl.append(qsl[-1] + c.num_tokens)
            meta.prefill_block_tables = self._block_table(prefills)
            meta.prefill_query_start_loc = torch.tensor(qsl, dtype=torch.int32, device=dev)
            meta.prefill_seq_lens = torch.tensor([c.start + c.num_tokens for c in prefills], dtype=torch.int32, device=dev)
        return meta

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        res, kind = self._execute(plan)
        st = self.step_stats.setdefault(kind, [0, 0.0, 0])
        st[0] += 1
        st[1] += time.perf_counter() - t0
        st[2] += plan.num_batched_tokens
        return res

    def _execute(self, plan: StepPlan) -> tuple[StepResult, str]:
        if self.tables is not None:
            self.tables.sync(plan)
        decodes = [c for c in plan.chunks if c.num_tokens == 1 and c.start > 0]
        prefills = [c for c in plan.chunks if not (c.num_tokens == 1 and c.start > 0)]
        if not prefills and self.graphs is not None and self.graphs.fits(len(decodes)):
            return self._execute_graph(plan), "decode_graph"
        kind = "decode_eager" if not prefills else ("mixed" if decodes else "prefill")
        ordered = decodes + prefills
        ids, pos, slots = self._prepare(ordered)
        meta = self.build_metadata(decodes, prefills, slots)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        positions = torch.tensor(pos, dtype=torch.int64, device=self.device)
        with forward_context(meta):
            hidden = self.model(input_ids, positions)  # [T, hidden]
        # Last token of each sampling chunk, in ordered position; then map back to plan order.
        last, sample_chunks, off = [], [], 0
        for c in ordered:
            off += c.num_tokens
            if c.sample:
                last.append(off - 1)
                sample_chunks.append(c)
        if not sample_chunks:
            return StepResult(), kind
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=self.device)])  # [B, V]
        return self._sample(plan, sample_chunks, logits), kind

    def _sample(self, plan: StepPlan, sample_chunks: list[ScheduledChunk], logits: torch.Tensor) -> StepResult:
        tokens, lps = self.sampler(logits, SamplingBatch([c.request for c in sample_chunks]))
        by_req = {id(c): i for i, c in enumerate(sample_chunks)}
        result = StepResult()
        for c in plan.chunks:
            if c.sample:
                i = by_req[id(c)]
                result.sampled_token_ids.append(tokens[i])
                result.logprobs.append(lps[i] if lps is not None else None)
        return result

    def _execute_graph(self, plan: StepPlan) -> StepResult:
        chunks = plan.chunks  # all decodes, each samples
        ids = [c.request.token_at(c.start) for c in chunks]
        pos = [c.start for c in chunks]
        slots = [c.request.slot for c in chunks]
        logits = self.graphs.run(ids, pos, slots)
        return self._sample(plan, chunks, logits)
