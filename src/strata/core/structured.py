"""OpenAI `response_format` -> `StructuredOutputsParams` (pure; the server and batch rows both use it).

    {"type": "text"}                                          -> None (unconstrained)
    {"type": "json_object"}                                   -> json_object=True
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}  -> json=schema

A malformed `response_format` raises `StructuredOutputError` with param "response_format".
"""
from __future__ import annotations

from typing import Any

from strata.core.errors import StructuredOutputError
from strata.core.sampling_params import StructuredOutputsParams


def params_from_response_format(rf: Any) -> StructuredOutputsParams | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise StructuredOutputError("response_format", "response_format must be an object")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise StructuredOutputError("response_format", "response_format.json_schema must be an object "
                                        "with a 'schema'")
        # OpenAI's field is `schema`; some clients send `json_schema.json_schema` or an inline schema.
        schema = js.get("schema", js.get("json_schema"))
        if schema is None:
            schema = {k: v for k, v in js.items() if k not in ("name", "description", "strict")} or None
        if not isinstance(schema, dict):
            raise StructuredOutputError("response_format", "response_format.json_schema.schema must be a "
                                        "JSON schema object")
        try:
            return StructuredOutputsParams(json=schema)
        except StructuredOutputError as e:
            raise StructuredOutputError("response_format", f"response_format: {e}") from None
    raise StructuredOutputError("response_format", f"response_format type {kind!r} is not supported "
                                "(text, json_object, json_schema)")


__all__ = ["params_from_response_format"]
