"""Tool-call parsers on fixed strings, whole and streamed (split at every position and one character at a
time: the streamed calls must equal the parsed ones), and the request checks of serve/tools.py and
serve/structured.py that need no engine."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from strata.core.sampling_params import ParameterError
from strata.serve.tool_parsers import (Delta, HermesToolParser, Llama3JsonToolParser, NamedCallParser,
                                       RequiredCallsParser, get_tool_parser)
from strata.serve.tools import plan_tools, required_schema, template_messages


def run_stream(parser, pieces) -> tuple[str, list[dict], list[dict]]:
    """Feed the pieces; (content, calls [{name, arguments}] rebuilt from the deltas, the raw deltas)."""
    s = parser.streamer()
    total = Delta()
    for piece in pieces:
        total = total + s.feed(piece)
    total = total + s.finish()
    calls: dict[int, dict] = {}
    for d in total.tool_calls:
        if "id" in d:
            assert d["index"] not in calls and d["type"] == "function" and d["id"].startswith("call_")
            calls[d["index"]] = {"name": d["function"]["name"], "arguments": d["function"]["arguments"]}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return total.content, [calls[i] for i in range(len(calls))], total.tool_calls


def splits(text):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def check_whole_and_streamed(parser, text, content, calls):
    got_content, got_calls = parser.parse(text)
    assert got_content == content
    assert [{"name": c.name, "arguments": c.arguments} for c in got_calls] == calls
    for c in got_calls:
        assert c.id.startswith("call_") and c.to_openai()["function"]["arguments"] == c.arguments
    for pieces in splits(text):
        s_content, s_calls, _ = run_stream(parser, pieces)
        assert s_calls == calls, pieces
        if calls:  # streamed content: the text before the first call
            assert s_content == (content or ""), pieces
        else:
            assert s_content == text, pieces


ARGS = '{"city": "Pa\\"ris {x}", "days": [1, {"n": 2}], "name": "inner"}'

HERMES = [
    ("plain answer, no calls", "plain answer, no calls", []),
    ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": " + ARGS + "}\n</tool_call>",
     None, [{"name": "get_weather", "arguments": ARGS}]),
    ("Let me check.\n<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\n"
     "<tool_call>{\"arguments\": {\"x\": 1}, \"name\": \"b\"}</tool_call>",
     "Let me check.\n", [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": '{"x": 1}'}]),
    # unterminated last block (cut at the end of generation), arguments as an encoded string
    ('<tool_call>{"name": "c", "arguments": "{\\"q\\": 3}"}', None, [{"name": "c", "arguments": '{"q": 3}'}]),
    ("a < b <tool", "a < b <tool", []),
]


@pytest.mark.parametrize("text,content,calls", HERMES)
def test_hermes(text, content, calls):
    p = get_tool_parser("hermes")
    assert isinstance(p, HermesToolParser)
    check_whole_and_streamed(p, text, content, calls)


def test_hermes_bad_calls_are_content_whole_but_not_streamed():
    """Whole: a block that does not parse makes the text content. Streamed, the text after <tool_call> is
    never content, and a call's header and argument pieces cannot be taken back."""
    p = HermesToolParser()
    text = '<tool_call>{"name": "f", "arguments": {"a": </tool_call>'
    assert p.parse(text) == (text, [])
    assert run_stream(p, list(text))[:2] == ("", [{"name": "f", "arguments": '{"a": '}])
    text = '<tool_call>{"arguments": {}}</tool_call>'   # no name: no call
    assert p.parse(text) == (text, [])
    assert run_stream(p, list(text))[:2] == ("", [])


LLAMA3 = [
    ('{"name": "f", "parameters": ' + ARGS + '}', None, [{"name": "f", "arguments": ARGS}]),
    ('  <|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "arguments": {}}', None,
     [{"name": "f", "arguments": '{"a": 1}'}, {"name": "g", "arguments": "{}"}]),
    ("The answer is {not a call}", "The answer is {not a call}", []),
    ("<|not the tag", "<|not the tag", []),
    ("Hello", "Hello", []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA3)
def test_llama3_json(text, content, calls):
    check_whole_and_streamed(get_tool_parser("llama3_json"), text, content, calls)


def test_llama3_json_text_after_the_call_is_content():
    text = '{"name": "f", "parameters": {}} and more words'
    assert Llama3JsonToolParser().parse(text) == (text, [])


def test_required_array():
    text = '[{"name": "f", "arguments": ' + ARGS + '}, {"name": "g", "arguments": {}}]'
    check_whole_and_streamed(RequiredCallsParser(), text, None,
                             [{"name": "f", "arguments": ARGS}, {"name": "g", "arguments": "{}"}])
    cut = '[{"name": "f", "arguments": {"a": "x'
    assert RequiredCallsParser().parse(cut) == (cut, [])


def test_named_arguments():
    text = ' \n' + ARGS + '\n '
    check_whole_and_streamed(NamedCallParser("f"), text, None, [{"name": "f", "arguments": ARGS}])
    _, _, deltas = run_stream(NamedCallParser("f"), list(text))
    assert deltas[0]["function"] == {"name": "f", "arguments": ""} and "id" in deltas[0]


def test_stream_header_first_then_argument_pieces():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    _, _, deltas = run_stream(HermesToolParser(), list(text))
    assert deltas[0]["function"] == {"name": "f", "arguments": ""}
    assert len(deltas) > 3 and all("id" not in d for d in deltas[1:])


# ---------------------------------------------------------------------------------------------- tools
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
    "$defs": {"City": {"type": "string", "enum": ["Paris", "Rome"]}}}}},
    {"type": "function", "function": {"name": "noop"}}]


