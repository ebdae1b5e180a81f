"""Structured output and tool calling through a real `strata serve` process and the official `openai` client:
response_format (a pydantic model through `client.chat.completions.parse`, json_object), vLLM's
structured_outputs / guided_* on completions, streaming, tool_choice required / named / none / auto, tool
messages round-tripping into the template, and 400s naming the parameter.

One server: the embedded SmolLM2-135M (a real model: it closes its strings), started with
`--enable-auto-tool-choice --tool-call-parser hermes`. The model is tiny: what is asserted about its output
only holds because the grammar forces it (response_format, required and named tools); `auto` is only checked
to answer in a valid shape, never to choose a tool."""
from __future__ import annotations

import json
import re
import sys
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from test_serve_utils import MODEL_NAME, ServerProcess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_structured")
    srv = ServerProcess("", log_path=str(d / "server.log"))
    srv.cmd = [sys.executable, "-m", "strata.serve.cli", "--served-model-name", MODEL_NAME, "--port", str(srv.port),
               "--kv-cache-memory", str(128 << 20), "--max-model-len", "2048", "--state-dir", str(d / "state"),
               "--disable-access-log", "--log-level", "warning",
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=300)


class Pet(BaseModel):
    name: str = Field(max_length=20)
    kind: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


ASK_PET = [{"role": "user", "content": "Describe a pet as JSON with name, kind, age and vaccinated."}]


