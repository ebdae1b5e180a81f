"""POST /v1/chat/completions (the conversation goes through the model's chat template).

With tools, the output of each choice is read by the plan's parser (serve/tools.py, serve/tool_parsers.py):
`message.tool_calls` and `finish_reason: "tool_calls"` when it holds calls ("stop" for a named function);
streamed, `delta.tool_calls` with the id and name first and the arguments in pieces after, and no chunk that
carries nothing. A request with the deprecated `functions` gets `message.function_call` / `delta.function_call`.
"""
from __future__ import annotations

from typing import AsyncIterator

from strata.serve.common import (check_params_for_model, Submitted, admit, chat_logprobs, check_model, check_output_error, new_id, now_s,
                                 submit, usage)
from strata.serve.errors import APIError, from_exception
from strata.serve.prompts import check_lengths
from strata.serve.protocol import (ChatCompletionRequest, chat_max_tokens, chat_sampling_params, normalize_messages,
                                   parse_model)
from strata.serve.state import ServerState
from strata.serve.streaming import DONE, sse
from strata.serve.structured import constraint_field, rename_error
from strata.serve.tool_parsers import Delta
from strata.serve.tools import ToolPlan, plan_tools, template_messages


class PreparedChat:
    def __init__(self, state: ServerState, body: dict):
        req: ChatCompletionRequest = parse_model(ChatCompletionRequest, body)
        check_model(state, req.model)
        self.req = req
        self.tools: ToolPlan = plan_tools(req, enable_auto=state.args.enable_auto_tool_choice,
                                          parser_name=state.args.tool_call_parser)
        self.params = chat_sampling_params(req, self.tools.constraint, self.tools.field)
        check_params_for_model(state, self.params)
        messages = template_messages(normalize_messages(req.messages))
        kwargs = dict(req.chat_template_kwargs or {})
        if self.tools.tools:
            kwargs["tools"] = self.tools.tools
        text = state.tokenizer.render_chat(messages, add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=req.continue_final_message,
                                           chat_template=req.chat_template, kwargs=kwargs)
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

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a finished choice, and its finish_reason (ToolPlan.finish_reason)."""
        plan = self.tools
        content, calls = plan.parser.parse(text) if plan.parser is not None else (text, [])  # (text, []): no calls
        if not plan.parallel:
            calls = calls[:1]
        if plan.legacy:
            msg = {"role": "assistant", "content": content}
            if calls:
                msg["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
        else:
            msg = {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]}
        return msg, plan.finish_reason(finish_reason, bool(calls))


async def start_chat(state: ServerState, body: dict, *, admission: bool = True) -> tuple[PreparedChat, Submitted]:
    if admission:
        admit(state)
    p = PreparedChat(state, body)
    try:
        sub = await submit(state, p.id, [p.prompt_ids], p.params)
    except APIError as e:  # the engine's check of the grammar names "structured_outputs.*"
        raise rename_error(e, "tools" if p.tools.constrained else constraint_field(p.req)) from None
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
        message, finish_reason = p.message(c.text, c.finish_reason)
        choices.append({
            "index": c.index,
            "message": message,
            "logprobs": chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, p.top_n)
            if p.params.logprobs is not None else None,
            "finish_reason": finish_reason,
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
    parser = p.tools.parser
    streamers = [parser.streamer() for _ in range(p.n)] if parser is not None else None
    held_lp: list[list] = [[] for _ in range(p.n)]  # logprobs of tokens whose chunk was not sent (tool streams)

    def chunk(choices: list) -> dict:
        d = {"id": p.id, "object": "chat.completion.chunk", "created": p.created, "model": p.model,
             "choices": choices}
        if include_usage:
            d["usage"] = usage(n_prompt, gen_tokens) if continuous else None
        return d

    try:
        # the role comes first, once per choice
        for i in range(p.n):
            yield sse(chunk([{"index": i, "delta": {"role": "assistant",
                                                    "content": None if p.tools.constrained else ""},
                              "logprobs": None, "finish_reason": None}]))
        async for out in sub.streams[0]:
            check_output_error(out)
            for c in out.outputs:
                if done[c.index]:
                    continue
                gen_tokens += len(c.token_ids_delta)
                finished = c.finish_reason is not None
                if not c.text_delta and not finished and not c.token_ids_delta:
                    continue  # a chunk per output that carries tokens, even when their text is held back
                finish_reason = c.finish_reason if finished else None
                if streamers is None:
                    delta = {"content": c.text_delta} if (c.text_delta or c.token_ids_delta) else {}
                else:
                    delta, finish_reason = _tool_delta(p, streamers[c.index], c.text_delta, finish_reason)
                lp = None
                if p.params.logprobs is not None:
                    lp = chat_logprobs(state.tokenizer, c.token_ids_delta, c.logprobs_delta or [], p.top_n)
                if streamers is not None:
                    if not delta and not finished:  # the parser holds the text back: no empty chunk
                        held_lp[c.index] += lp["content"] if lp else []
                        continue
                    if lp is not None and held_lp[c.index]:
                        lp = {"content": held_lp[c.index] + lp["content"]}
                        held_lp[c.index] = []
                choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
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


def _tool_delta(p: PreparedChat, streamer, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The delta of one streamed chunk read by a tool parser ({} when it holds everything back), and the
    chunk's finish_reason."""
    d: Delta = streamer.feed(text)
    if finish_reason is not None:
        d = d + streamer.finish()
    delta: dict = {}
    if d.content:
        delta["content"] = d.content
    calls = d.tool_calls if p.tools.parallel else [c for c in d.tool_calls if c["index"] == 0]
    if calls and p.tools.legacy:
        delta["function_call"] = _function_call_delta(calls)
    elif calls:
        delta["tool_calls"] = calls
    return delta, p.tools.finish_reason(finish_reason, streamer.num_calls > 0)


def _function_call_delta(calls: list[dict]) -> dict:
    """Pieces of the one call (index 0) as the deprecated `delta.function_call`: the name in the first, then
    argument pieces only."""
    out: dict = {}
    for c in calls:
        if "name" in c["function"]:
            out["name"] = c["function"]["name"]
        out["arguments"] = out.get("arguments", "") + c["function"].get("arguments", "")
    return out