def req(**kw):
    base = dict(tools=None, tool_choice=None, parallel_tool_calls=None, functions=None, function_call=None)
    return SimpleNamespace(**{**base, **kw})


def test_plan_tools_choices():
    assert plan_tools(req(), enable_auto=False, parser_name=None).choice == "none"
    plan = plan_tools(req(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), enable_auto=False,
                      parser_name=None)
    schema = plan.constraint["json"]
    assert schema["maxItems"] == 1 and schema["$defs"] == {"City": {"type": "string", "enum": ["Paris", "Rome"]}}
    assert [v["properties"]["name"]["enum"] for v in schema["items"]["anyOf"]] == [["get_weather"], ["noop"]]
    plan = plan_tools(req(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "noop"}}),
                      enable_auto=False, parser_name=None)
    assert plan.choice == "named" and plan.constraint["json"]["properties"] == {}
    plan = plan_tools(req(tools=TOOLS), enable_auto=True, parser_name="hermes")
    assert plan.choice == "auto" and isinstance(plan.parser, HermesToolParser) and plan.constraint is None


@pytest.mark.parametrize("kw,param", [
    (dict(tools=TOOLS), "tool_choice"),                       # auto without --enable-auto-tool-choice
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}], tool_choice="none"),
     "tools.0.function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
          tool_choice="required"), "tools.0.function.parameters"),
    (dict(tools=[TOOLS[1], TOOLS[1]], tool_choice="none"), "tools.1.function.name"),
    # the deprecated spellings: functions / function_call
    (dict(functions=[{"name": "f"}]), "functions"),           # auto (the default) without --enable-auto-tool-choice
    (dict(functions=[{"name": "f"}], function_call="auto"), "function_call"),
    (dict(functions=[{"name": "f"}], tools=TOOLS), "functions"),
    (dict(functions=[{"name": "f"}], tool_choice="none"), "function_call"),
    (dict(tools=TOOLS, function_call="none"), "function_call"),
    (dict(functions=[{"name": "f"}], function_call="required"), "function_call"),
    (dict(functions=[{"name": "f"}], function_call={"name": "g"}), "function_call"),
    (dict(functions=[{"name": "f"}], function_call={"type": "function", "function": {"name": "f"}}), "function_call"),
    (dict(functions=[{"name": "f"}, {"name": "f"}], function_call="none"), "functions.1.name"),
    (dict(functions=[{"name": "f", "parameters": {"type": "strin"}}], function_call="none"), "functions.0.parameters"),
    (dict(functions=[{"name": "f"}], function_call="none", parallel_tool_calls=True), "parallel_tool_calls"),
])
def test_plan_tools_errors_name_the_param(kw, param):
    with pytest.raises(ParameterError) as e:
        plan_tools(req(**kw), enable_auto=False, parser_name=None)
    assert e.value.param == param


def test_plan_tools_legacy_functions_and_finish_reasons():
    """functions / function_call are tools / tool_choice in the older shape (one call at most); finish_reason:
    tool_calls (auto, required), stop (a named function, as OpenAI answers), function_call (legacy auto)."""
    fns = [t["function"] for t in TOOLS]
    plan = plan_tools(req(functions=fns, function_call={"name": "get_weather"}), enable_auto=False, parser_name=None)
    assert (plan.choice, plan.legacy, plan.parallel, plan.field) == ("named", True, False, "functions")
    assert plan.constraint["json"]["required"] == ["city"] and plan.tools == TOOLS
    plan = plan_tools(req(functions=fns), enable_auto=True, parser_name="hermes")
    assert plan.choice == "auto" and plan.legacy and not plan.parallel
    assert plan.finish_reason("stop", True) == "function_call"
    assert plan_tools(req(functions=fns, function_call="none"), enable_auto=False, parser_name=None).choice == "none"
    for kw, rule in [(dict(tool_choice="required"), "tool_calls"), (dict(), "tool_calls"),
                     (dict(tool_choice={"type": "function", "function": {"name": "noop"}}), "stop")]:
        plan = plan_tools(req(tools=TOOLS, **kw), enable_auto=True, parser_name="hermes")
        assert not plan.legacy and plan.field == "tools"
        assert plan.finish_reason("stop", True) == rule
        assert plan.finish_reason("stop", False) == "stop" and plan.finish_reason("length", True) == "length"


