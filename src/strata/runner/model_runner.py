"""Model runner: the one runner of every rank and pipeline stage. It applies a StepPlan to its mirror of the
requests, turns it into tensors, runs its model (all layers, or a pipeline stage's range) over the paged cache,
and, on the rank that samples (the driver: rank 0), samples.

Per step (see docs/ARCHITECTURE.md):
  1. apply the plan's diff to the request mirror (`inputs.Requests`) and to the per-slot block tables;
  2. order the chunks decode-first (the attention metadata splits the batch in two parts);
  3. per micro-batch (one, or PP with pipeline stages: contiguous slices of that order):
       a stage after the first receives the residual stream, a stage before the last sends its own on;
       a decode-only batch replays a CUDA graph (`cuda_graphs.GraphRunner`), anything else runs eagerly
       (`inputs.build_inputs`, then the forward under the attention forward context);
       the last stage computes logits only for the last token of each chunk that samples;
  4. the driver samples from its logits (one stage) or from the rows the last stage sent back, and returns the
     tokens in plan order.

`launch(plan)` queues all of that on the device without waiting for it (host inputs go through pinned,
non-blocking copies) and returns a `StepHandle`; `handle.result()` waits and returns the StepResult. Sampled
ids are also kept per slot on the device (`last_sampled`), so that a step launched before the previous one's
result is back (async scheduling) reads a decode's input token there instead of from the host; with TP the
driver broadcasts them to every TP rank.
"""
from __future__ import annotations

import time

import torch