class GetWeather(BaseModel):
    city: Literal["Paris", "Rome", "Tokyo"]
    unit: Literal["celsius", "fahrenheit"]


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather", description="Weather in a city")
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time in a city",
                                              "strict": True,
                                              "parameters": {"type": "object", "properties": {
                                                  "city": {"type": "string", "enum": ["Paris", "Rome"]}},
                                                  "required": ["city"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---------------------------------------------------------------------------------------------- response_format
def test_parse_pydantic_model(client):
    r = client.chat.completions.parse(model=MODEL_NAME, messages=ASK_PET, response_format=Pet, temperature=0,
                                      max_tokens=120)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Pet), msg.content
    assert Pet.model_validate_json(msg.content) == msg.parsed


def test_json_object_and_stream_equals_non_stream(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK_PET, temperature=0, max_tokens=120,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema(), "strict": True}}
    whole = client.chat.completions.create(model=MODEL_NAME, messages=ASK_PET, temperature=0, max_tokens=120,
                                           response_format=fmt)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=ASK_PET, temperature=0,
                                                 max_tokens=120, response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    Pet.model_validate_json(text)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_guided_choice_and_structured_outputs_regex(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Is the sky blue? Answer:", max_tokens=10,
                                  temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL_NAME, prompt="A three digit number:", max_tokens=10, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[1-9][0-9]{2}"}})
    assert re.fullmatch(r"[1-9][0-9]{2}", r.choices[0].text), r.choices[0].text


# ---------------------------------------------------------------------------------------------- tools
def test_tool_choice_required(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK_WEATHER, temperature=0, max_tokens=150,
                                       tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
                                       parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    (GetWeather if call.function.name == "get_weather" else dict)(**args)


def test_tool_choice_named_through_parse(client):
    r = client.chat.completions.parse(model=MODEL_NAME, messages=ASK_WEATHER, temperature=0, max_tokens=100,
                                      tools=[WEATHER_TOOL, TIME_TOOL],
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "stop"  # OpenAI's (and vLLM's) reason for a forced function; auto/required: tool_calls
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_tool_choice_none_and_auto_answer_in_shape(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK_WEATHER, temperature=0, max_tokens=8,
                                       tools=[WEATHER_TOOL], tool_choice="none")
    assert isinstance(r.choices[0].message.content, str) and not r.choices[0].message.tool_calls
    for tc in (None, "auto"):  # auto: the model may or may not call; either shape is valid
        extra = {} if tc is None else {"tool_choice": tc}
        r = client.chat.completions.create(model=MODEL_NAME, messages=ASK_WEATHER, temperature=0, max_tokens=8,
                                           tools=[WEATHER_TOOL], **extra)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length", "tool_calls")
        assert (c.finish_reason == "tool_calls") == bool(c.message.tool_calls)


HERMES_OUTPUT = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}'
                 '\n</tool_call>')


def test_auto_reads_the_models_hermes_calls(client):
    """The tiny model never writes a call by itself: a one-choice grammar makes it write one in the Hermes format,
    and tool_choice auto (--tool-call-parser hermes) must read it."""
    kw = dict(model=MODEL_NAME, messages=ASK_WEATHER, temperature=0, max_tokens=80, tools=[WEATHER_TOOL],
              tool_choice="auto", extra_body={"guided_choice": [HERMES_OUTPUT]})
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking.\n"
    (call,) = c.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Rome", "unit": "celsius"}')
    # streamed: test_streamed_tool_calls_equal_the_whole_answer_without_empty_chunks[auto]


WEATHER_FN = WEATHER_TOOL["function"]
STREAM_CASES = {  # the request's tool fields, and the finish_reason it must end with
    "required": (dict(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required"), "tool_calls"),
    "named": (dict(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "function", "function": {"name": "get_time"}}),
              "stop"),
    "auto": (dict(tools=[WEATHER_TOOL], tool_choice="auto", extra_body={"guided_choice": [HERMES_OUTPUT]}),
             "tool_calls"),
    "legacy_named": (dict(functions=[WEATHER_FN], function_call={"name": "get_weather"}), "stop"),
    "legacy_auto": (dict(functions=[WEATHER_FN], extra_body={"guided_choice": [HERMES_OUTPUT]}), "function_call"),
}


def reassemble(chunks) -> dict:
    """The answer a stream spells, checking OpenAI's chunk shapes on the way: the first chunk has the role; none
    carries nothing; a tool call's first delta has index, id, type and name, later ones only index and argument
    pieces; only the last chunk (before usage) has a finish_reason."""
    choices = [c for c in chunks if c.choices]
    assert choices[0].choices[0].delta.role == "assistant"
    out = {"content": "", "tool_calls": {}, "function_call": None, "finish_reason": None, "logprobs": []}
    for i, ch in enumerate(choices):
        (c,) = ch.choices
        d = c.delta
        assert c.finish_reason or d.role or d.content or d.tool_calls or d.function_call, f"empty chunk {i}: {ch}"
        assert (c.finish_reason is not None) == (i == len(choices) - 1)
        out["finish_reason"] = c.finish_reason or out["finish_reason"]
        out["content"] += d.content or ""
        out["logprobs"] += [t.token for t in (c.logprobs.content if c.logprobs else None) or []]
        for tc in d.tool_calls or []:
            if tc.index not in out["tool_calls"]:
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                out["tool_calls"][tc.index] = [tc.function.name, tc.function.arguments or ""]
            else:
                assert tc.id is None and tc.type is None and tc.function.name is None and tc.function.arguments
                out["tool_calls"][tc.index][1] += tc.function.arguments
        if d.function_call is not None:
            if out["function_call"] is None:
                assert d.function_call.name
                out["function_call"] = [d.function_call.name, d.function_call.arguments or ""]
            else:
                assert d.function_call.name is None and d.function_call.arguments
                out["function_call"][1] += d.function_call.arguments
    assert sorted(out["tool_calls"]) == list(range(len(out["tool_calls"])))
    out["tool_calls"] = [tuple(v) for _, v in sorted(out["tool_calls"].items())]
    out["function_call"] = out["function_call"] and tuple(out["function_call"])
    return out


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_streamed_tool_calls_equal_the_whole_answer_without_empty_chunks(client, case):
    """Streamed, a call's pieces concatenate to the non-streamed call, no chunk is empty (text the parser holds
    back sends nothing; its tokens' logprobs go with the next chunk), and finish_reason follows OpenAI's rule."""
    fields, finish = STREAM_CASES[case]
    kw = dict(model=MODEL_NAME, messages=ASK_WEATHER, temperature=0, max_tokens=100, logprobs=True, **fields)
    whole = client.chat.completions.create(**kw)
    c = whole.choices[0]
    got = reassemble(list(client.chat.completions.create(**kw, stream=True)))
    assert c.finish_reason == got["finish_reason"] == finish
    assert got["content"] == (c.message.content or "")
    assert got["tool_calls"] == [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
    fc = c.message.function_call
    assert got["function_call"] == (fc and (fc.name, fc.arguments))
    assert bool(got["tool_calls"]) != bool(fc) and bool(fc) == case.startswith("legacy")
    assert got["logprobs"] == [t.token for t in c.logprobs.content] and len(got["logprobs"]) == \
        whole.usage.completion_tokens
    if fc:
        json.loads(fc.arguments)
        assert not c.message.tool_calls


def test_legacy_functions(server, client):
    """The deprecated `functions` / `function_call` (older clients): a forced function through the client, its
    result round-tripping as a `function` message; `tools` with `functions` (or function_call "required") is a 400."""
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK_WEATHER, temperature=0, max_tokens=60,
                                       functions=[WEATHER_FN], function_call={"name": "get_weather"})
    msg = r.choices[0].message
    assert msg.function_call.name == "get_weather" and msg.content is None
    GetWeather.model_validate_json(msg.function_call.arguments)
    history = ASK_WEATHER + [{"role": "assistant", "content": None, "function_call": msg.function_call.model_dump()},
                             {"role": "function", "name": "get_weather", "content": "21 degrees"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=history, functions=[WEATHER_FN],
                                       function_call="none", temperature=0, max_tokens=4)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.function_call is None
    r = post(server, "/tokenize", {"messages": history, "tools": [WEATHER_TOOL], "chat_template": TEMPLATE,
                                   "add_generation_prompt": False})
    text = post(server, "/detokenize", {"tokens": r.json()["tokens"]}).json()["prompt"]
    assert text.endswith(f"<assistant>CALL get_weather {json.loads(msg.function_call.arguments)['city']}"
                         "<tool>21 degrees"), text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=ASK_WEATHER, max_tokens=4, tools=[WEATHER_TOOL],
                                       functions=[WEATHER_FN])
    assert e.value.body["param"] == "functions"
    assert "'tools'" in e.value.body["message"] and "'functions'" in e.value.body["message"]
    for extra, param in [({"function_call": "required"}, "function_call"),
                         ({"function_call": {"name": "nope"}}, "function_call"),
                         ({"tool_choice": "none"}, "function_call"),
                         ({"functions": [{"name": "f", "parameters": BAD_SCHEMA}]}, "functions.0.parameters")]:
        r = post(server, "/v1/chat/completions", {**CHAT, "functions": [WEATHER_FN], **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "21 degrees"},
]
TEMPLATE = ("{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
            "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}"
            "{% endfor %}{% if m.tool_call_id %}RESULT OF {{ m.tool_call_id }}{% endif %}{% endfor %}")


def test_tool_messages_round_trip_into_the_template(server, client):
    r = post(server, "/tokenize", {"messages": HISTORY, "tools": [WEATHER_TOOL], "chat_template": TEMPLATE,
                                   "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    text = post(server, "/detokenize", {"tokens": r.json()["tokens"]}).json()["prompt"]
    assert text == ("TOOL get_weather;<user>Weather in Paris?<assistant>CALL get_weather Paris"
                    "<tool>21 degreesRESULT OF call_abc"), text
    # and through chat completions with the model's own template
    r = client.chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=[WEATHER_TOOL], tool_choice="none",
                                       temperature=0, max_tokens=4)
    assert r.choices[0].message.content is not None


# ---------------------------------------------------------------------------------------------- errors
BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "strin"}}}
CHAT = {"model": MODEL_NAME, "messages": ASK_PET, "max_tokens": 4}
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_json": BAD_SCHEMA}, "guided_json"),
    ({"guided_regex": "(["}, "guided_regex"),                                  # refused by the grammar engine
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= nothing_defined"}}, "structured_outputs.grammar"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}}], "tool_choice": "none"},
     "tools.0.function.parameters"),
    ({"tools": [TIME_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[p for _, p in BAD])
def test_bad_constraints_are_400_naming_the_param(server, client, extra, param):
    r = post(server, "/v1/chat/completions", {**CHAT, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_bad_schema_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "x", "schema": BAD_SCHEMA}}})
    assert e.value.body["param"] == "response_format" and "strin" in e.value.body["message"]