def test_required_schema_conflicting_defs():
    other = json.loads(json.dumps(TOOLS[0]))
    other["function"]["name"] = "other"
    other["function"]["parameters"]["$defs"]["City"] = {"type": "integer"}
    with pytest.raises(ParameterError) as e:
        required_schema([TOOLS[0], other], True)
    assert e.value.param == "tools.1.function.parameters"


def test_template_messages_arguments_become_objects():
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    out = template_messages(msgs)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and out[1] == msgs[1]
    with pytest.raises(ParameterError) as e:
        template_messages([{"role": "assistant", "content": "", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}])
    assert e.value.param == "messages.0.tool_calls.0.function.arguments"
    legacy = [{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"a": 1}'}},
              {"role": "function", "name": "f", "content": "42"}]
    out = template_messages(legacy)
    assert out[0]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    assert "function_call" not in out[0] and out[1] == {"role": "tool", "name": "f", "content": "42"}
    with pytest.raises(ParameterError) as e:
        template_messages([{"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{"}}])
    assert e.value.param == "messages.0.function_call.arguments"


# ---------------------------------------------------------------------------------------------- constraints
def constraint_req(**kw):
    base = dict(response_format=None, structured_outputs=None, guided_json=None, guided_regex=None,
                guided_choice=None, guided_grammar=None)
    return SimpleNamespace(**{**base, **kw})


def test_request_constraint_spellings():
    from strata.serve.structured import request_constraint
    assert request_constraint(constraint_req(response_format={"type": "text"})) == (None, None)
    so, field = request_constraint(constraint_req(guided_json='{"type": "object"}'))
    assert (so.json, field) == ({"type": "object"}, "guided_json")
    so, field = request_constraint(constraint_req(structured_outputs={"regex": "a+", "json": None, "choice": None}))
    assert (so.regex, field) == ("a+", "structured_outputs")
    so, _ = request_constraint(constraint_req(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}, "strict": True}}))
    assert so.json == {"type": "object"}


@pytest.mark.parametrize("kw,param", [
    (dict(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex"),
    (dict(structured_outputs={"regex": "a", "choice": ["a"]}), "structured_outputs"),
    (dict(structured_outputs={"regex": "a", "no_such_option": True}), "structured_outputs.no_such_option"),
    (dict(guided_choice=[]), "guided_choice"),
    (dict(guided_json="{not json"), "guided_json"),
    (dict(guided_json={"type": 5}), "guided_json"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
])
def test_request_constraint_errors_name_the_field(kw, param):
    from strata.serve.structured import request_constraint
    with pytest.raises(ParameterError) as e:
        request_constraint(constraint_req(**kw))
    assert e.value.param == param
    assert param in str(e.value)  # the message names the field too


def test_the_core_owns_the_schema_checks():
    """One check of a JSON schema (core/sampling_params.py): StructuredOutputsParams and the server's fields give
    the same message, each naming its own field."""
    from strata.core.sampling_params import StructuredOutputError, StructuredOutputsParams, check_json_schema
    from strata.serve.structured import request_constraint
    for bad, why in [("{not json", "is not valid JSON"), ("[1]", "must be a JSON schema object, got list")]:
        with pytest.raises(StructuredOutputError) as core:
            StructuredOutputsParams(json=bad)
        with pytest.raises(ParameterError) as served:
            request_constraint(constraint_req(guided_json=bad))
        assert (core.value.param, served.value.param) == ("structured_outputs.json", "guided_json")
        assert why in str(core.value) and str(served.value) == str(core.value).replace("structured_outputs.json",
                                                                                        "guided_json")
    with pytest.raises(StructuredOutputError) as e:
        check_json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}, "tools.0.function.parameters")
    assert e.value.param == "tools.0.function.parameters" and "at properties/a/type" in str(e.value)
    assert StructuredOutputsParams(json={"type": "strin"}).json == {"type": "strin"}  # the engine refuses it later