from strata import ops
from strata.attention.backend import AttentionMetadata, forward_context
from strata.config.engine import EngineConfig
from strata.core.plan import ScheduledChunk, StepPlan, StepResult
from strata.runner.cuda_graphs import GraphRunner, SlotBlockTables
from strata.runner.inputs import Requests, build_inputs, decode_first, is_pending, to_device
from strata.runner.pipeline import StageLink, split_microbatches
from strata.runner.sampler import Sampler, SamplingBatch, host_logprobs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig):
        self.model = model
        self.device = torch.device(config.device)
        self.dtype = config.dtype
        self.kv_cache_dtype = config.kv_cache_dtype or config.dtype  # float8_e4m3fn with --kv-cache-dtype fp8
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_model_len = config.max_model_len
        self.link = StageLink(model.cfg.hidden_size, model.cfg.vocab_size, self.dtype, self.device)
        self.sampler = Sampler(config.seed, self.device) if self.link.is_driver else None
        self.requests = Requests(self.device if self.link.is_driver else None)
        # overlapped steps with TP: every TP rank needs the sampled ids in its last_sampled
        self.share_sampled = bool(config.async_scheduling) and self.link.tp.size > 1
        self.greedy_on_last_stage = True  # PP, all-greedy steps: the last stage sends argmax ids, not logits
        self.logits_hook = None  # tests: called with the [rows, vocab] logits the driver samples from
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # per step kind: [steps, seconds in launch + result (includes the sampler's sync), tokens]
        self.step_stats: dict[str, list] = {}
        # CUDA: persistent per-slot block tables and decode graphs
        self.tables: SlotBlockTables | None = None
        self.graphs: GraphRunner | None = None
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager
        if self.device.type == "cuda":
            self.tables = self._new_tables()
        # The token each slot sampled last (row max_num_seqs: the dummy slot of graph padding rows).
        self.last_sampled = torch.zeros(self.max_num_seqs + 1, dtype=torch.int64, device=self.device)

    def _new_tables(self) -> SlotBlockTables:
        return SlotBlockTables(self.max_num_seqs, -(-self.max_model_len // self.block_size), self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []
        for attn in self.model.attention_layers:
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            k = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            attn.k_cache, attn.v_cache = k, v
            self.kv_caches.append((k, v))
        if self.device.type == "cuda":
            self.warmup()
        if self.use_graphs:
            self.start_graphs()

    def start_graphs(self) -> None:
        """Capture the decode graphs (on CUDA; elsewhere the same static-buffer path runs uncaptured, which the
        tests switch on to check it)."""
        if self.tables is None:
            self.tables = self._new_tables()
        self.graphs = GraphRunner(self.model, self.tables, max_num_seqs=self.max_num_seqs,
                                  block_size=self.block_size, max_seq_len=self.max_model_len, device=self.device,
                                  dtype=self.dtype, last_sampled=self.last_sampled)
        self.graphs.capture()

    def release_graphs(self) -> None:
        """Destroy the decode CUDA graphs (before tearing down NCCL groups; see GraphRunner.release)."""
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
                                         bool(self.model.cfg.qk_norm))
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
                    inter = None if self.link.is_first else (
                        torch.zeros(T, self.model.cfg.hidden_size, dtype=self.dtype, device=dev), None)
                    with forward_context(meta):
                        hidden = self.model(ids, torch.zeros_like(ids), inter)
                    if self.link.is_last:
                        self.model.compute_logits(hidden[:1])
            b *= 2
        torch.cuda.synchronize()

    # ---- the step ----
    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> "StepHandle":
        """Queue the step on the device; nothing here waits for the device (on CUDA, with the Triton
        kernels, one pipeline stage, and unless a request needs penalties or min_tokens masking)."""
        t0 = time.perf_counter()
        self.requests.apply(plan)
        if self.tables is not None:
            self.tables.sync(plan, self.requests)
        chunks, num_decodes = decode_first(plan.chunks)
        sample_chunks = [c for c in chunks if c.sample]
        batch = SamplingBatch([self.requests[c.request_id] for c in sample_chunks]) if sample_chunks else None
        greedy_ids = (batch is not None and self.link.pp_size > 1 and self.greedy_on_last_stage
                      and batch.all_greedy and not batch.any_penalty and not batch.any_min_tokens
                      and batch.max_logprobs is None and not batch.any_structured)
        parts, graphed = self._run_stage(chunks, num_decodes, greedy_ids)
        tokens = lps = logits = None
        if sample_chunks and self.link.is_driver:
            rows = parts[0] if len(parts) == 1 else torch.cat(parts)  # in sampling order
            if greedy_ids:
                tokens = rows
            else:
                logits = rows  # [rows, vocab]
                if self.logits_hook is not None:
                    self.logits_hook(logits)
                if not batch.any_structured:
                    tokens, lps = self.sampler.sample(logits, batch)
                    logits = None
        handle = StepHandle(self, plan, sample_chunks, batch)
        if logits is not None:
            # Structured outputs: the engine fills the grammar bitmask on the host (for the step before this one
            # applied: with async scheduling while this step's forward runs) and calls handle.sample.
            handle.logits = logits
        else:
            self._sampled(handle, tokens, lps)
        kind = ("decode_graph" if graphed else "decode_eager" if num_decodes == len(chunks)
                else "mixed" if num_decodes else "prefill")
        st = self.step_stats.setdefault(kind, [0, 0.0, 0])
        st[0] += 1
        st[1] += time.perf_counter() - t0
        st[2] += plan.num_batched_tokens
        handle.stats = st
        return handle

    def _sampled(self, handle: "StepHandle", tokens: torch.Tensor | None, lps: tuple | None) -> None:
        """After sampling (or, on other ranks, in its place): keep the ids per slot on the device, share them
        with the TP group under overlapped steps, and start their copy to the host."""
        sample_chunks = handle.sample_chunks
        if sample_chunks and self.link.pp_size == 1:
            tokens_here = self.link.share_sampled(tokens, len(sample_chunks)) if self.share_sampled else tokens
            if tokens_here is not None:
                slots = to_device([self.requests[c.request_id].slot for c in sample_chunks], torch.int64,
                                  self.device)
                self.last_sampled.index_copy_(0, slots, tokens_here)
        handle.set_tokens(tokens, lps)

    def _run_stage(self, chunks: list[ScheduledChunk], num_decodes: int,
                   greedy_ids: bool) -> tuple[list[torch.Tensor], bool]:
        """This rank's share of the step, micro-batch by micro-batch. Returns, on the driver, the sampled rows
        of every micro-batch in order (logits [n, V], or argmax ids [n] when `greedy_ids`), and whether every
        micro-batch replayed a graph. Sends are asynchronous, so stage s works on micro-batch i + 1 while stage
        s + 1 works on micro-batch i."""
        link = self.link
        mbs = split_microbatches(chunks, link.pp_size)
        sends, out, replies, graphed = [], [], [], True
        for i, (a, b) in enumerate(mbs):
            part = chunks[a:b]
            inter = None if link.is_first else link.recv_hidden(sum(c.num_tokens for c in part), i)
            y, g = self._forward(part, max(0, min(b, num_decodes) - a), inter)
            graphed = graphed and g
            if not link.is_last:
                sends.append(link.send_hidden(y, i))
            elif y is None:
                continue
            elif link.pp_size == 1:
                out.append(y)
            elif link.returns_rows:
                replies.append((y.argmax(dim=-1) if greedy_ids else y, i))
        # Replies go after every micro-batch's receive has been posted: with PP = 2 they share the driver's
        # NCCL pair with the activations, and NCCL runs one pair's operations in order, so a reply posted between
        # two receives could wait on a send the driver queued behind its own receive of that reply.
        for rows, i in replies:
            sends.append(link.send_rows(rows, i))
        if link.is_driver and link.pp_size > 1:
            for i, (a, b) in enumerate(mbs):
                n = sum(c.sample for c in chunks[a:b])
                if n:
                    out.append(link.recv_rows(n, greedy_ids, i))
        for w, _ in sends:  # the tensors stay referenced until their sends complete
            w.wait()
        return out, graphed

    def _forward(self, part: list[ScheduledChunk], num_decodes: int,
                 inter: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """One micro-batch through this rank's layers. Returns (output, replayed a graph): the output is the
        residual stream for the next stage [T, hidden], or on the last stage the logits of the rows that sample
        [n, V] (None when none does)."""
        if self.graphs is not None and num_decodes == len(part) and self.graphs.fits(len(part)):
            return self._forward_graph(part, inter), True
        x = build_inputs(part, num_decodes, self.requests, self.block_size, self.device)
        if x.pending:  # decode inputs sampled by the step before, not yet on the host
            at = to_device([i for i, _ in x.pending], torch.int64, self.device)
            src = to_device([s for _, s in x.pending], torch.int64, self.device)
            x.input_ids.index_copy_(0, at, self.last_sampled.index_select(0, src))
        with forward_context(x.meta):
            y = self.model(x.input_ids, x.positions, None if inter is None else (inter, None))
        if not self.link.is_last:
            hidden, residual = y
            return hidden + residual, False
        if not x.sample_rows:
            return None, False
        return self.model.compute_logits(y[to_device(x.sample_rows, torch.int64, self.device)]), False

    def _forward_graph(self, part: list[ScheduledChunk], inter: torch.Tensor | None) -> torch.Tensor | None:
        """A decode-only micro-batch as a graph replay."""
        reqs = [self.requests[c.request_id] for c in part]
        pending = [is_pending(c, r) for c, r in zip(part, reqs)]
        ids = [0 if p else r.token_ids[c.start] for c, r, p in zip(part, reqs, pending)]
        y = self.graphs.run(ids, [c.start for c in part], [r.slot for r in reqs],
                            pending if any(pending) else None, inter)
        if not self.link.is_last or all(c.sample for c in part):
            return y
        rows = [i for i, c in enumerate(part) if c.sample]
        return y[to_device(rows, torch.int64, self.device)] if rows else None


class StepHandle:
    """A launched step. Its sampled ids (and logprobs) are copied to pinned host memory behind the step,
    with an event recorded after the copy; `result()` waits for that event only. A rank that does not sample
    holds no tokens and its result is empty.

    Structured outputs (the driver, a step with a constrained row): the forward is queued but sampling waits
    for the grammar bitmask: `needs_grammar` is true, `sample_ids` are the request ids of the logits rows, and
    the engine calls `sample(rows, bitmask)` before `result()`."""

    def __init__(self, runner: ModelRunner, plan: StepPlan, sample_chunks: list[ScheduledChunk],
                 batch: SamplingBatch | None):
        self.runner, self.plan, self.sample_chunks, self.batch = runner, plan, sample_chunks, batch
        self.stats = [0, 0.0, 0]
        self.event = None
        self.logits: torch.Tensor | None = None  # [rows, V] waiting for the grammar bitmask
        self.tokens = self.lps = None
        # position in sample_chunks of each sampling chunk, in plan order
        by_chunk = {id(c): i for i, c in enumerate(sample_chunks)}
        self.order = [by_chunk[id(c)] for c in plan.chunks if c.sample]

    @property
    def needs_grammar(self) -> bool:
        return self.logits is not None

    @property
    def sample_ids(self) -> list[str]:
        return [c.request_id for c in self.sample_chunks]

    @torch.inference_mode()
    def sample(self, rows: list[int], bitmask: torch.Tensor) -> None:
        """Sample the held logits with rows[i]'s tokens limited to bitmask[i] ([len(rows), W] int32, host)."""
        t0 = time.perf_counter()
        r = self.runner
        logits, self.logits = self.logits, None
        grammar = None
        if rows:
            dev = r.device
            mask = bitmask.to(dev, non_blocking=True) if dev.type == "cuda" else bitmask.to(dev)
            grammar = (to_device(rows, torch.int64, dev), mask)
        tokens, lps = r.sampler.sample(logits, self.batch, grammar)
        r._sampled(self, tokens, lps)
        self.stats[1] += time.perf_counter() - t0

    def set_tokens(self, tokens: torch.Tensor | None, lps: tuple | None) -> None:
        if tokens is not None and tokens.is_cuda:
            tokens, lps = _to_host(tokens), (tuple(_to_host(t) for t in lps) if lps is not None else None)
            self.event = torch.cuda.Event()
            self.event.record()
        self.tokens, self.lps = tokens, lps

    def result(self) -> StepResult:
        assert self.logits is None, "a step with structured outputs was not sampled (StepHandle.sample)"
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
