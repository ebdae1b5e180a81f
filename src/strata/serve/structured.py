"""The output constraint a request asks for, checked and turned into `StructuredOutputsParams`.

Three spellings, one constraint per request:
- OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- vLLM's `structured_outputs`: `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}` plus its options;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
Two of them at once, a malformed value or a schema that is not a valid JSON schema is a 400 naming the field
(the value checks are the core's `check_spec` / `check_json_schema`, which `StructuredOutputsParams` uses too).
Tool calling adds its own constraint (see serve/tools.py) through `make`. The engine checks the grammar
itself when it takes the request (`StructuredOutputError`, a 400 renamed to the request's field).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from strata.core.sampling_params import ParameterError, check_json_schema, check_spec

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def request_constraint(r: Any) -> tuple[Any, str | None]:
    """(StructuredOutputsParams, the request field it came from), or (None, None)."""
    found: list[tuple[str, Any]] = []
    rf = r.response_format
    if rf is not None and rf.get("type", "text") != "text":
        found.append(("response_format", _from_response_format(rf)))
    if r.structured_outputs is not None:
        found.append(("structured_outputs", _from_structured_outputs(r.structured_outputs)))
    for field, kind in GUIDED.items():
        value = getattr(r, field, None)
        if value is not None:
            found.append((field, make({kind: check_value(kind, value, field)}, field)))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise ParameterError(found[1][0], f"only one output constraint may be given per request, got {names}")
    return found[0][1], found[0][0]


def make(kwargs: dict, param: str):
    """StructuredOutputsParams(**kwargs); its errors name `param` (the request field)."""
    from strata.core.errors import StructuredOutputError
    from strata.core.sampling_params import StructuredOutputsParams
    known = {f.name for f in dataclasses.fields(StructuredOutputsParams)}
    for k in kwargs:
        if k not in known:
            raise ParameterError(f"{param}.{k}", f"{param}.{k} is not supported by this server")
    try:
        return StructuredOutputsParams(**kwargs)
    except StructuredOutputError as e:
        raise ParameterError(rename_param(e.param, param), str(e)) from None


def rename_param(engine_param: str | None, param: str) -> str:
    """The engine names a constraint's fields "structured_outputs[.kind]"; the request may have used another."""
    if param == "structured_outputs" and engine_param:
        return engine_param
    return param


def constraint_field(r: Any) -> str | None:
    """The request field that asks for a constraint (already checked: there is at most one)."""
    rf = r.response_format
    if rf is not None and rf.get("type", "text") != "text":
        return "response_format"
    if r.structured_outputs is not None:
        return "structured_outputs"
    return next((f for f in GUIDED if getattr(r, f, None) is not None), None)


def rename_error(e: Exception, field: str | None) -> Exception:
    """An engine error about the constraint (param "structured_outputs.*") renamed to the request's field."""
    param = getattr(e, "param", None)
    if field and getattr(e, "status", 400) == 400 and isinstance(param, str) and param.startswith("structured_outputs"):
        e.param = rename_param(param, field)
    return e


def _from_response_format(rf: dict):
    from strata.core.structured import params_from_response_format
    so = params_from_response_format(rf)
    if so is not None and so.json is not None:
        check_json_schema(so.json, "response_format")
    return so


def _from_structured_outputs(so: dict):
    """vLLM's object: StructuredOutputsParams checks that exactly one kind is set and each value's shape (its
    errors name "structured_outputs[.kind]"); a JSON schema is also checked against its meta-schema."""
    params = make({k: v for k, v in so.items() if v is not None}, "structured_outputs")
    if params.json is not None:
        check_json_schema(params.json, "structured_outputs.json")
    return params


def check_value(kind: str, value: Any, param: str) -> Any:
    """A constraint's value given in the request field `param`, checked and normalised by the core (whose
    errors name `param`); JSON schemas also against their meta-schema."""
    return check_json_schema(value, param) if kind == "json" else check_spec(kind, value, param)
