"""The job loop: input records -> selection -> this rank's shard -> not yet done -> Jobs -> engine -> rows.

The engine is passed in (anything with `add_request`, `step`, `abort_request`, `has_unfinished_requests`,
i.e. `strata.engine.llm_engine.LLMEngine`), so the data layer is testable on its own.

Memory is bounded independently of the input's size: the reader streams, a prefetch thread builds at most
`queue_size` jobs ahead (reading, templating, tokenizing overlap with the engine's steps), and at most
`max_in_flight` requests are in the engine. A finished request's row is written (appended and flushed) at
once and the request forgotten.

Sharding: the k-th *selected* row (0-based, after `--filter`/token filters and `--limit`, which every rank
evaluates identically) belongs to rank `k % world_size`. Without content filters the shard is decided on the
raw record, so a rank does not even parse the other ranks' JSONL lines.
"""
from __future__ import annotations

import collections
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

from strata.batch.jobs import CONFIG_ERRORS, ErrorItem, Job, JobBuilder, error_row, job_error_row, result_row
from strata.batch.output import KeySet, RowWriter
from strata.batch.progress import Progress
from strata.batch.structured import check_row
from strata.batch.readers import Record, RowError
from strata.core.sampling_params import ParameterError

log = logging.getLogger("strata.batch")


class EngineLike(Protocol):
    def add_request(self, request_id: str, prompt: Any, params: Any) -> None: ...
    def step(self) -> list: ...
    def abort_request(self, request_ids: Any) -> None: ...
    def has_unfinished_requests(self) -> bool: ...


@dataclass
class Counters:
    read: int = 0  # records read from the input
    selected: int = 0  # rows after filters and --limit (all ranks)
    filtered: int = 0  # rows left out by --filter / token filters (no output row)
    other_shards: int = 0  # selected rows of other ranks
    skipped: int = 0  # rows of this shard already in the output (resume)


@dataclass
class Summary:
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    filtered: int = 0
    previous_rows: int = 0  # rows already in the output when the run started
    previous_errors: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    elapsed: float = 0.0
    interrupted: bool = False
    fatal: str | None = None
    counters: Counters = field(default_factory=Counters)

    @property
    def failed(self) -> bool:
        return self.errors > 0 or self.previous_errors > 0

    def text(self, output: str) -> str:
        el = max(self.elapsed, 1e-9)
        parts = [f"{self.ok} rows ok", f"{self.errors} errors", f"{self.skipped} skipped (already in the output)"]
        if self.filtered:
            parts.append(f"{self.filtered} filtered out")
        s = ("batch: " + ("INTERRUPTED after " if self.interrupted else "done: ") + ", ".join(parts)
             + f"; {self.output_tokens} output tokens in {self.elapsed:.1f} s ({self.output_tokens / el:,.1f} tok/s, "
             f"{(self.ok + self.errors) / el:,.2f} rows/s) -> {output}")
        if self.previous_errors:
            s += f"\nbatch: the output also holds {self.previous_errors} error rows from earlier runs (--retry-errors redoes them)"
        if self.fatal:
            s += f"\nbatch: stopped by an error: {self.fatal}"
        return s


def select_items(records: Iterable[Record], builder: JobBuilder, *, rank: int = 0, world_size: int = 1,
                 done: KeySet | None = None, limit: int | None = None,
                 counters: Counters | None = None, batch_size: int = 32) -> Iterator[Job | ErrorItem]:
    batch: list[tuple[Record, str, Any]] = []

    def flush() -> Iterator[Job | ErrorItem]:
        builder.prepare([r for r, _, _ in batch])  # tokenise the batch at once
        for rec, key, id_ in batch:
            yield builder.build(rec, key, id_)
        batch.clear()

    for todo in select_records(records, builder, rank=rank, world_size=world_size, done=done, limit=limit,
                               counters=counters):
        batch.append(todo)
        if len(batch) >= batch_size:
            yield from flush()
    yield from flush()


