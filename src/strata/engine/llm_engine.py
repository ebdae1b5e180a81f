"""LLMEngine: the synchronous engine core. add_request() validates and enqueues; step() runs one
scheduler + model step and returns the outputs of requests that changed.

Contract: the engine is single-threaded (the async layer drives it from one thread). Tokenization and
detokenization happen here, outside the scheduler and runner.

The engine hands each plan to its executor (`engine/executor.py`: one process, or a TP x PP mesh of them) and
asks it how many steps may be in flight. With two (async scheduling), a step schedules and launches step N+1
while step N still runs on the device, then waits for N and applies it, so each step's outputs come one step()
later. It steps synchronously (waits for N before scheduling) while a request with a token in flight needs its
tokens on the host to sample the next one (see `_needs_sync`).

Structured outputs (`strata.structured`): a request's grammar is checked in `add_request` and compiled on a worker
thread (cached by spec); the scheduler admits it when compiled. A step with a constrained row is launched with its
sampling held back; once the step before it is applied (every earlier token accepted into the grammars), the
engine fills the bitmask on the host, while the forward runs, and the handle samples with it (`_sample_grammar`).
"""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass

from strata.config.engine import EngineArgs, EngineConfig
from strata.core.errors import ParameterError, PromptTooLongError
from strata.core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from strata.core.request import Request, RequestStatus
from strata.core.sampling_params import SamplingParams
from strata.core.plan import StepPlan, StepResult
from strata.engine.builder import build_inproc
from strata.engine.executor import Executor
from strata.engine.launch import needs_executor
from strata.engine.multiproc import build_multiproc
from strata.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from strata.kvcache.manager import KVCacheManager
from strata.models.config import ModelConfig
from strata.runner.model_runner import StepHandle
from strata.sched.scheduler import Scheduler


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int


def prompt_ids(tokenizer, vocab: int, max_len: int, prompt: str | list[int], params: SamplingParams) -> list[int]:
    """The prompt's token ids, or the ParameterError an engine would raise for it (also used by the
    data-parallel front end, which checks requests before handing them to a replica)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab]
        if bad:
            raise ParameterError("prompt", f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    if not ids:
        raise ParameterError("prompt", "the prompt is empty")
    if len(ids) >= max_len:
        raise PromptTooLongError(len(ids), max_len)
    if params.max_tokens is not None and params.max_tokens > max_len - len(ids):
        raise ParameterError("max_tokens", f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} "
                                           f"tokens exceeds max_model_len={max_len}")
    return ids


class _Child:
    """Output-side state of one of a request's n samples."""

    def __init__(self, req: Request, detok: IncrementalDetokenizer):
        self.req = req
        self.detok = detok
        self.text = ""  # full output text (stop strings cut)
        self.sent_text = 0  # characters already reported in deltas
        self.sent_tokens = 0
        self.logprobs: list | None = [] if req.params.logprobs is not None else None
        # Final-only outputs without stop strings need no incremental text: decode once at the end.
        self.lazy_text = req.params.output_kind == "final" and not req.params.stop
        self.finish_reason: str | None = None
        self.reported_finish = False


class _Parent:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 arrival: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.children: list[_Child] = []
        self.pending: list[Request] = []  # siblings held back until the first child's prompt is cached
        self.metrics = RequestMetrics(arrival_time=arrival)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children) and not self.pending


