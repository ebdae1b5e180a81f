"""POST /v1/chat/completions (the conversation goes through the model's chat template)."""
from __future__ import annotations

from typing import AsyncIterator

from strata.serve.common import (check_params_for_model, Submitted, admit, chat_logprobs, check_model, check_output_error, new_id, now_s,
                                 submit, usage)
from strata.serve.errors import from_exception
from strata.serve.prompts import check_lengths
from strata.serve.protocol import (ChatCompletionRequest, chat_max_tokens, chat_sampling_params, normalize_messages,
                                   parse_model)
from strata.serve.state import ServerState
from strata.serve.streaming import DONE, sse


class PreparedChat:
    def __init__(self, state: ServerState, body: dict):
        req: ChatCompletionRequest = parse_model(ChatCompletionRequest, body)
        check_model(state, req.model)
        self.req = req
        self.params = chat_sampling_params(req)
        check_params_for_model(state, self.params)
        messages = normalize_messages(req.messages)
        text = state.tokenizer.render_chat(messages, add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=req.continue_final_message,
                                           chat_template=req.chat_template, kwargs=req.chat_template_kwargs)
        self.prompt_ids = state.tokenizer.encode(text, req.add_special_tokens)
        if not self.prompt_ids:
            from strata.core.sampling_params import ParameterError
            raise ParameterError("messages", "the rendered conversation is empty")
        _, mt_param = chat_max_tokens(req)
        check_lengths(len(self.prompt_ids), self.params.max_tokens, state.max_model_len, prompt_param="messages",
                      max_tokens_param=mt_param, prompt_word="messages")
        self.id = new_id("chatcmpl")
        self.created = now_s()
        self.model = state.model_name
        self.n = self.params.n
        self.top_n = req.top_logprobs or 0


async def start_chat(state: ServerState, body: dict, *, admission: bool = True) -> tuple[PreparedChat, Submitted]:
    if admission:
        admit(state)
    p = PreparedChat(state, body)
    sub = await submit(state, p.id, [p.prompt_ids], p.params)
    return p, sub


async def chat_response(state: ServerState, p: PreparedChat, sub: Submitted) -> dict:
    final = None
    try:
        async for out in sub.streams[0]:
            final = out
    finally:
        sub.abort_unfinished()
    assert final is not None
    check_output_error(final)
    choices = []
    completion_tokens = 0
    for c in sorted(final.outputs, key=lambda c: c.index):
        completion_tokens += len(c.token_ids)
        choices.append({
            "index": c.index,
            "message": {"role": "assistant", "content": c.text, "tool_calls": []},
            "logprobs": chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, p.top_n)
            if p.params.logprobs is not None else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        })
    return {"id": p.id, "object": "chat.completion", "created": p.created, "model": p.model, "choices": choices,
            "usage": usage(len(final.prompt_token_ids), completion_tokens), "system_fingerprint": None}


async def chat_stream(state: ServerState, p: PreparedChat, sub: Submitted) -> AsyncIterator[bytes]:
    so = p.req.stream_options
    include_usage = bool(so and so.include_usage)
    continuous = bool(so and so.continuous_usage_stats)
    n_prompt = len(p.prompt_ids)
    gen_tokens = 0
    done = [False] * p.n

    def chunk(choices: list) -> dict:
        d = {"id": p.id, "object": "chat.completion.chunk", "created": p.created, "model": p.model,
             "choices": choices}
        if include_usage:
            d["usage"] = usage(n_prompt, gen_tokens) if continuous else None
        return d

    try:
        # the role comes first, once per choice
        for i in range(p.n):
            yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]))
        async for out in sub.streams[0]:
            check_output_error(out)
            for c in out.outputs:
                if done[c.index]:
                    continue
                gen_tokens += len(c.token_ids_delta)
                finished = c.finish_reason is not None
                if not c.text_delta and not finished and not c.token_ids_delta:
                    continue  # a chunk per output that carries tokens, even when their text is held back
                delta = {"content": c.text_delta} if (c.text_delta or c.token_ids_delta) else {}
                lp = None
                if p.params.logprobs is not None:
                    lp = chat_logprobs(state.tokenizer, c.token_ids_delta, c.logprobs_delta or [], p.top_n)
                choice = {"index": c.index, "delta": delta, "logprobs": lp,
                          "finish_reason": c.finish_reason if finished else None}
                if finished:
                    choice["stop_reason"] = c.stop_reason
                    done[c.index] = True
                yield sse(chunk([choice]))
        if include_usage:
            yield sse({"id": p.id, "object": "chat.completion.chunk", "created": p.created, "model": p.model,
                       "choices": [], "usage": usage(n_prompt, gen_tokens)})
    except Exception as e:  # noqa: BLE001 - after the stream started: error event, then [DONE]
        yield sse(from_exception(e).body())
    finally:
        sub.abort_unfinished()
    yield DONE
