"""Tool calling in chat completions: checking `tools` / `tool_choice`, the grammar behind "required" and a named
function, and what goes to the chat template.

- `none`: the tools go to the template, the output is plain content.
- `auto` (the default when tools are given): the model writes calls in its own format, read by the parser
  `--tool-call-parser` names; needs `--enable-auto-tool-choice` (vLLM's rule), else 400 naming tool_choice.
- `required`: the output is constrained to a JSON array of `{"name", "arguments"}` objects, one of the tools
  each (`anyOf` over their parameter schemas; at most one call with `parallel_tool_calls: false`).
- `{"type": "function", "function": {"name": N}}`: the output is constrained to N's arguments object.

`finish_reason` (OpenAI's rule, which vLLM follows too): "tool_calls" when `auto` or `required` ended with calls,
"stop" for a named function (the client forced that call), the engine's reason ("length") otherwise.

The deprecated `functions` / `function_call` fields are the older spelling of `tools` / `tool_choice` ("none",
"auto" or `{"name": N}`; one call at most). Such a request is answered in the older shape: `message.function_call`
`{name, arguments}` (streamed: `delta.function_call`) and finish_reason "function_call" (named: "stop").
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from strata.core.sampling_params import ParameterError, check_json_schema
from strata.serve.tool_parsers import NamedCallParser, RequiredCallsParser, get_tool_parser

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolPlan:
    choice: str                      # "none" | "auto" | "required" | "named"
    tools: list[dict] | None         # for the chat template (None: no tools)
    parser: Any = None               # reads the output into tool calls (None for "none")
    constraint: dict | None = None   # StructuredOutputsParams keyword arguments ("required", "named")
    parallel: bool = True            # False: at most one call
    legacy: bool = False             # the request used `functions` / `function_call`: answer in that shape

    @property
    def constrained(self) -> bool:
        return self.constraint is not None

    @property
    def field(self) -> str:
        """The request field the tools came in (errors about their grammar name it)."""
        return "functions" if self.legacy else "tools"

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        if engine_reason != "stop" or not called or self.choice == "named":
            return engine_reason
        return "function_call" if self.legacy else "tool_calls"


def plan_tools(r: Any, *, enable_auto: bool, parser_name: str | None) -> ToolPlan:
    legacy = r.functions is not None or r.function_call is not None
    if legacy:
        tools, choice, choice_param = _legacy_request(r)
        parallel = False
    else:
        tools = check_tools(r.tools)
        choice, choice_param = r.tool_choice, "tool_choice"
        parallel = r.parallel_tool_calls is not False
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        name = _named_choice(choice, tools, choice_param)
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        schema = copy.deepcopy(fn.get("parameters") or _NO_PARAMETERS)
        return ToolPlan("named", tools, NamedCallParser(name), {"json": schema}, parallel, legacy)
    allowed = ("none", "auto") if legacy else ("none", "auto", "required")
    if choice not in allowed:
        shapes = ("'none', 'auto' or {'name': ...}" if legacy else
                  "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")
        raise ParameterError(choice_param, f"{choice_param} must be {shapes}, got {choice!r}")
    if choice == "none":
        return ToolPlan("none", tools or None, legacy=legacy)
    what, instead = ("functions", "'none' or a named function") if legacy else \
        ("tools", "'none', 'required' or a named function")
    if not tools:
        raise ParameterError(choice_param, f"{choice_param} {choice!r} needs a non-empty '{what}' list")
    if choice == "required":
        return ToolPlan("required", tools, RequiredCallsParser(), {"json": required_schema(tools, parallel)},
                        parallel)
    if not (enable_auto and parser_name):
        raise ParameterError(choice_param, f"{choice_param} 'auto' (the default when {what} are given) needs the "
                                           "server started with --enable-auto-tool-choice and --tool-call-parser; "
                                           f"send {choice_param} {instead} instead")
    return ToolPlan("auto", tools, get_tool_parser(parser_name), None, parallel, legacy)


def _legacy_request(r: Any) -> tuple[list[dict], Any, str]:
    """`functions` / `function_call` as tools and a tool_choice: (tools, choice, the field errors about the choice
    name)."""
    if r.tools is not None and r.functions is not None:
        raise ParameterError("functions", "'tools' and 'functions' cannot both be given ('functions' is the "
                                          "deprecated spelling of 'tools'; send only 'tools')")
    if r.tools is not None:
        raise ParameterError("function_call", "'function_call' goes with the deprecated 'functions'; with 'tools' "
                                              "send 'tool_choice'")
    if r.tool_choice is not None:
        raise ParameterError("function_call", "'tool_choice' and 'function_call' cannot both be given "
                                              "('function_call' is the deprecated spelling of 'tool_choice')")
    if r.parallel_tool_calls:
        raise ParameterError("parallel_tool_calls", "parallel_tool_calls goes with 'tools': the deprecated "
                                                    "'functions' make at most one call")
    out, seen = [], set()
    for i, fn in enumerate(r.functions or []):
        out.append({"type": "function", "function": _check_function(fn, f"functions.{i}", seen)})
    choice = r.function_call
    if isinstance(choice, dict):
        if set(choice) != {"name"} or not isinstance(choice["name"], str):
            raise ParameterError("function_call", "function_call must be 'none', 'auto' or {'name': ...}")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    # without function_call, "auto" is the default that `functions` brought: its errors name that field
    return out, choice, "functions" if choice is None else "function_call"


def check_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    out, seen = [], set()
    for i, t in enumerate(tools):
        p = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise ParameterError(f"{p}.type", f"{p} must be {{'type': 'function', 'function': {{...}}}}")
        out.append({"type": "function", "function": _check_function(t.get("function"), f"{p}.function", seen)})
    return out


def _check_function(fn: Any, p: str, seen: set) -> dict:
    """One function definition ({name, description, parameters, strict}); `p` is where it sits in the request."""
    if not isinstance(fn, dict):
        raise ParameterError(p, f"{p} must be an object with a 'name'")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ParameterError(f"{p}.name", f"{p}.name must be 1-64 letters, digits, '_', '-', '.' or ':', "
                                          f"got {name!r}")
    if name in seen:
        raise ParameterError(f"{p}.name", f"two functions are named {name!r}")
    seen.add(name)
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ParameterError(f"{p}.description", f"{p}.description must be a string")
    params = fn.get("parameters")
    if params is None:
        return dict(fn)
    params = check_json_schema(params, f"{p}.parameters")
    if not isinstance(params, dict):
        raise ParameterError(f"{p}.parameters", f"{p}.parameters must be an object schema")
    return {**fn, "parameters": params}


def _named_choice(choice: dict, tools: list[dict], param: str) -> str:
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise ParameterError(param, "a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
    if not any(t["function"]["name"] == name for t in tools):
        where = "functions" if param == "function_call" else "tools"
        raise ParameterError(param, f"{param} names the function {name!r}, which is not in '{where}'")
    return name


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """A JSON array of one or more calls, each {"name": one tool's name, "arguments": that tool's parameters}.
    The tools' `$defs` / `definitions` move to the root, where their `$ref`s point."""
    defs: dict[str, dict] = {}
    variants = []
    for i, t in enumerate(tools):
        fn = t["function"]
        params = copy.deepcopy(fn.get("parameters") or _NO_PARAMETERS)
        for key in ("$defs", "definitions"):
            for k, v in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).get(k, v) != v:
                    raise ParameterError(f"tools.{i}.function.parameters",
                                         f"tools define {key}/{k} differently; with tool_choice 'required' the "
                                         f"tools' definitions share one namespace")
                defs[key][k] = v
        variants.append({"type": "object",
                         "properties": {"name": {"type": "string", "enum": [fn["name"]]}, "arguments": params},
                         "required": ["name", "arguments"], "additionalProperties": False})
    schema = {"type": "array", "minItems": 1, "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    schema.update(defs)
    return schema


# ---------------------------------------------------------------------------------------------- messages
def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant `tool_calls` as chat templates read them: arguments as objects (the API sends JSON text;
    templates write `arguments | tojson`), checked; `tool` messages keep their `tool_call_id`. The deprecated
    spellings become the current ones, which templates know: an assistant's `function_call` a one-call
    `tool_calls`, a `function` message (the function's result) a `tool` message keeping its `name`."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "function":
            m = {**m, "role": "tool"}
        if m["role"] == "assistant" and m.get("function_call") is not None:
            p = f"messages.{i}.function_call"
            if m.get("tool_calls"):
                raise ParameterError(p, f"messages.{i} has both tool_calls and the deprecated function_call")
            call = {"type": "function", "function": m["function_call"]}
            m = {k: v for k, v in m.items() if k != "function_call"}
            m["tool_calls"] = [_template_call(call, p, legacy=True)]
        elif m["role"] == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise ParameterError(f"messages.{i}.tool_calls", f"messages.{i}.tool_calls must be a list")
            m = {**m, "tool_calls": [_template_call(c, f"messages.{i}.tool_calls.{j}") for j, c in enumerate(calls)]}
        elif m["role"] == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise ParameterError(f"messages.{i}.tool_call_id", f"messages.{i}.tool_call_id must be a string")
        out.append(m)
    return out


def _template_call(c: Any, p: str, legacy: bool = False) -> dict:
    """`p` names the call in the request: a `tool_calls` entry, or a `function_call` (`legacy`: fields at its top)."""
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        shape = "{'name', 'arguments'}" if legacy else "{'id', 'type': 'function', 'function': {'name', 'arguments'}}"
        raise ParameterError(p, f"{p} must be {shape}")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        where = f"{p}.arguments" if legacy else f"{p}.function.arguments"
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ParameterError(where, f"{where} is not valid JSON") from None
    return {**c, "type": c.get("type", "function"), "function": {**fn, "arguments": args}}
