"""OpenAI error envelopes: `{"error": {"message", "type", "param", "code"}}` for every failure.

Every error the server answers goes through `APIError`; nothing a client sends may turn into a 500.
"""
from __future__ import annotations

import json
from typing import Any

# HTTP status -> OpenAI error `type`
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_response(err: APIError):
    from starlette.responses import Response
    return Response(json.dumps(err.body()), status_code=err.status, media_type="application/json",
                    headers=err.headers)


def from_exception(e: BaseException) -> APIError:
    """Map an exception from validation or the engine to the error a client sees."""
    from strata.core.errors import EngineDeadError
    from strata.core.sampling_params import ParameterError
    from strata.engine.async_llm import EngineDrainingError

    if isinstance(e, APIError):
        return e
    if isinstance(e, ParameterError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, EngineDrainingError):
        return APIError(503, str(e), code="server_shutting_down", headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e) or "the engine is dead", code="engine_dead")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
