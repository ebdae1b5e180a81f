"""Shared by the completion and chat endpoints: admission, submitting prompts, usage and logprobs."""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from strata.core.outputs import CompletionOutput, RequestOutput
from strata.core.sampling_params import SamplingParams
from strata.engine.async_llm import RequestStream
from strata.serve.errors import APIError, from_exception
from strata.serve.state import ServerState


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def check_model(state: ServerState, model: str | None) -> None:
    if not state.accepts_model(model):
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def check_params_for_model(state: ServerState, params: SamplingParams) -> None:
    """Checks that need the model: token ids in parameters must exist in its vocabulary."""
    from strata.serve.prompts import check_token_ids
    if params.stop_token_ids:
        check_token_ids(params.stop_token_ids, state.tokenizer.vocab_size, param="stop_token_ids")


def admit(state: ServerState, num_requests: int = 1) -> None:
    """Refuse work the server cannot take: 503 while draining or dead, 429 beyond --max-queued-requests."""
    eng = state.engine
    if state.draining or eng.is_draining:
        state.metrics.on_rejected("draining")
        raise APIError(503, "The server is shutting down and takes no new requests.",
                       code="server_shutting_down", headers={"Retry-After": "1"})
    if eng.is_dead:
        raise APIError(503, f"The engine is dead: {eng.dead_error!r}", code="engine_dead")
    limit = state.args.max_queued_requests
    if limit is not None and eng.num_queued + num_requests > limit:
        state.metrics.on_rejected("queue_full")
        raise APIError(429, f"The server's request queue is full ({limit} requests waiting); retry later.",
                       code="queue_full", headers={"Retry-After": "1"})


@dataclass
class Submitted:
    """The engine requests behind one API request (one per prompt)."""
    state: ServerState
    ids: list[str] = field(default_factory=list)
    streams: list[RequestStream] = field(default_factory=list)

    def abort_unfinished(self) -> None:
        live = [s.request_id for s in self.streams if not s.finished]
        if live:
            self.state.engine.abort(live)


async def submit(state: ServerState, base_id: str, prompts: list[list[int]], params: SamplingParams) -> Submitted:
    """Add every prompt to the engine; all or nothing (a failure aborts the ones already added)."""
    sub = Submitted(state)
    arrival = time.monotonic()
    try:
        for i, ids in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            stream = await state.engine.add_request(rid, ids, params, arrival_time=arrival)
            sub.ids.append(rid)
            sub.streams.append(stream)
    except BaseException as e:
        sub.abort_unfinished()
        if isinstance(e, Exception):
            raise from_exception(e) from e
        raise
    return sub


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def check_output_error(out: RequestOutput) -> None:
    for c in out.outputs:
        if c.finish_reason == "error":
            raise APIError(500, f"generation failed: {out.error or 'engine error'}", code="generation_error")
    if out.error:
        raise APIError(500, f"generation failed: {out.error}", code="generation_error")


# ---------------------------------------------------------------------------------------------- logprobs
def _lp(v: float) -> float:
    return -9999.0 if v is None or math.isnan(v) or v == -math.inf else float(v)


def _entries(tok, token_id: int, lps: dict, top_n: int):
    """(chosen (text, logprob), [(text, logprob)] top_n by logprob)."""
    def text(tid, lp):
        return lp.decoded if lp.decoded is not None else tok.token_str(tid)

    chosen = lps.get(token_id)
    chosen_t = (text(token_id, chosen) if chosen is not None else tok.token_str(token_id),
                _lp(chosen.logprob) if chosen is not None else -9999.0)
    top = sorted(lps.items(), key=lambda kv: kv[1].logprob, reverse=True)[:top_n] if top_n > 0 else []
    return chosen_t, [(text(t, lp), _lp(lp.logprob)) for t, lp in top]


def chat_logprobs(tok, token_ids: list[int], logprobs: list[dict] | None, top_n: int) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for tid, lps in zip(token_ids, logprobs):
        (t, lp), top = _entries(tok, tid, lps or {}, top_n)
        content.append({"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                        "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
                                         for s, v in top]})
    return {"content": content}


def completion_logprobs(tok, token_ids: list[int], logprobs: list[dict] | None, top_n: int,
                        text_offset: int = 0) -> dict | None:
    if logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    off = text_offset
    for tid, lps in zip(token_ids, logprobs):
        (t, lp), top = _entries(tok, tid, lps or {}, top_n)
        tokens.append(t)
        token_lps.append(lp)
        d = {s: v for s, v in top}
        d.setdefault(t, lp)
        tops.append(d)
        offsets.append(off)
        off += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def delta_logprobs(c: CompletionOutput) -> list[dict] | None:
    return c.logprobs_delta if c.logprobs_delta else None
