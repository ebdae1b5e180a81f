"""`AsyncLLM`: the synchronous `LLMEngine` driven from one background thread, for asyncio callers.

Contract
- The engine is not thread-safe. Only the engine thread (`strata-engine`) ever touches it after
  construction: requests and aborts travel to it through one FIFO command queue, outputs come back to the
  event loop through `loop.call_soon_threadsafe`, one hand-off per engine step.
- `add_request` returns once the engine has accepted the request (validation errors such as
  `ParameterError` are raised from it, before any output), so a server can still answer 400 instead of
  starting a stream. `generate` is the convenience iterator over it.
- A request whose consumer goes away (iterator closed, task cancelled) is aborted; the engine frees its KV
  blocks at once.
- If the engine raises from `step()` (or the thread dies), the engine is dead: every pending request fails
  with `EngineDeadError`, new requests are refused with it, `is_dead` turns true.
- `drain(timeout)` refuses new requests (`EngineDrainingError`), waits for in-flight ones to finish, and
  fails what is left after the timeout with `EngineDrainingError`. `shutdown()` stops the thread.
- Timing (TTFT, inter-token latency, queue time, end-to-end) is measured here, with the engine thread's
  clock at the end of the step that produced each token, and reported to `observers` on the event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from strata.core.errors import EngineDeadError, StrataError
from strata.core.outputs import RequestOutput
from strata.core.sampling_params import SamplingParams

logger = logging.getLogger("strata.async_llm")


class EngineDrainingError(StrataError):
    """The engine is draining for shutdown and takes no new requests (or ran out of drain time)."""


@dataclass
class StatsSnapshot:
    """A copy of the engine's stats, refreshed by the engine thread after every step and command batch."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    num_steps: int = 0
    updated: float = 0.0


@dataclass
class RequestTiming:
    """Per-request timing, monotonic seconds. Filled on the event loop from engine-thread timestamps."""
    request_id: str
    arrival_time: float
    params: SamplingParams
    num_prompt_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0
    finish_reasons: list[str | None] = field(default_factory=list)
    aborted: bool = False  # aborted by the caller (disconnect) or by drain, not by the engine
    # per completion index: time of its previous token (for inter-token latency)
    last_token_by_index: dict[int, float] = field(default_factory=dict)


class Observer(Protocol):
    def on_tokens(self, timing: RequestTiming, num_tokens: int) -> None: ...
    def on_first_token(self, timing: RequestTiming, ttft: float) -> None: ...
    def on_inter_token(self, timing: RequestTiming, seconds: float, num_tokens: int) -> None: ...
    def on_finished(self, timing: RequestTiming) -> None: ...


_STOP = object()


class RequestStream:
    """Outputs of one request, in order, on the event loop. Ends after the finished output or an error."""

    def __init__(self, request_id: str, timing: RequestTiming):
        self.request_id = request_id
        self.timing = timing
        self._q: asyncio.Queue = asyncio.Queue()
        self.finished = False  # the engine reported it finished (or it failed)
        self._done_reading = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        if self.finished:
            return
        if isinstance(item, BaseException) or item.finished:
            self.finished = True
        self._q.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done_reading:
            raise StopAsyncIteration
        item = await self._q.get()
        if isinstance(item, BaseException):
            self._done_reading = True
            raise item
        if item.finished:
            self._done_reading = True
        return item


