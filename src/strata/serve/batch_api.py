"""The OpenAI Batch API: /v1/files and /v1/batches, run through this server's own engine, kept on disk.

Everything lives under the state directory (`--state-dir`, locked by one server at a time):
    files/<file id>.data, files/<file id>.json     uploaded and output files, and their records
    batches/<batch id>.json                          the batch object, rewritten atomically on each state change
    batches/<batch id>.results.jsonl                 one line per finished request, appended as it finishes
Uploads stream to disk. A batch is validated as a whole first (every line an object with a unique
`custom_id`, `method` POST, `url` equal to the batch's endpoint, an object `body`); a malformed input file
fails the batch with `errors`, like OpenAI. Then every line runs as the same request would through the HTTP
endpoint, at most `--batch-concurrency` at once (batch lines skip the --max-queued-requests admission check:
their concurrency is bounded here). Each result is appended to the batch's results file (flushed at once,
fsync'd in the background), so after a crash or a restart a `validating` or `in_progress` batch resumes with
only the lines that have no result yet, and no `custom_id` is ever answered twice. At the end the results
are split into an output file (200s) and an error file (the rest), in OpenAI's line format:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
A server that shuts down stops its batches where they are (in-flight lines are aborted, not recorded);
the next server on the same state directory picks them up.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import uuid

from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, Response

from strata.core.sampling_params import ParameterError
from strata.serve.batch_store import FileStore, Results, _load_records, _now, _remove, _write_atomic
from strata.serve.errors import APIError, from_exception
from strata.serve.multipart import MultipartParser
from strata.serve.protocol import BatchCreateRequest, parse_json_object, parse_model

logger = logging.getLogger("strata.serve.batch")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
FILE_PURPOSES = ("batch", "batch_output", "fine-tune", "assistants", "user_data", "evals")
TERMINAL = ("completed", "failed", "cancelled", "expired")
MAX_LINE_ERRORS = 1000        # errors reported for one malformed input file
_READ_LINES = 512             # input lines read per trip to a worker thread
_SERVER_GONE = ("server_shutting_down", "engine_dead")  # a line's 503 that is the server's fault: not recorded


def _check_line(n: int, raw: bytes, endpoint: str, seen: set[str]) -> dict | None:
    """The request on line n, or None for a blank line; raises _LineError for a malformed one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _LineError("invalid_encoding", f"line {n} is not UTF-8") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise _LineError("invalid_json_line", f"line {n} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _LineError("invalid_request", f"line {n} must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise _LineError("missing_required_parameter", f"line {n} needs a string custom_id", "custom_id")
    if cid in seen:
        raise _LineError("duplicate_custom_id", f"line {n}: custom_id {cid!r} is not unique", "custom_id")
    seen.add(cid)
    if str(obj.get("method", "")).upper() != "POST":
        raise _LineError("invalid_method", f"line {n}: method must be POST", "method")
    if obj.get("url") != endpoint:
        raise _LineError("mismatched_endpoint", f"line {n}: url {obj.get('url')!r} differs from the batch's "
                                                f"endpoint {endpoint!r}", "url")
    if not isinstance(obj.get("body"), dict):
        raise _LineError("invalid_request", f"line {n}: body must be a JSON object", "body")
    return obj


class _LineError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def validate_input(path: str, endpoint: str) -> tuple[int, list[dict]]:
    """Blocking: (number of requests, errors) of an input file in OpenAI's batch format, read line by line;
    errors carry the 1-based line (at most MAX_LINE_ERRORS of them)."""
    n_reqs, errors, seen = 0, [], set()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                if _check_line(n, raw, endpoint, seen) is not None:
                    n_reqs += 1
            except _LineError as e:
                if len(errors) < MAX_LINE_ERRORS:
                    errors.append({"code": e.code, "message": e.message, "param": e.param, "line": n})
    if not n_reqs and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no requests", "param": None,
                       "line": None})
    return n_reqs, errors


def _read_requests(f, count: int) -> list[dict]:
    """Blocking: up to `count` requests from an already validated input file ([] at its end)."""
    out = []
    while len(out) < count:
        raw = f.readline()
        if not raw:
            break
        if raw.strip():
            out.append(json.loads(raw))
    return out


