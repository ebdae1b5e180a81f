"""The OpenAI Batch API: /v1/files and /v1/batches, run through this server's own engine.

Files live under `--batch-dir` (one data file and one JSON record per file id). A batch is validated as a
whole first (every line an object with a unique `custom_id`, `method` POST, `url` equal to the batch's
endpoint, an object `body`); a malformed input file fails the batch with `errors`, like OpenAI. Then every
line runs as the same request would through the HTTP endpoint, at most `--batch-concurrency` at once
(batch lines skip the --max-queued-requests admission check: their concurrency is bounded here).
Results go to an output file (200s) and an error file (the rest), in OpenAI's line format:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid

from fastapi import FastAPI, Request
from starlette.responses import Response

from strata.core.sampling_params import ParameterError
from strata.serve.errors import APIError, from_exception
from strata.serve.multipart import parse_multipart
from strata.serve.protocol import BatchCreateRequest, parse_json_object, parse_model

logger = logging.getLogger("strata.serve.batch")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
FILE_PURPOSES = ("batch", "batch_output", "fine-tune", "assistants", "user_data", "evals")
TERMINAL = ("completed", "failed", "cancelled", "expired")


def _now() -> int:
    return int(time.time())


class FileStore:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(os.path.join(root, "files"), exist_ok=True)
        self._meta: dict[str, dict] = {}
        for name in os.listdir(os.path.join(root, "files")):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(root, "files", name)) as f:
                        meta = json.load(f)
                    self._meta[meta["id"]] = meta
                except (OSError, ValueError, KeyError):
                    continue

    def path(self, file_id: str) -> str:
        return os.path.join(self.root, "files", file_id + ".data")

    def create(self, filename: str, purpose: str, data: bytes) -> dict:
        fid = "file-" + uuid.uuid4().hex
        with open(self.path(fid), "wb") as f:
            f.write(data)
        return self._record(fid, filename, purpose, len(data))

    def create_from_path(self, fid: str, filename: str, purpose: str) -> dict:
        return self._record(fid, filename, purpose, os.path.getsize(self.path(fid)))

    def _record(self, fid: str, filename: str, purpose: str, size: int) -> dict:
        meta = {"id": fid, "object": "file", "bytes": size, "created_at": _now(), "filename": filename,
                "purpose": purpose, "status": "processed", "status_details": None}
        with open(os.path.join(self.root, "files", fid + ".json"), "w") as f:
            json.dump(meta, f)
        self._meta[fid] = meta
        return meta

    def new_id(self) -> str:
        return "file-" + uuid.uuid4().hex

    def get(self, fid: str) -> dict:
        meta = self._meta.get(fid)
        if meta is None:
            raise APIError(404, f"No such file: {fid}", param="file_id", code="file_not_found")
        return meta

    def list(self, purpose: str | None = None) -> list[dict]:
        return [m for m in sorted(self._meta.values(), key=lambda m: m["created_at"])
                if purpose is None or m["purpose"] == purpose]

    def read(self, fid: str) -> bytes:
        self.get(fid)
        with open(self.path(fid), "rb") as f:
            return f.read()

    def delete(self, fid: str) -> dict:
        self.get(fid)
        del self._meta[fid]
        for p in (self.path(fid), os.path.join(self.root, "files", fid + ".json")):
            try:
                os.remove(p)
            except OSError:
                pass
        return {"id": fid, "object": "file", "deleted": True}


def validate_batch_lines(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """(requests, errors) of an input file in OpenAI's batch format; errors carry the 1-based line."""
    reqs, errors, seen = [], [], set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [{"code": "invalid_encoding", "message": "the input file is not UTF-8", "param": None,
                     "line": None}]
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue

        def err(code, msg, param=None):
            errors.append({"code": code, "message": msg, "param": param, "line": n})

        try:
            obj = json.loads(line)
        except ValueError as e:
            err("invalid_json_line", f"line {n} is not valid JSON: {e}")
            continue
        if not isinstance(obj, dict):
            err("invalid_request", f"line {n} must be a JSON object")
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            err("missing_required_parameter", f"line {n} needs a string custom_id", "custom_id")
            continue
        if cid in seen:
            err("duplicate_custom_id", f"line {n}: custom_id {cid!r} is not unique", "custom_id")
            continue
        seen.add(cid)
        if str(obj.get("method", "")).upper() != "POST":
            err("invalid_method", f"line {n}: method must be POST", "method")
            continue
        if obj.get("url") != endpoint:
            err("mismatched_endpoint", f"line {n}: url {obj.get('url')!r} differs from the batch's endpoint "
                                       f"{endpoint!r}", "url")
            continue
        if not isinstance(obj.get("body"), dict):
            err("invalid_request", f"line {n}: body must be a JSON object", "body")
            continue
        reqs.append(obj)
    if not reqs and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no requests", "param": None,
                       "line": None})
    return reqs, errors