class LLMEngine:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, tokenizer: Tokenizer, executor: Executor):
        self.config = config
        self.model_config = model_cfg
        self.tokenizer = tokenizer
        self.runner = executor  # the executor (named runner as before: benchmarks and tests read it)
        self.model_name = config.served_model_name
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=config.max_model_len,
                                   enable_chunked_prefill=config.enable_chunked_prefill,
                                   policy=config.scheduling_policy, admit_batch=config.admit_batch,
                                   admit_wait_steps=config.admit_wait_steps)
        self.parents: dict[str, _Parent] = {}
        self.child_parent: dict[str, _Parent] = {}
        self.holding: set[str] = set()  # parents whose n > 1 siblings are held back (parent.pending)
        self.async_scheduling = executor.max_steps_in_flight > 1
        self.in_flight: tuple[StepPlan, StepHandle] | None = None
        self._aborted_outputs: list[RequestOutput] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.eos_token_ids = sorted(set(tokenizer.eos_token_ids) | set(model_cfg.eos_token_id))
        self._grammars = None  # strata.structured.GrammarBackend, made for the first structured request
        self._compiling: list[Request] = []  # requests whose grammar was not compiled when they were added

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        # TP x PP > 1, several nodes, or a torchrun/srun rank: worker processes (other ranks serve and exit there)
        build = build_multiproc if needs_executor(args) else build_inproc
        return cls(*build(args))

    def shutdown(self) -> None:
        if self._grammars is not None:
            self._grammars.shutdown()
        self.runner.shutdown()

    @property
    def grammars(self):
        """The grammar backend (xgrammar over this engine's tokenizer and the model's vocabulary width)."""
        if self._grammars is None:
            from strata.structured import GrammarBackend
            self._grammars = GrammarBackend(self.tokenizer.hf, self.model_config.vocab_size, self.eos_token_ids)
        return self._grammars

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    arrival_time: float | None = None, cache_salt: str | None = None) -> None:
        if request_id in self.parents:
            raise ParameterError("request_id", f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = prompt_ids(self.tokenizer, self.model_config.vocab_size, self.config.max_model_len, prompt, params)
        room = self.config.max_model_len - len(ids)
        params = params.clone(eos_token_ids=list(self.eos_token_ids))
        so = params.structured_outputs
        grammar = self.grammars.prepare(so) if so is not None else None  # a bad spec raises here
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        parent = _Parent(request_id, text, ids, params, arrival)
        for i in range(params.n):
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(cid, ids, params, arrival_time=arrival, max_tokens=max_tokens,
                          parent_id=request_id, index=i, cache_salt=cache_salt)
            if grammar is not None:
                from strata.structured import RequestGrammar
                req.grammar = RequestGrammar(grammar)
                if not req.grammar.ready:  # compiling (or failed: _check_compiles ends it)
                    self._compiling.append(req)
            detok = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens)
            parent.children.append(_Child(req, detok))
            self.child_parent[cid] = parent
            if i == 0 or not self.config.enable_prefix_caching:
                self.scheduler.add(req)
            else:
                parent.pending.append(req)
                self.holding.add(request_id)
        self.parents[request_id] = parent
        self.prompt_tokens_total += len(ids) * params.n

    def abort_request(self, request_ids: str | list[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self.parents.get(rid)
            if parent is None:
                continue
            parent.pending.clear()
            self.holding.discard(rid)
            for c in parent.children:
                if c.finish_reason is None:
                    self.scheduler.finish(c.req, RequestStatus.FINISHED_ABORTED)
                    c.finish_reason = "abort"
            self._aborted_outputs.append(self._make_output(parent))
            self._drop(parent)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents) or bool(self._aborted_outputs) or self.in_flight is not None

    def get_stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self.kv.usage, s.num_preemptions,
                           self.prompt_tokens_total, self.generation_tokens_total,
                           self.kv.prefix_queries, self.kv.prefix_hits)

    # ---------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted_outputs = self._aborted_outputs, []
        if self._compiling:
            outputs += self._check_compiles()
        if self.async_scheduling:
            return outputs + self._step_async()
        plan = self.scheduler.schedule()
        if plan.empty:
            self._wait_compiles()
            return outputs
        handle = self.runner.launch(plan)
        if handle.needs_grammar:
            self._sample_grammar(handle)
        return outputs + self._apply(plan, handle.result())

    def _step_async(self) -> list[RequestOutput]:
        """Schedule and launch step N+1, then wait for step N (in flight) and apply it."""
        outputs = []
        prev, self.in_flight = self.in_flight, None
        if prev is not None and (prev[0].blocked or self._needs_sync()):
            outputs += self._apply(prev[0], prev[1].result())
            prev = None
        plan = self.scheduler.schedule(in_flight=prev is not None)
        handle = None
        if not plan.empty:
            handle = self.runner.launch(plan)
            self.in_flight = (plan, handle)
        if prev is not None:
            outputs += self._apply(prev[0], prev[1].result())
        if handle is not None and handle.needs_grammar:  # the forward runs while the bitmask is filled
            self._sample_grammar(handle)
        if handle is None and prev is None:
            self._wait_compiles()
        return outputs

    # ---------------------------------------------------------------- structured outputs
    def _sample_grammar(self, handle: StepHandle) -> None:
        """Fill the grammar bitmask of the step's constrained rows (their grammars have accepted every earlier
        token) and let the handle sample. Rows of requests that ended meanwhile are left free: their token is
        dropped when the step is applied."""
        rows, grammars = [], []
        running = self.scheduler.requests
        for i, rid in enumerate(handle.sample_ids):
            req = running.get(rid)
            if req is not None and req.grammar is not None and not req.is_finished \
                    and not req.grammar.is_terminated():
                rows.append(i)
                grammars.append(req.grammar)
        backend = self.grammars
        bitmask = backend.new_bitmask(len(rows), pin=self.runner.device.type == "cuda")
        if rows:
            backend.fill_bitmask(grammars, bitmask)
        handle.sample(rows, bitmask)

    def _check_compiles(self) -> list[RequestOutput]:
        """Requests whose grammar failed to compile end with finish_reason "error"."""
        still, failed = [], []
        for req in self._compiling:
            fut = req.grammar.future
            if not fut.done():
                still.append(req)
            elif fut.exception() is not None and not req.is_finished:
                failed.append(req)
        self._compiling = still
        outputs = []
        for req in failed:
            parent = self.child_parent.get(req.request_id)
            req.stop_reason = f"grammar compilation failed: {req.grammar.error}"
            if parent is not None and req in parent.pending:
                parent.pending.remove(req)
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
            if parent is not None:
                parent.children[req.index].finish_reason = "error"
                if parent.finished:
                    outputs.append(self._make_output(parent))
                    self._drop(parent)
        return outputs

    def _wait_compiles(self) -> None:
        """Nothing to run but grammars compile: wait for one (briefly) instead of spinning."""
        futs = [r.grammar.future for r in self._compiling]
        if futs and not self.scheduler.running:
            concurrent.futures.wait(futs, timeout=0.05, return_when=concurrent.futures.FIRST_COMPLETED)

    def _needs_sync(self) -> bool:
        """Whether the next step must wait for the one in flight: a request whose token is still on the
        device samples with host-side state of its tokens (penalties; min_tokens masking, which the sampler
        decides from the host's output count), returns logprobs, or n > 1 siblings wait to be released."""
        if self.holding:
            return True
        for r in self.scheduler.running:
            if r.num_pending:
                p = r.params
                if (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                        or p.logprobs is not None or r.num_output_tokens < p.min_tokens):
                    return True
        return False

    def _apply(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Scheduler update for a finished step, then the outputs of the requests it changed."""
        sampled = self.scheduler.update(plan, result)
        self.generation_tokens_total += len(sampled)
        if self.config.check_invariants:
            self.scheduler.check_invariants()
        now = time.monotonic()
        touched: dict[str, _Parent] = {}
        for c in plan.chunks:  # release held-back siblings once the shared prompt is cached
            parent = self.child_parent.get(c.request.request_id)
            if parent is not None and parent.pending and c.start + c.num_tokens >= len(parent.prompt_ids) - 1:
                for r in parent.pending:
                    self.scheduler.add(r)
                parent.pending = []
                self.holding.discard(parent.request_id)
            if parent is not None and parent.metrics.first_scheduled_time is None:
                parent.metrics.first_scheduled_time = c.request.first_scheduled_time
        lp_by_req = {}
        it = iter(result.logprobs)
        for c in plan.chunks:
            if c.sample:
                lp_by_req[c.request.request_id] = next(it)
        outputs = []
        for req in sampled:
            parent = self.child_parent.get(req.request_id)
            if parent is None:
                continue
            child = parent.children[req.index]
            self._process_token(child, req, lp_by_req.get(req.request_id))
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            parent.metrics.last_token_time = now
            touched[parent.request_id] = parent
        for parent in touched.values():
            if parent.params.output_kind == "final" and not parent.finished:
                continue
            out = self._make_output(parent)
            outputs.append(out)
            if out.finished:
                self._drop(parent)
        return outputs

    def _process_token(self, child: _Child, req: Request, lp) -> None:
        tok = req.output_token_ids[-1]
        p = req.params
        if child.lazy_text:
            if req.is_finished:
                child.finish_reason = req.status.value
                child.text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=p.skip_special_tokens)
            self._add_logprobs(child, tok, lp)
            return
        delta = child.detok.add([tok])
        self._add_logprobs(child, tok, lp)
        if req.is_finished:
            child.finish_reason = req.status.value
            delta += child.detok.flush()
        prev = len(child.text)
        child.text += delta
        if p.stop:
            longest = max(len(s) for s in p.stop)
            start = max(0, prev - longest + 1)
            hit = None
            for s in p.stop:
                i = child.text.find(s, start)
                if i >= 0 and (hit is None or i < hit[0]):
                    hit = (i, s)
            if hit is not None:
                i, s = hit
                child.text = child.text[: i + len(s)] if p.include_stop_str_in_output else child.text[:i]
                req.stop_reason = s
                if not req.is_finished:
                    self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                child.finish_reason = "stop"
        child.req = req

    @staticmethod
    def _add_logprobs(child: _Child, tok: int, lp) -> None:
        if child.logprobs is not None and lp is not None:
            chosen, top = lp
            entry = {tid: Logprob(v) for tid, v in top}
            entry[tok] = Logprob(chosen)
            child.logprobs.append(entry)

    def _make_output(self, parent: _Parent) -> RequestOutput:
        outs = []
        for c in parent.children:
            p = c.req.params
            # While running, hold back text that could still turn out to start a stop string.
            hold = (max(len(s) for s in p.stop) - 1) if (p.stop and c.finish_reason is None) else 0
            visible = len(c.text) - hold if hold else len(c.text)
            visible = max(visible, c.sent_text)
            toks = c.req.output_token_ids
            o = CompletionOutput(
                index=c.req.index, text=c.text[:visible], token_ids=list(toks),
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.req.stop_reason,
                text_delta=c.text[c.sent_text:visible], token_ids_delta=list(toks[c.sent_tokens:]),
                logprobs_delta=c.logprobs[c.sent_tokens:] if c.logprobs is not None else None)
            c.sent_text, c.sent_tokens = visible, len(toks)
            if c.finish_reason is not None:
                c.reported_finish = True
            outs.append(o)
        m = parent.metrics
        m.num_cached_tokens = parent.children[0].req.num_cached_tokens
        finished = parent.finished
        if finished:
            m.finished_time = time.monotonic()
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_ids, outs, finished, m)

    def _drop(self, parent: _Parent) -> None:
        self.parents.pop(parent.request_id, None)
        self.holding.discard(parent.request_id)
        for c in parent.children:
            self.child_parent.pop(c.req.request_id, None)
