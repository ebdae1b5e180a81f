"""POST /v1/completions."""
from __future__ import annotations

from typing import AsyncIterator

from strata.core.outputs import RequestOutput
from strata.serve.common import (check_params_for_model, Submitted, admit, check_model, check_output_error, completion_logprobs,
                                 new_id, now_s, submit, usage)
from strata.serve.errors import APIError, from_exception
from strata.serve.prompts import check_lengths, completion_prompts
from strata.serve.protocol import CompletionRequest, completion_sampling_params, parse_model
from strata.serve.state import ServerState
from strata.serve.structured import constraint_field, rename_error
from strata.serve.streaming import DONE, merge, sse


class PreparedCompletion:
    def __init__(self, state: ServerState, body: dict):
        req: CompletionRequest = parse_model(CompletionRequest, body)
        check_model(state, req.model)
        self.req = req
        self.params = completion_sampling_params(req)
        check_params_for_model(state, self.params)
        self.prompts = completion_prompts(state.tokenizer, req.prompt, req.add_special_tokens)
        for _, ids in self.prompts:
            check_lengths(len(ids), self.params.max_tokens, state.max_model_len, prompt_param="prompt",
                          max_tokens_param="max_tokens")
        self.id = new_id("cmpl")
        self.created = now_s()
        self.model = state.model_name
        self.n = self.params.n
        self.top_n = req.logprobs or 0

    def echo_text(self, state: ServerState, i: int) -> str:
        text, ids = self.prompts[i]
        return text if text is not None else state.tokenizer.decode(ids)


async def start_completion(state: ServerState, body: dict, *, admission: bool = True
                           ) -> tuple[PreparedCompletion, Submitted]:
    if admission:
        admit(state)
    p = PreparedCompletion(state, body)
    if admission and len(p.prompts) > 1:
        admit(state, len(p.prompts))
    try:
        sub = await submit(state, p.id, [ids for _, ids in p.prompts], p.params)
    except APIError as e:  # the engine's check of the grammar names "structured_outputs.*"
        raise rename_error(e, constraint_field(p.req)) from None
    return p, sub


async def completion_response(state: ServerState, p: PreparedCompletion, sub: Submitted) -> dict:
    finals: list[RequestOutput | None] = [None] * len(sub.streams)
    try:
        async for i, out in merge(sub.streams):
            finals[i] = out
    finally:
        sub.abort_unfinished()
    choices = []
    prompt_tokens = completion_tokens = 0
    tok = state.tokenizer
    for i, out in enumerate(finals):
        assert out is not None
        check_output_error(out)
        prompt_tokens += len(out.prompt_token_ids)
        prefix = p.echo_text(state, i) if p.req.echo else ""
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            choices.append({
                "index": i * p.n + c.index,
                "text": prefix + c.text,
                "logprobs": completion_logprobs(tok, c.token_ids, c.logprobs, p.top_n, len(prefix))
                if p.params.logprobs is not None else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
    return {"id": p.id, "object": "text_completion", "created": p.created, "model": p.model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


async def completion_stream(state: ServerState, p: PreparedCompletion, sub: Submitted) -> AsyncIterator[bytes]:
    so = p.req.stream_options
    include_usage = bool(so and so.include_usage)
    continuous = bool(so and so.continuous_usage_stats)
    tok = state.tokenizer
    n_prompts = len(sub.streams)
    sent_first = [False] * (n_prompts * p.n)
    done = [False] * (n_prompts * p.n)
    offsets = [0] * (n_prompts * p.n)
    prompt_lens = [len(ids) for _, ids in p.prompts]
    gen_tokens = 0
    try:
        async for i, out in merge(sub.streams):
            check_output_error(out)
            for c in out.outputs:
                idx = i * p.n + c.index
                if done[idx]:
                    continue
                gen_tokens += len(c.token_ids_delta)
                text = c.text_delta
                if p.req.echo and not sent_first[idx]:
                    text = p.echo_text(state, i) + text
                finished = c.finish_reason is not None
                if not text and not finished and not c.token_ids_delta:
                    continue  # a chunk per output that carries tokens, even when their text is held back
                sent_first[idx] = True
                lp = None
                if p.params.logprobs is not None:
                    lp = completion_logprobs(tok, c.token_ids_delta, c.logprobs_delta or [], p.top_n, offsets[idx])
                offsets[idx] += len(text)
                chunk = {"id": p.id, "object": "text_completion", "created": p.created, "model": p.model,
                         "choices": [{"index": idx, "text": text, "logprobs": lp,
                                      "finish_reason": c.finish_reason if finished else None,
                                      "stop_reason": c.stop_reason if finished else None}]}
                if include_usage:
                    chunk["usage"] = usage(sum(prompt_lens), gen_tokens) if continuous else None
                if finished:
                    done[idx] = True
                yield sse(chunk)
        if include_usage:
            yield sse({"id": p.id, "object": "text_completion", "created": p.created, "model": p.model,
                       "choices": [], "usage": usage(sum(prompt_lens), gen_tokens)})
    except Exception as e:  # noqa: BLE001 - after the stream started: error event, then [DONE]
        yield sse(from_exception(e).body())
    finally:
        sub.abort_unfinished()
    yield DONE