class BatchManager:
    def __init__(self, state, root: str | None = None):
        self.state = state
        self.root = root or tempfile.mkdtemp(prefix="strata-batches-")
        self.files = FileStore(self.root)
        self.batches: dict[str, dict] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._sem: asyncio.Semaphore | None = None

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
        if self.state.draining:
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
        self.batches[bid] = b
        self._tasks[bid] = asyncio.create_task(self._run(b))
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
            b["status"] = "cancelling"
            b["cancelling_at"] = _now()
            t = self._tasks.get(bid)
            if t is not None:
                t.cancel()
        return b

    async def shutdown(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # ---- running
    async def _run(self, b: dict) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(max(1, self.state.args.batch_concurrency))
        out_id, err_id = self.files.new_id(), self.files.new_id()
        out_f = err_f = None
        counts = b["request_counts"]
        try:
            data = await asyncio.to_thread(self.files.read, b["input_file_id"])
            reqs, errors = validate_batch_lines(data, b["endpoint"])
            if errors:
                b.update(status="failed", failed_at=_now(), errors={"object": "list", "data": errors})
                return
            counts["total"] = len(reqs)
            b.update(status="in_progress", in_progress_at=_now())
            out_f = open(self.files.path(out_id), "w", encoding="utf-8")
            err_f = open(self.files.path(err_id), "w", encoding="utf-8")
            shutdown_error: list[BaseException] = []

            async def one(line: dict) -> None:
                async with self._sem:
                    if shutdown_error:
                        return
                    status, body = await self._execute(b["endpoint"], line["body"])
                if status == 503 and body.get("error", {}).get("code") == "server_shutting_down":
                    shutdown_error.append(APIError(503, body["error"]["message"]))
                    return
                rec = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": line["custom_id"],
                       "response": {"status_code": status, "request_id": body.get("id") or uuid.uuid4().hex,
                                    "body": body},
                       "error": None}
                if status == 200:
                    counts["completed"] += 1
                    out_f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                else:
                    e = body.get("error") or {}
                    rec["error"] = {"code": e.get("code") or e.get("type"), "message": e.get("message")}
                    counts["failed"] += 1
                    err_f.write(json.dumps(rec, ensure_ascii=False) + "\n")

            await asyncio.gather(*(one(r) for r in reqs))
            b.update(status="finalizing", finalizing_at=_now())
            self._close_files(b, out_f, err_f, out_id, err_id)
            out_f = err_f = None
            if shutdown_error:
                b.update(status="failed", failed_at=_now(),
                         errors={"object": "list", "data": [{"code": "server_shutdown", "line": None, "param": None,
                                                             "message": str(shutdown_error[0])}]})
            else:
                b.update(status="completed", completed_at=_now())
        except asyncio.CancelledError:
            if out_f is not None:
                self._close_files(b, out_f, err_f, out_id, err_id)
            b.update(status="cancelled", cancelled_at=_now())
        except Exception as e:  # noqa: BLE001 - a batch never takes the server down
            logger.exception("batch %s failed", b["id"])
            if out_f is not None:
                self._close_files(b, out_f, err_f, out_id, err_id)
            b.update(status="failed", failed_at=_now(),
                     errors={"object": "list", "data": [{"code": "internal_error", "message": str(e),
                                                         "param": None, "line": None}]})

    def _close_files(self, b, out_f, err_f, out_id, err_id) -> None:
        out_f.close()
        err_f.close()
        if counts_have(self.files.path(out_id)):
            self.files.create_from_path(out_id, f"{b['id']}_output.jsonl", "batch_output")
            b["output_file_id"] = out_id
        else:
            os.remove(self.files.path(out_id))
        if counts_have(self.files.path(err_id)):
            self.files.create_from_path(err_id, f"{b['id']}_error.jsonl", "batch_output")
            b["error_file_id"] = err_id
        else:
            os.remove(self.files.path(err_id))

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


def counts_have(path: str) -> bool:
    return os.path.getsize(path) > 0


def add_batch_routes(app: FastAPI, state) -> None:
    def mgr() -> BatchManager:
        if state.batches is None:
            state.batches = BatchManager(state, state.args.batch_dir)
        return state.batches

    def _json(obj, status=200):
        return Response(json.dumps(obj), status_code=status, media_type="application/json")

    @app.post("/v1/files")
    async def upload(request: Request):
        body = await request.body()
        parts = parse_multipart(body, request.headers.get("content-type", ""))
        if "file" not in parts:
            raise ParameterError("file", "the form needs a 'file' part")
        purpose = parts["purpose"].text().strip() if "purpose" in parts else ""
        if purpose not in FILE_PURPOSES:
            raise ParameterError("purpose", f"purpose must be one of {list(FILE_PURPOSES)}, got {purpose!r}")
        f = parts["file"]
        meta = await asyncio.to_thread(mgr().files.create, f.filename or "upload.jsonl", purpose, f.data)
        return _json(meta)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None):
        return _json({"object": "list", "data": mgr().files.list(purpose), "has_more": False})

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return _json(mgr().files.get(file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        data = await asyncio.to_thread(mgr().files.read, file_id)
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return _json(mgr().files.delete(file_id))

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


__all__ = ["BatchManager", "FileStore", "add_batch_routes", "validate_batch_lines"]