def select_records(records: Iterable[Record], builder: JobBuilder, *, rank: int = 0, world_size: int = 1,
                   done: KeySet | None = None, limit: int | None = None,
                   counters: Counters | None = None) -> Iterator[tuple[Record, str, Any]]:
    """(record, key, id) of the rows this rank has to do: selected, in its shard, not done yet."""
    c = counters if counters is not None else Counters()
    by_content = builder.o.selects_by_content
    k = 0  # index among selected rows
    for rec in records:
        c.read += 1
        if limit is not None and k >= limit:
            break
        if by_content:
            rec.load()
            if not builder.selected(rec):
                c.filtered += 1
                continue
        k += 1
        c.selected += 1
        if (k - 1) % world_size != rank:
            c.other_shards += 1
            continue
        rec.load()
        key, id_ = builder.identify(rec)
        if done is not None and key in done:
            c.skipped += 1
            continue
        yield rec, key, id_


_END = object()


class FailFast(Exception):
    pass


def misconfigured_message(errors: list, fields: list[str] | None = None) -> str:
    """The one message for a job whose first rows all failed with configuration errors (RowErrors)."""
    common = collections.Counter((e.type, e.message) for e in errors).most_common(1)[0][0]
    n = len(errors)
    s = (f"{'the only row' if n == 1 else f'all of the first {n} rows'} to do failed the same way: {common[1]}"
         if all((e.type, e.message) == common for e in errors) else
         f"all of the first {n} rows to do failed before reaching the model, e.g. {common[1]}")
    if fields is not None:
        s += f" (the first row has the fields: {', '.join(fields) or 'none'})"
    hint = {"missing_id": "--id-field", "invalid_id": "--id-field"}.get(common[0], "--text-field, --prompt-template "
                                                                      "or --messages-field, and --input-format")
    return s + f"; check {hint}. Nothing was written, so the corrected command does these rows."


class Prefetcher:
    """Runs an iterator in a thread into a bounded queue. Items travel in small chunks (fewer lock round
    trips), flushed early whenever the consumer has run dry. Exceptions are re-raised by `get`."""

    CHUNK = 32

    def __init__(self, it: Iterator, size: int):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, size // self.CHUNK))
        self._it = it
        self._stop = threading.Event()
        self._exc: BaseException | None = None
        self._buf: list = []
        self._pos = 0
        self._t = threading.Thread(target=self._run, daemon=True, name="strata-batch-prefetch")
        self._t.start()

    def _put(self, chunk: list) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(chunk, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        chunk: list = []
        try:
            for item in self._it:
                chunk.append(item)
                if len(chunk) >= self.CHUNK or self._q.empty():
                    if not self._put(chunk):
                        return
                    chunk = []
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._exc = e
        chunk.append(_END)
        self._put(chunk)

    def get(self, block: bool) -> Any:
        """Next item, `_END` at the end, or None when nothing is ready and block is False."""
        if self._pos >= len(self._buf):
            try:
                self._buf = self._q.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return None
            self._pos = 0
        item = self._buf[self._pos]
        self._pos += 1
        if item is _END:
            self._pos -= 1  # stay at the end
            if self._exc is not None:
                exc, self._exc = self._exc, None
                raise exc
        return item

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)