# ---------------------------------------------------------------------------------------------- results
class BatchManager:
    def __init__(self, state, root: str | None = None):
        self.state = state
        self.root = root or tempfile.mkdtemp(prefix="strata-state-")
        self.files = FileStore(self.root)
        self.dir = os.path.join(self.root, "batches")
        os.makedirs(self.dir, exist_ok=True)
        self.batches: dict[str, dict] = _load_records(self.dir, "batch")
        self._tasks: dict[str, asyncio.Task] = {}
        self._sem: asyncio.Semaphore | None = None
        self._stopping = False

    def _save(self, b: dict) -> None:
        _write_atomic(os.path.join(self.dir, b["id"] + ".json"), json.dumps(b).encode())

    def _results(self, bid: str) -> str:
        return os.path.join(self.dir, bid + ".results.jsonl")

    def _start(self, b: dict, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks[b["id"]] = t
        t.add_done_callback(lambda _t, bid=b["id"]: self._tasks.get(bid) is _t and self._tasks.pop(bid))

    def resume(self) -> None:
        """At start-up: carry on with every batch a previous server left unfinished."""
        for b in sorted(self.batches.values(), key=lambda b: b["created_at"]):
            if b["status"] in TERMINAL:
                continue
            logger.info("resuming batch %s (%s)", b["id"], b["status"])
            if b["status"] == "cancelling":
                self._start(b, self._finish(b, "cancelled"))
            elif b["expires_at"] is not None and _now() > b["expires_at"]:
                self._start(b, self._finish(b, "expired"))
            elif b["status"] == "finalizing":
                self._start(b, self._finish(b, "completed"))
            else:  # validating, in_progress: the counts are right from the first retrieve on
                _, ok, failed = Results(self._results(b["id"])).scan()
                b["request_counts"].update(completed=ok, failed=failed)
                self._start(b, self._run(b))

    # ---- API
    def create(self, req: BatchCreateRequest) -> dict:
        if req.endpoint not in ENDPOINTS:
            raise ParameterError("endpoint", f"endpoint must be one of {list(ENDPOINTS)}, got {req.endpoint!r}")
        if req.completion_window != "24h":
            raise ParameterError("completion_window", "completion_window must be '24h'")
        meta = self.files.get(req.input_file_id)
        if meta["purpose"] != "batch":
            raise ParameterError("input_file_id", f"file {req.input_file_id} has purpose {meta['purpose']!r}, "
                                                  "not 'batch'")
        if self.state.draining or self._stopping:
            raise APIError(503, "The server is shutting down and takes no new batches.",
                           code="server_shutting_down", headers={"Retry-After": "1"})
        bid = "batch_" + uuid.uuid4().hex
        now = _now()
        b = {"id": bid, "object": "batch", "endpoint": req.endpoint, "errors": None,
             "input_file_id": req.input_file_id, "completion_window": req.completion_window,
             "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
             "in_progress_at": None, "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None,
             "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": req.metadata}
        self._save(b)
        self.batches[bid] = b
        self._start(b, self._run(b))
        return b

    def get(self, bid: str) -> dict:
        b = self.batches.get(bid)
        if b is None:
            raise APIError(404, f"No such batch: {bid}", param="batch_id", code="batch_not_found")
        return b

    def cancel(self, bid: str) -> dict:
        b = self.get(bid)
        if b["status"] in TERMINAL:
            raise APIError(409, f"Batch {bid} is already {b['status']}", code="batch_not_cancellable")
        if b["status"] != "cancelling":
            b.update(status="cancelling", cancelling_at=_now())
            self._save(b)
            t = self._tasks.get(bid)
            if t is not None and not t.done():
                t.cancel()  # its _run finishes the batch as cancelled
            else:
                self._start(b, self._finish(b, "cancelled"))
        return b

    def delete_file(self, fid: str) -> dict:
        for b in self.batches.values():
            if b["input_file_id"] == fid and b["status"] not in TERMINAL:
                raise APIError(409, f"File {fid} is the input of batch {b['id']}, which is {b['status']}; "
                                    "cancel it or let it finish first", param="file_id", code="file_in_use")
        return self.files.delete(fid)

    async def shutdown(self) -> None:
        """Stop every batch where it is; unfinished ones stay on disk for the next server."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- running
    async def _run(self, b: dict) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(max(1, self.state.args.batch_concurrency))
        results = Results(self._results(b["id"]))
        pending: set[asyncio.Task] = set()
        halted: list[str] = []  # set when the server, not a line, failed: stop, leave the rest for a restart
        try:
            path = self.files.path(b["input_file_id"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"the input file {b['input_file_id']} is gone")
            total, errors = await asyncio.to_thread(validate_input, path, b["endpoint"])
            if errors:
                b.update(status="failed", failed_at=_now(), errors={"object": "list", "data": errors})
                self._save(b)
                return
            done, ok, failed = await asyncio.to_thread(results.load)
            b["request_counts"] = counts = {"total": total, "completed": ok, "failed": failed}
            if b["status"] != "in_progress":
                b.update(status="in_progress", in_progress_at=_now())
                self._save(b)

            async def one(line: dict) -> None:
                status, body = await self._execute(b["endpoint"], line["body"])
                err = body.get("error") or {}
                if status == 503 and err.get("code") in _SERVER_GONE:
                    halted.append(err.get("code"))
                    return
                rec = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": line["custom_id"],
                       "response": {"status_code": status, "request_id": body.get("id") or uuid.uuid4().hex,
                                    "body": body},
                       "error": None}
                if status != 200:
                    rec["error"] = {"code": err.get("code") or err.get("type"), "message": err.get("message")}
                results.append(rec)
                counts["completed" if status == 200 else "failed"] += 1

            with open(path, "rb") as f:
                while not halted:
                    lines = await asyncio.to_thread(_read_requests, f, _READ_LINES)
                    if not lines:
                        break
                    for line in lines:
                        if line["custom_id"] in done:
                            continue
                        await self._sem.acquire()
                        if halted:
                            self._sem.release()
                            break
                        t = asyncio.get_running_loop().create_task(one(line))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                        t.add_done_callback(lambda _t: self._sem.release())  # even if cancelled unstarted
            await asyncio.gather(*pending)
            await results.close()
            if halted:
                logger.warning("batch %s stopped (%s); it resumes when the server restarts", b["id"], halted[0])
                return
            await self._finish(b, "completed")
        except asyncio.CancelledError:
            await _cancel_all(pending)
            await results.close()
            if b["status"] == "cancelling":
                await self._finish(b, "cancelled")
            elif not self._stopping:
                raise
        except Exception as e:  # noqa: BLE001 - a batch never takes the server down
            logger.exception("batch %s failed", b["id"])
            await _cancel_all(pending)
            await results.close()
            await self._finish(b, "failed", errors={"object": "list", "data": [
                {"code": "internal_error", "message": str(e), "param": None, "line": None}]})

    async def _finish(self, b: dict, status: str, errors: dict | None = None) -> None:
        """Write the output and error files from the results so far, then the batch's final state.
        Idempotent: the file ids come from the batch id, so a crash in here is finished by the next server."""
        if status == "completed":
            b.update(status="finalizing", finalizing_at=b["finalizing_at"] or _now())
            self._save(b)
        hexid = b["id"].removeprefix("batch_")
        ids = await asyncio.to_thread(self._write_outputs, b, f"file-{hexid}-output", f"file-{hexid}-errors")
        b["output_file_id"], b["error_file_id"], n_ok, n_bad = ids
        counts = b["request_counts"]
        counts.update(completed=n_ok, failed=n_bad)
        b.update({"status": status, f"{status}_at": _now()})
        if errors is not None:
            b["errors"] = errors
        self._save(b)

    def _write_outputs(self, b: dict, out_id: str, err_id: str) -> tuple[str | None, str | None, int, int]:
        """Blocking: split the results file, streaming, into the output file (200s) and the error file (the
        rest), the first result of each custom_id only. (output id or None if empty, error id or None, #ok,
        #errors)"""
        path = self._results(b["id"])
        Results(path).scan()  # cuts off a line torn by a crash
        tmp = {fid: os.path.join(self.files.dir, f"{fid}.{uuid.uuid4().hex}.tmp") for fid in (out_id, err_id)}
        n = {out_id: 0, err_id: 0}
        seen = set()
        with open(tmp[out_id], "w", encoding="utf-8") as ok, open(tmp[err_id], "w", encoding="utf-8") as bad:
            sink = {out_id: ok, err_id: bad}
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        rec = json.loads(line)
                        if rec["custom_id"] in seen:
                            continue
                        seen.add(rec["custom_id"])
                        fid = out_id if rec["error"] is None else err_id
                        sink[fid].write(line)
                        n[fid] += 1
            for f in (ok, bad):
                f.flush()
                os.fsync(f.fileno())
        for fid, kind in ((out_id, "output"), (err_id, "error")):
            if n[fid]:
                self.files.write(fid, f"{b['id']}_{kind}.jsonl", "batch_output", tmp[fid])
            else:
                _remove(tmp[fid])
        return (out_id if n[out_id] else None), (err_id if n[err_id] else None), n[out_id], n[err_id]

    async def _execute(self, endpoint: str, body: dict) -> tuple[int, dict]:
        from strata.serve.chat import chat_response, start_chat
        from strata.serve.completions import completion_response, start_completion
        try:
            if body.get("stream"):
                raise ParameterError("stream", "streaming is not available in batch requests")
            if endpoint == "/v1/chat/completions":
                p, sub = await start_chat(self.state, body, admission=False)
                return 200, await chat_response(self.state, p, sub)
            p, sub = await start_completion(self.state, body, admission=False)
            return 200, await completion_response(self.state, p, sub)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - becomes the line's error
            err = from_exception(e)
            return err.status, err.body()


async def _cancel_all(tasks: set[asyncio.Task]) -> None:
    tasks = set(tasks)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------- routes
_FEED_BYTES = 1 << 20  # an upload is parsed (and written) in a worker thread, a MiB at a time


def add_batch_routes(app: FastAPI, state) -> None:
    def mgr() -> BatchManager:
        if state.batches is None:  # an app built without serve() (in-process tests): a temporary directory
            state.batches = BatchManager(state, state.args.state_dir)
        return state.batches

    def _json(obj, status=200):
        return Response(json.dumps(obj), status_code=status, media_type="application/json")

    @app.post("/v1/files")
    async def upload(request: Request):
        files = mgr().files
        up = await asyncio.to_thread(files.begin_upload)
        try:
            parser = MultipartParser(request.headers.get("content-type", ""),
                                     lambda part: up if part.name == "file" else None)
            buf = bytearray()
            async for chunk in request.stream():
                buf += chunk
                if len(buf) >= _FEED_BYTES:
                    await asyncio.to_thread(parser.feed, bytes(buf))
                    buf.clear()
            await asyncio.to_thread(parser.feed, bytes(buf))
            parser.close()
            parts = parser.parts
            if "file" not in parts or parts["file"].filename is None:
                raise ParameterError("file", "the form needs a 'file' part (a file, with a filename)")
            purpose = parts["purpose"].text().strip() if "purpose" in parts else ""
            if purpose not in FILE_PURPOSES:
                raise ParameterError("purpose", f"purpose must be one of {list(FILE_PURPOSES)}, got {purpose!r}")
            meta = await asyncio.to_thread(files.commit_upload, up, parts["file"].filename or "upload.jsonl",
                                           purpose)
            return _json(meta)
        except ClientDisconnect:
            return Response(status_code=499)
        finally:
            await asyncio.to_thread(up.discard)  # nothing left to discard once committed

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None):
        return _json({"object": "list", "data": mgr().files.list(purpose), "has_more": False})

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return _json(mgr().files.get(file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        files = mgr().files
        files.get(file_id)
        return FileResponse(files.path(file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return _json(mgr().delete_file(file_id))

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        req = parse_model(BatchCreateRequest, parse_json_object(await request.body()))
        return _json(mgr().create(req))

    @app.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None):
        items = sorted(mgr().batches.values(), key=lambda b: b["created_at"], reverse=True)
        if after is not None:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:max(1, min(limit, 100))]
        return _json({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                      "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)})

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        return _json(mgr().get(batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        return _json(mgr().cancel(batch_id))


__all__ = ["BatchManager", "FileStore", "add_batch_routes", "validate_input"]