class AsyncLLM:
    def __init__(self, engine: Any, *, observers: list[Observer] | None = None,
                 idle_poll_s: float = 0.5):
        self.engine = engine
        self.observers: list[Observer] = list(observers or [])
        self._idle_poll_s = idle_poll_s
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}   # event-loop thread only
        self._pending_adds = 0                          # submitted, not yet accepted by the engine thread
        self._dead: BaseException | None = None
        self._draining = False
        self._stopping = False
        self._stats = StatsSnapshot()
        self._thread: threading.Thread | None = None
        self._idle_event: asyncio.Event | None = None
        self.num_aborted_by_drain = 0

    @classmethod
    def from_engine_args(cls, engine_args, **kw) -> "AsyncLLM":
        from strata.engine.llm_engine import LLMEngine
        return cls(LLMEngine.from_engine_args(engine_args), **kw)

    # ------------------------------------------------------------------ properties
    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def config(self):
        return self.engine.config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_dead(self) -> bool:
        return self._dead is not None or (self._thread is not None and not self._thread.is_alive()
                                          and not self._stopping)

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished (as seen by the event loop)."""
        return len(self._streams)

    @property
    def num_queued(self) -> int:
        """Requests not yet running: submitted but unseen by the engine thread, plus the engine's waiting queue."""
        return self._pending_adds + self._stats.num_waiting

    def stats(self) -> StatsSnapshot:
        return dataclasses.replace(self._stats)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind to the running event loop and start the engine thread (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._idle_event = asyncio.Event()
            self._idle_event.set()
        elif self._loop is not loop:
            raise RuntimeError("AsyncLLM is bound to another event loop")
        if self._thread is None:
            self._refresh_stats()
            self._thread = threading.Thread(target=self._run, name="strata-engine", daemon=True)
            self._thread.start()

    async def drain(self, timeout: float) -> int:
        """Refuse new requests, wait up to `timeout` s for in-flight ones; fail the rest. Returns how many failed."""
        self._draining = True
        if self._loop is None:
            return 0
        deadline = time.monotonic() + max(0.0, timeout)
        while self._streams and not self.is_dead:
            assert self._idle_event is not None
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._idle_event.wait(), timeout=min(left, 0.25))
            except asyncio.TimeoutError:
                pass
        left_over = list(self._streams)
        if left_over:
            err = EngineDrainingError(f"the server is shutting down; request aborted after the "
                                      f"{timeout:g} s drain timeout")
            now = time.monotonic()
            for rid in left_over:
                st = self._streams.get(rid)
                if st is not None:
                    st._put(err)
                    self._finish_aborted(st, now)
                self._forget(rid)
            self._cmds.put(("abort", left_over))
            self.num_aborted_by_drain += len(left_over)
        return len(left_over)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._draining = True
        self._cmds.put(_STOP)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        close = getattr(self.engine, "shutdown", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort at exit
                logger.exception("engine shutdown failed")

    # ------------------------------------------------------------------ requests
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                          arrival_time: float | None = None) -> RequestStream:
        """Hand a request to the engine; returns its stream once accepted. Raises the engine's validation
        errors, `EngineDeadError`, `EngineDrainingError`."""
        self.start()
        if self._dead is not None or self.is_dead:
            raise EngineDeadError(f"the engine is dead: {self._dead!r}")
        if self._draining:
            raise EngineDrainingError("the server is shutting down and takes no new requests")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        assert self._loop is not None and self._idle_event is not None
        arrival = time.monotonic() if arrival_time is None else arrival_time
        timing = RequestTiming(request_id, arrival, params,
                               num_prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
        stream = RequestStream(request_id, timing)
        fut: asyncio.Future = self._loop.create_future()
        self._streams[request_id] = stream
        self._idle_event.clear()
        self._pending_adds += 1
        self._cmds.put(("add", request_id, prompt, params, arrival, fut))
        try:
            await fut
        except asyncio.CancelledError:
            # The caller went away before the engine answered: make sure the request does not run.
            self._forget(request_id)
            self._cmds.put(("abort", [request_id]))
            raise
        except BaseException:
            self._forget(request_id)
            raise
        return stream

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(request_id, prompt, params, arrival_time=arrival_time)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str | list[str]) -> None:
        """Abort requests (their streams end at once; the engine frees their KV blocks). Unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        live = [rid for rid in ids if rid in self._streams]
        now = time.monotonic()
        for rid in live:
            self._finish_aborted(self._streams[rid], now)
            self._forget(rid)
        if live:
            self._cmds.put(("abort", live))

    def _finish_aborted(self, st: RequestStream, now: float) -> None:
        t = st.timing
        if t.finished_time is not None:
            return
        t.finished_time = now
        t.aborted = True
        t.finish_reasons = ["abort"] * max(1, t.params.n)
        for ob in self.observers:
            ob.on_finished(t)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._streams and self._idle_event is not None:
            self._idle_event.set()

    # ------------------------------------------------------------------ engine thread
    def _refresh_stats(self) -> None:
        s = self.engine.get_stats()
        snap = StatsSnapshot(updated=time.monotonic(), num_steps=self._stats.num_steps)
        for f in dataclasses.fields(StatsSnapshot):
            if f.name in ("updated", "num_steps"):
                continue
            v = getattr(s, f.name, None)
            if v is not None:
                setattr(snap, f.name, v)
        self._stats = snap  # one reference swap: readers see a whole snapshot

    def _post(self, fn: Callable, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed between the check and the call
            pass

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                cmds = []
                busy = engine.has_unfinished_requests()
                try:
                    if not busy:
                        cmds.append(self._cmds.get(timeout=self._idle_poll_s))
                    while True:
                        cmds.append(self._cmds.get_nowait())
                except queue.Empty:
                    pass
                acks: list[tuple[asyncio.Future, BaseException | None]] = []
                stop = False
                for cmd in cmds:
                    if cmd is _STOP:
                        stop = True
                        continue
                    if cmd[0] == "add":
                        _, rid, prompt, params, arrival, fut = cmd
                        try:
                            engine.add_request(rid, prompt, params, arrival_time=arrival)
                            acks.append((fut, None))
                        except Exception as e:  # noqa: BLE001 - handed to the caller
                            acks.append((fut, e))
                    elif cmd[0] == "abort":
                        try:
                            engine.abort_request(cmd[1])
                        except Exception:  # noqa: BLE001 - unknown / finished ids
                            for rid in cmd[1]:
                                try:
                                    engine.abort_request(rid)
                                except Exception:  # noqa: BLE001
                                    pass
                if stop:
                    # fail whatever is left so no caller waits forever
                    self._post(self._fail_all, EngineDeadError("the engine was shut down"), acks)
                    return
                if cmds:
                    self._refresh_stats()
                if acks:
                    self._post(self._on_acks, acks)
                if engine.has_unfinished_requests():
                    outs = engine.step()
                    now = time.monotonic()
                    self._stats.num_steps += 1
                    self._refresh_stats()
                    if outs:
                        self._post(self._on_outputs, outs, now)
        except BaseException as e:  # noqa: BLE001 - any failure in the loop kills the engine
            logger.exception("engine loop died")
            self._dead = e
            self._post(self._fail_all, EngineDeadError(f"the engine died: {type(e).__name__}: {e}"), [])

    # ------------------------------------------------------------------ event loop side
    def _on_acks(self, acks) -> None:
        for fut, err in acks:
            self._pending_adds -= 1
            if fut.done():
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)

    def _on_outputs(self, outs: list[RequestOutput], now: float) -> None:
        for out in outs:
            st = self._streams.get(out.request_id)
            if st is None:
                continue
            self._observe(st.timing, out, now)
            st._put(out)
            if out.finished:
                self._forget(out.request_id)

    def _observe(self, t: RequestTiming, out: RequestOutput, now: float) -> None:
        if not t.num_prompt_tokens:
            t.num_prompt_tokens = len(out.prompt_token_ids)
        m = out.metrics
        if t.first_scheduled_time is None and m is not None and m.first_scheduled_time:
            t.first_scheduled_time = m.first_scheduled_time
        for c in out.outputs:
            k = len(c.token_ids_delta)
            if not k:
                continue
            t.num_generation_tokens += k
            for ob in self.observers:
                ob.on_tokens(t, k)
            prev = t.last_token_by_index.get(c.index)
            if t.first_token_time is None:
                t.first_token_time = now
                for ob in self.observers:
                    ob.on_first_token(t, now - t.arrival_time)
            if prev is not None:
                # k tokens since this completion's previous output: k gaps of (now - prev) / k each
                for ob in self.observers:
                    ob.on_inter_token(t, (now - prev) / k, k)
            elif k > 1:
                # several tokens in the completion's first output: the extra ones came with no gap
                for ob in self.observers:
                    ob.on_inter_token(t, 0.0, k - 1)
            t.last_token_by_index[c.index] = now
            t.last_token_time = now
        if out.finished:
            t.finished_time = now
            t.finish_reasons = [c.finish_reason for c in out.outputs]
            if t.first_scheduled_time is None:
                t.first_scheduled_time = t.first_token_time
            for ob in self.observers:
                ob.on_finished(t)

    def _fail_all(self, err: BaseException, acks) -> None:
        for fut, _ in acks:
            self._pending_adds -= 1
            if not fut.done():
                fut.set_exception(err)
        for rid, st in list(self._streams.items()):
            st._put(err)
        # futures of adds the engine thread never saw
        self._streams.clear()
        self._pending_adds = 0
        if self._idle_event is not None:
            self._idle_event.set()
        self._fail_pending_futures(err)

    def _fail_pending_futures(self, err: BaseException) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd is not _STOP and cmd[0] == "add" and not cmd[5].done():
                cmd[5].set_exception(err)