class StopFlag:
    """Set by SIGTERM/SIGINT: finish the current step, abort in-flight requests, keep what is written.
    A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.set = False
        self.signum: int | None = None
        self._old: dict = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        self.signum = signum

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old.clear()


def run_jobs(engine: EngineLike, items: Iterable[Job | ErrorItem], writer: RowWriter, *, model_name: str,
             max_in_flight: int = 512, queue_size: int = 256, progress: Progress | None = None,
             summary: Summary | None = None, stop: StopFlag | None = None, prefetch: bool = True,
             fail_fast: int = 100, startup_wait: float = 5.0) -> Summary:
    """Feed `items` to the engine, at most `max_in_flight` at a time, writing one row per item.

    `fail_fast`: when the first rows fail with configuration errors (a wrong --text-field or --id-field,
    not the format that was meant: `CONFIG_ERRORS`) before any reaches the engine, `fail_fast` of them or
    all there are, stop without writing them, so that the corrected rerun does not find them "done"
    (0: never). Other error rows (a line that is not JSON...) are written as they come."""
    s = summary or Summary()
    held: list[ErrorItem] = []  # configuration error rows kept back until a first row reaches the engine
    accepted = 0

    def write_error(row: dict, item: ErrorItem | None = None) -> None:
        s.errors += 1
        if fail_fast and not accepted and item is not None and item.error.type in CONFIG_ERRORS:
            held.append(item)
            if len(held) >= fail_fast:
                raise FailFast(misconfigured_message([h.error for h in held]))
        else:
            writer.write(row)

    def flush_held() -> None:
        for item in held:
            writer.write(error_row(item))
        held.clear()

    t0 = time.monotonic()
    src: Any = Prefetcher(iter(items), queue_size) if prefetch else None
    it = None if prefetch else iter(items)
    pending: dict[str, Job] = {}
    started = False
    seq = 0
    src_done = False
    src_exc: BaseException | None = None

    def next_item(block: bool) -> Any:
        if src is not None:
            return src.get(block)
        return next(it, _END)

    def tick(force: bool = False) -> None:
        if progress is not None:
            progress.update(s.ok + s.errors, s.errors, s.counters.skipped, s.output_tokens, force=force)

    try:
        while True:
            if stop is not None and stop.set:
                s.interrupted = True
                break
            while not src_done and len(pending) < max_in_flight:
                # Before the first step, wait (up to `startup_wait` s) for a full window or the end of the input:
                # the engine then starts with every request it can take, as when a list is submitted at once.
                filling = not started and time.monotonic() - t0 < startup_wait
                try:
                    item = next_item(block=not pending or filling)
                except Exception as e:  # noqa: BLE001 - the input broke: finish what is in flight, then report
                    src_exc = e
                    src_done = True
                    break
                if item is None:
                    if filling and not (stop is not None and stop.set):
                        continue
                    if not pending:
                        if stop is not None and stop.set:
                            break
                        continue  # waited 0.5 s for input; check the stop flag and wait again
                    break
                if item is _END:
                    src_done = True
                    break
                if isinstance(item, ErrorItem):
                    write_error(error_row(item), item)
                    continue
                rid = str(seq)
                seq += 1
                try:
                    engine.add_request(rid, item.prompt_ids, item.params)
                except ParameterError as e:  # includes PromptTooLongError
                    etype = "prompt_too_long" if type(e).__name__ == "PromptTooLongError" else "invalid_parameter"
                    write_error(job_error_row(item, RowError(etype, str(e)), 400, getattr(e, "param", None)))
                    continue
                pending[rid] = item
                if not accepted:
                    accepted = 1
                    flush_held()
            if not pending:
                if src_done or (stop is not None and stop.set):
                    if stop is not None and stop.set:
                        s.interrupted = True
                    elif held and src_exc is None:  # every row there was failed the same way
                        raise FailFast(misconfigured_message([h.error for h in held]))
                    break
                tick()
                continue
            started = True
            outs = engine.step()
            for o in outs:
                if not o.finished:
                    continue
                job = pending.pop(o.request_id, None)
                if job is None:
                    continue
                row = check_row(result_row(job, o, model_name), job.params, o)
                writer.write(row)
                if row.get("error") is not None or (isinstance(row.get("response"), dict)
                                                    and row["response"].get("status_code") != 200):
                    s.errors += 1
                else:
                    s.ok += 1
                    s.prompt_tokens += len(o.prompt_token_ids or job.prompt_ids)
                    s.output_tokens += sum(len(c.token_ids) for c in o.outputs)
            if not outs and pending and not engine.has_unfinished_requests():
                raise RuntimeError(f"the engine has no unfinished requests but {len(pending)} were never reported finished")
            tick()
    except KeyboardInterrupt:
        s.interrupted = True
    except FailFast as e:
        s.fatal = str(e)
    finally:
        if held:  # interrupted before a row reached the engine: not written, so a rerun does them
            s.errors -= len(held)
            held.clear()
        if pending:
            try:
                engine.abort_request(list(pending))
                # Let the engine report the aborts so it is clean for a caller that keeps using it.
                for _ in range(3):
                    if not engine.has_unfinished_requests():
                        break
                    engine.step()
            except Exception:  # noqa: BLE001 - shutting down; the rows are redone on resume
                pass
        if src is not None:
            src.close()
        s.elapsed = time.monotonic() - t0
        tick(force=True)
    if src_exc is not None and not s.fatal:
        s.fatal = f"{type(src_exc).__name__}: {src_exc}"
    return s
