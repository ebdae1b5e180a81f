"""Batch rows under structured outputs: each finished output is checked against its spec (JSON parsed and
validated with jsonschema, regex fully matched, choice one of the choices); one that fails (typically cut by
max_tokens before the grammar's end) makes its row an error row with the reason, which `--retry-errors` redoes.
The row keeps the text the model produced."""
from __future__ import annotations

import json
import re
from typing import Any

from strata.core.sampling_params import StructuredOutputsParams


def output_error(so: StructuredOutputsParams, text: str, finish_reason: str | None) -> str | None:
    """Why `text` does not satisfy `so`, or None when it does."""
    cut = " (cut by max_tokens: raise --max-tokens)" if finish_reason == "length" else ""
    kind = so.kind
    if kind in ("json", "json_object"):
        try:
            obj = json.loads(text)
        except ValueError as e:
            return f"output is not valid JSON{cut}: {e}"
        if kind == "json_object":
            return None if isinstance(obj, dict) else f"output is JSON but not an object{cut}"
        try:
            import jsonschema
        except ImportError:  # pragma: no cover - strata[structured] installs it
            return None
        try:
            jsonschema.validate(obj, so.json)
        except jsonschema.ValidationError as e:
            return f"output does not match the JSON schema{cut}: {e.message}"
        except jsonschema.SchemaError:
            return None  # the grammar engine took the schema; jsonschema cannot judge it
        return None
    if kind == "regex":
        try:
            ok = re.fullmatch(so.regex, text, flags=re.DOTALL) is not None
        except re.error:  # a pattern only the grammar engine reads: judge by how the output ended
            ok = finish_reason == "stop"
        return None if ok else f"output does not match the regex{cut}"
    if kind == "choice":
        return None if text in so.choice else f"output is not one of the choices{cut}"
    return None if finish_reason == "stop" else f"output did not reach the end of the grammar{cut}"


def check_row(row: dict, params: Any, out: Any) -> dict:
    """Mark `row` (a finished request's row) an error row when an output breaks its structured-output spec."""
    so = getattr(params, "structured_outputs", None)
    if so is None or row.get("error") is not None:
        return row
    resp = row.get("response")
    if isinstance(resp, dict) and resp.get("status_code") != 200:
        return row
    for c in out.outputs:
        why = output_error(so, c.text, c.finish_reason)
        if why is not None:
            if len(out.outputs) > 1:
                why = f"sample {c.index}: {why}"
            row["error"] = ({"code": "invalid_output", "message": why} if resp is not None
                            else {"type": "invalid_output", "message": why})
            break
    return row
