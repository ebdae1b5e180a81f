"""What goes in and out of the batch runner: a `Job` (an engine request built from an input row by
`strata.batch.jobs`) or an `ErrorItem` (a row that never became a request), and the output rows they become: for a
finished request (`result_row`), for a row that never became a request (`error_row`) and for a request the engine
refused (`job_error_row`).

Plain rows: `{"id", "row", "text", "finish_reason", "prompt_tokens", "output_tokens", "truncated", ..., "error"}`.
OpenAI batch rows: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}` as the
OpenAI Batch API writes them (see `strata.batch.jobs`).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from strata.batch.readers import RowError
from strata.core.sampling_params import SamplingParams


@dataclass
class Job:
    key: str
    id: Any
    row: int
    prompt_ids: list[int]
    params: SamplingParams
    kind: str = "plain"  # plain | openai
    url: str | None = None
    truncated: bool = False
    untruncated_tokens: int | None = None
    extra: dict | None = None  # --include-fields values (plain rows)


@dataclass
class ErrorItem:
    key: str
    id: Any
    row: int
    error: RowError
    kind: str = "plain"
    status_code: int | None = None  # OpenAI rows: 400 for a refused request, None for a line that is no request
    param: str | None = None
    extra: dict | None = None


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def result_row(job: Job, out: Any, model_name: str) -> dict:
    """The output row of a finished request (`out` is the engine's final RequestOutput)."""
    comps = out.outputs
    prompt_tokens = len(out.prompt_token_ids) if out.prompt_token_ids is not None else len(job.prompt_ids)
    out_tokens = sum(len(c.token_ids) for c in comps)
    failed = out.error or any(c.finish_reason in ("error", "abort") for c in comps)
    if job.kind == "openai":
        if failed:
            return openai_error_row(job.key, job.id, job.row, RowError("engine_error", out.error or "generation failed"),
                                    500, None)
        created = int(time.time())
        if job.url == "/v1/chat/completions":
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": _chat_logprobs(c), "finish_reason": _oai_finish(c.finish_reason)} for c in comps]
            body = {"id": _new_id("chatcmpl-"), "object": "chat.completion", "created": created, "model": model_name,
                    "choices": choices}
        else:
            choices = [{"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c),
                        "finish_reason": _oai_finish(c.finish_reason)} for c in comps]
            body = {"id": _new_id("cmpl-"), "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices}
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": out_tokens,
                         "total_tokens": prompt_tokens + out_tokens}
        return {"id": _new_id("batch_req_"), "custom_id": job.id,
                "response": {"status_code": 200, "request_id": _new_id(""), "body": body}, "error": None}
    if failed:
        return plain_error_row(job.id, job.row, RowError("engine_error", out.error or "generation failed"), job.extra)
    c = comps[0]
    row = {"id": job.id, "row": job.row, "text": c.text, "finish_reason": c.finish_reason,
           "prompt_tokens": prompt_tokens, "output_tokens": out_tokens, "truncated": job.truncated}
    if job.truncated:
        row["prompt_tokens_untruncated"] = job.untruncated_tokens
    if len(comps) > 1:
        row["texts"] = [x.text for x in comps]
    if job.extra:
        row["fields"] = job.extra
    row["error"] = None
    return row


def _oai_finish(fr: str | None) -> str | None:
    return fr if fr in ("stop", "length") else fr


def _chat_logprobs(c: Any) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for tid, entry in zip(c.token_ids, c.logprobs):
        chosen = entry.get(tid)
        tok = (chosen.decoded if chosen is not None and chosen.decoded is not None else "")
        top = [{"token": lp.decoded or "", "logprob": lp.logprob, "bytes": list((lp.decoded or "").encode())}
               for t, lp in entry.items()]
        content.append({"token": tok, "logprob": chosen.logprob if chosen else None,
                        "bytes": list(tok.encode()), "top_logprobs": top})
    return {"content": content}


def _completion_logprobs(c: Any) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    off = 0
    for tid, entry in zip(c.token_ids, c.logprobs):
        chosen = entry.get(tid)
        tok = chosen.decoded if chosen is not None and chosen.decoded is not None else ""
        tokens.append(tok)
        lps.append(chosen.logprob if chosen else None)
        tops.append({(lp.decoded or ""): lp.logprob for lp in entry.values()})
        offsets.append(off)
        off += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def plain_error_row(id_: Any, row: int, err: RowError, extra: dict | None = None) -> dict:
    r = {"id": id_, "row": row, "text": None}
    if extra:
        r["fields"] = extra
    r["error"] = {"type": err.type, "message": err.message}
    return r


def openai_error_row(key: str, id_: Any, row: int, err: RowError, status: int | None, param: str | None) -> dict:
    if status is None:  # not a request at all: no response
        r = {"id": _new_id("batch_req_"), "custom_id": id_, "response": None,
             "error": {"code": err.type, "message": err.message}}
        if id_ is None:
            r["row"] = row
        return r
    etype = "invalid_request_error" if status == 400 else "server_error"
    body = {"error": {"message": err.message, "type": etype, "param": param, "code": err.type}}
    r = {"id": _new_id("batch_req_"), "custom_id": id_,
         "response": {"status_code": status, "request_id": _new_id(""), "body": body}, "error": None}
    if id_ is None:
        r["row"] = row
    return r


def error_row(item: ErrorItem) -> dict:
    if item.kind == "openai":
        return openai_error_row(item.key, item.id, item.row, item.error, item.status_code, item.param)
    return plain_error_row(item.id, item.row, item.error, item.extra)


def job_error_row(job: Job, err: RowError, status: int = 400, param: str | None = None) -> dict:
    """A job the engine refused at add_request (e.g. prompt longer than the context)."""
    if job.kind == "openai":
        return openai_error_row(job.key, job.id, job.row, err, status, param)
    return plain_error_row(job.id, job.row, err, job.extra)
