"""Tool calling in chat completions: checking `tools` / `tool_choice`, the grammar behind "required" and a named
function, and what goes to the chat template.

- `none`: the tools go to the template, the output is plain content.
- `auto` (the default when tools are given): the model writes calls in its own format, read by the parser
  `--tool-call-parser` names; needs `--enable-auto-tool-choice` (vLLM's rule), else 400 naming tool_choice.
- `required`: the output is constrained to a JSON array of `{"name", "arguments"}` objects, one of the tools
  each (`anyOf` over their parameter schemas; at most one call with `parallel_tool_calls: false`).
- `{"type": "function", "function": {"name": N}}`: the output is constrained to N's arguments object.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from strata.core.sampling_params import ParameterError
from strata.serve.structured import check_json_schema
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

    @property
    def constrained(self) -> bool:
        return self.constraint is not None


def plan_tools(r: Any, *, enable_auto: bool, parser_name: str | None) -> ToolPlan:
    if r.functions:
        raise ParameterError("functions", "the deprecated 'functions' field is not supported; use 'tools'")
    if r.function_call is not None:
        raise ParameterError("function_call", "the deprecated 'function_call' field is not supported; use "
                                              "'tool_choice'")
    tools = check_tools(r.tools)
    choice = r.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    parallel = r.parallel_tool_calls is not False
    if isinstance(choice, dict):
        name = _named_choice(choice, tools)
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        schema = copy.deepcopy(fn.get("parameters") or _NO_PARAMETERS)
        return ToolPlan("named", tools, NamedCallParser(name), {"json": schema}, parallel)
    if choice not in ("none", "auto", "required"):
        raise ParameterError("tool_choice", f"tool_choice must be 'none', 'auto', 'required' or "
                                            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")
    if choice == "none":
        return ToolPlan("none", tools or None)
    if not tools:
        raise ParameterError("tool_choice", f"tool_choice {choice!r} needs a non-empty 'tools' list")
    if choice == "required":
        return ToolPlan("required", tools, RequiredCallsParser(), {"json": required_schema(tools, parallel)},
                        parallel)
    if not (enable_auto and parser_name):
        raise ParameterError("tool_choice", "tool_choice 'auto' (the default when tools are given) needs the server "
                                            "started with --enable-auto-tool-choice and --tool-call-parser; send "
                                            "tool_choice 'none', 'required' or a named function instead")
    return ToolPlan("auto", tools, get_tool_parser(parser_name), None, parallel)


def check_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    out, seen = [], set()
    for i, t in enumerate(tools):
        p = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise ParameterError(f"{p}.type", f"{p} must be {{'type': 'function', 'function': {{...}}}}")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ParameterError(f"{p}.function", f"{p}.function must be an object with a 'name'")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ParameterError(f"{p}.function.name", f"{p}.function.name must be 1-64 letters, digits, '_', '-', "
                                                       f"'.' or ':', got {name!r}")
        if name in seen:
            raise ParameterError(f"{p}.function.name", f"two tools are named {name!r}")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ParameterError(f"{p}.function.description", f"{p}.function.description must be a string")
        params = fn.get("parameters")
        if params is not None:
            params = check_json_schema(params, f"{p}.function.parameters")
            if not isinstance(params, dict):
                raise ParameterError(f"{p}.function.parameters", f"{p}.function.parameters must be an object schema")
        out.append({"type": "function", "function": {**fn, **({"parameters": params} if params is not None else {})}})
    return out


def _named_choice(choice: dict, tools: list[dict]) -> str:
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise ParameterError("tool_choice", "a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
    if not any(t["function"]["name"] == name for t in tools):
        raise ParameterError("tool_choice", f"tool_choice names the function {name!r}, which is not in 'tools'")
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
    templates write `arguments | tojson`), checked; `tool` messages keep their `tool_call_id`."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise ParameterError(f"messages.{i}.tool_calls", f"messages.{i}.tool_calls must be a list")
            m = {**m, "tool_calls": [_template_call(c, f"messages.{i}.tool_calls.{j}") for j, c in enumerate(calls)]}
        elif m["role"] == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise ParameterError(f"messages.{i}.tool_call_id", f"messages.{i}.tool_call_id must be a string")
        out.append(m)
    return out


def _template_call(c: Any, p: str) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ParameterError(p, f"{p} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ParameterError(f"{p}.function.arguments", f"{p}.function.arguments is not valid JSON") from None
    return {**c, "type": c.get("type", "function"), "function": {**fn, "arguments": args}}
