"""Continuous-batching scheduler (pure Python).

Each step: running requests first (decodes and unfinished prefill chunks), in order, within the token
budget; when blocks run out, the lowest-priority running request is preempted (blocks freed, recomputed
later). Then waiting requests are admitted while budget, `max_num_seqs` and blocks allow, each starting
from its longest cached prefix. A request never needs more blocks than the pool holds (max_model_len is
capped at config time), so a lone request always fits: no crash, no hang.

Async scheduling (`schedule(in_flight=True)`): the previous step still runs, so its sampled tokens are
pending (`Request.num_pending`) and count as known for the arithmetic; a request whose pending token may be
its last (max_tokens, max_model_len) is not scheduled. Nothing is preempted while a step is in flight: if
blocks run out, scheduling stops and the plan is marked `blocked`; the engine then finishes the step in
flight and schedules synchronously, where preemption is allowed.

The plan is a diff for the runners (`core/plan.py`): a request admitted (or resumed after a preemption) goes
out in full as a `NewRequest`; afterwards each chunk carries the tokens and blocks the runners were not sent
yet (`_sent` counts them per request), and the ids of requests that ended go out with the next plan.
"""
from __future__ import annotations

import time
from collections import deque

from strata.core.plan import NewRequest, ScheduledChunk, StepPlan, StepResult
from strata.core.request import Request, RequestStatus
from strata.kvcache.manager import KVCacheManager


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True, policy: str = "fcfs",
                 admit_batch: int = 1, admit_wait_steps: int = 0):
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"unknown scheduling policy {policy!r} (fcfs, priority)")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.chunked = enable_chunked_prefill
        self.policy = policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._sent: dict[str, list[int]] = {}  # running request -> [tokens, blocks] the runners hold
        self._finished: list[str] = []  # ended since the last plan
        self.num_preemptions = 0
        # Admission batching: while requests decode, hold new ones until `admit_batch` slots are free or
        # one has waited `admit_wait_steps` steps. Mixed prefill+decode steps cost far more than decode
        # steps (which replay CUDA graphs), so fewer, larger admissions raise throughput; the wait bounds
        # the added time to first token.
        self.admit_batch = max(1, admit_batch)
        self.admit_wait_steps = admit_wait_steps
        self._held_steps = 0

    # ---- queue management ----
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release_slot(self, req: Request) -> None:
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None
        self._sent.pop(req.request_id, None)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stop, length, abort, error): its blocks are freed at once."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req.status = status
        self.kv.free(req)
        self._release_slot(req)
        self.requests.pop(req.request_id, None)
        self._finished.append(req.request_id)

    def _preempt(self, req: Request) -> None:
        assert req.num_pending == 0, f"{req} preempted with a step in flight"
        self.running.remove(req)
        self.kv.free(req)
        self._release_slot(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _victim(self) -> Request:
        """The request to preempt: the lowest priority (fcfs: the latest)."""
        if self.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _next_waiting(self) -> Request | None:
        """The next request to admit; one whose grammar is still compiling waits (the others go on)."""
        if self.policy == "priority":
            ready = [r for r in self.waiting if r.grammar is None or r.grammar.ready]
            return min(ready, key=lambda r: (r.priority, r.arrival_time)) if ready else None
        head = self.waiting[0]
        if head.grammar is None or head.grammar.ready:
            return head
        return next((r for r in self.waiting if r.grammar is None or r.grammar.ready), None)

    # ---- the step ----
    def _at_limit(self, req: Request) -> bool:
        """Its pending tokens already reach max_tokens or max_model_len: nothing more to compute."""
        return (req.num_output_tokens + req.num_pending >= req.max_tokens
                or req.num_tokens + req.num_pending >= self.max_model_len)

    def _add_chunk(self, plan: StepPlan, req: Request, n: int) -> None:
        start = req.num_computed_tokens
        sample = start + n == req.num_tokens + req.num_pending
        n_tok, n_blk = req.num_tokens, len(req.block_ids)
        sent = self._sent.get(req.request_id)
        if sent is None:  # admitted or resumed: the runners get all of it
            plan.new_requests.append(NewRequest.of(req))
            self._sent[req.request_id] = [n_tok, n_blk]
            toks, blocks = (), ()
        else:
            toks = req.tokens(sent[0], n_tok) if n_tok > sent[0] else ()
            blocks = req.block_ids[sent[1]:] if n_blk > sent[1] else ()
            sent[0], sent[1] = n_tok, n_blk
        plan.chunks.append(ScheduledChunk(req.request_id, start, n, sample, toks, blocks, req))
        req.num_computed_tokens += n
        req.num_pending += sample

    def schedule(self, in_flight: bool = False) -> StepPlan:
        """The next step's plan. `in_flight`: the previous step is still running (async scheduling)."""
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        preempted_now = False

        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted this step
                continue
            n = req.num_tokens + req.num_pending - req.num_computed_tokens
            if n > budget and not self.chunked:
                continue
            n = min(n, budget)
            if n <= 0 or self._at_limit(req):
                continue
            ok = True
            # fast path: a decode whose last block still has room needs no allocation
            fits = req.num_computed_tokens + n <= len(req.block_ids) * self.kv.block_size
            while not fits and not self.kv.allocate_slots(req, n):
                if in_flight:
                    plan.blocked = True
                    break
                victim = self._victim()
                for j, c in enumerate(plan.chunks):  # (priority policy) victim already scheduled
                    if c.request is victim:
                        budget += c.num_tokens
                        victim.num_pending -= c.sample  # (_preempt resets its computed tokens)
                        del plan.chunks[j]
                        break
                self._preempt(victim)
                plan.preempted.append(victim.request_id)
                preempted_now = True
                if victim is req:
                    ok = False
                    break
            if plan.blocked:
                break
            if not ok:
                continue
            self._add_chunk(plan, req, n)
            budget -= n

        if self.waiting and self.running and not preempted_now:
            free = self.max_num_seqs - len(self.running)
            if free < min(self.admit_batch, len(self.waiting)) and self._held_steps < self.admit_wait_steps:
                self._held_steps += 1
                return self._close(plan, budget)
        self._held_steps = 0
        while (self.waiting and budget > 0 and not preempted_now and not plan.blocked
               and len(self.running) < self.max_num_seqs):
            req = self._next_waiting()
            if req is None:
                break
            blocks, n_cached = self.kv.get_computed_blocks(req)
            n = req.num_tokens - n_cached
            if n > budget and not self.chunked:
                break
            n = min(n, budget)
            if not self.kv.allocate_slots(req, n, blocks):
                break
            self.waiting.remove(req)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = n_cached
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = n_cached
            req.slot = self.free_slots.pop()
            self.running.append(req)
            self._add_chunk(plan, req, n)
            budget -= n
        return self._close(plan, budget)

    def _close(self, plan: StepPlan, budget: int) -> StepPlan:
        plan.num_batched_tokens = self.max_num_batched_tokens - budget
        if plan.chunks:  # an empty plan is not run: the ids of finished requests wait for the next one
            plan.finished_ids, self._finished = self._finished, []
        return plan

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply a finished step: register newly full blocks, append sampled tokens, finish by eos/stop
        id/length. Returns the requests that received a token this step (in plan order). With async
        scheduling the next plan is already scheduled (and may include a request finished here: its extra
        token is dropped when that plan is applied, as the request is no longer running)."""
        sampled: list[Request] = []
        it = iter(result.sampled_token_ids)
        for c in plan.chunks:
            req = c.request
            tok = next(it) if c.sample else None
            req.num_pending -= c.sample
            if req.status != RequestStatus.RUNNING:  # finished (or aborted) during the step
                continue
            # Only positions computed by this (finished) step, of tokens known here, go into the prefix cache.
            self.kv.cache_full_blocks(req, c.start + c.num_tokens)
            if tok is None:
                continue
            req.output_token_ids.append(tok)
            sampled.append(req)
            if req.grammar is not None and not req.grammar.accept(tok):
                req.stop_reason = "grammar rejected a sampled token"
                self.finish(req, RequestStatus.FINISHED_ERROR)
                continue
            status = self._check_stop(req, tok)
            if status is not None:
                self.finish(req, status)
        return sampled

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
        p = req.params
        n_out = req.num_output_tokens
        if req.grammar is not None and req.grammar.is_terminated():  # the grammar's end (after its stop token)
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in p.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if tok in p.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def check_invariants(self) -> None:
        live = list(self.running)
        for r in self.waiting:
            assert not r.block_ids, f"waiting {r} holds blocks"
            assert r.slot is None
            assert r.num_pending == 0, f"waiting {r} has pending tokens"
        for r in live:
            # at most two steps (the one in flight and one just scheduled) sample for a request, and a
            # request with a token pending has computed everything but that token
            assert 0 <= r.num_pending <= 2, f"{r}: {r.num_pending} pending tokens"
            total = r.num_tokens + r.num_pending
            ok = r.num_computed_tokens == total - 1 if r.num_pending else r.num_computed_tokens <= total
            assert ok, f"{r}: computed tokens out of step with {r.num_pending} pending"
            # the last token a request may have (max_tokens, max_model_len) is never fed back
            assert r.num_computed_tokens < min(r.num_prompt_tokens + r.max_tokens, self.max_model_len), \
                f"{r}: computed past its last token"
        self.kv.check_invariants(live)
        slots = [r.slot for r in self.running]
        assert None not in slots and len(set(slots)) == len(slots), "slot clash"
        assert len(self.running) <= self.max_num_seqs
