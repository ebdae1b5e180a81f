"""Pure-ASGI guards in front of every route: API keys, body size, draining.

- `/v1/*`, `/tokenize` and `/detokenize` need `Authorization: Bearer <key>` when keys are configured; the
  key is compared with every configured key in constant time. `/health`, `/metrics`, `/version`, `/ping`
  stay open. CORS preflights pass (the CORS middleware sits outside this one).
- A body larger than the limit is refused with 413, by Content-Length before reading, or while reading a
  chunked body; the body read here is replayed to the app, so nothing is read twice (file uploads are not
  read here: they are counted as the app streams them to disk).
- While draining, new API requests get 503 (health/metrics still answer).
"""
from __future__ import annotations

import hmac
import json

from strata.serve.errors import APIError

_OPEN = ("/health", "/metrics", "/version", "/ping")
_GUARDED_EXTRA = ("/tokenize", "/detokenize")


def _guarded(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1" or path in _GUARDED_EXTRA


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardMiddleware:
    def __init__(self, app, *, state):
        self.app = app
        self.state = state
        self._keys = [k.encode() for k in state.args.api_key]

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if not self._keys:
            return True
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if not given:
            given = headers.get(b"x-api-key", b"").strip()
        ok = False
        for k in self._keys:  # every key is compared: the time does not say which one matched
            ok |= hmac.compare_digest(given, k)
        return ok and bool(given)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        headers = dict(scope.get("headers") or [])
        if _guarded(path) and method != "OPTIONS":
            if not self._authorized(headers):
                return await _send_error(send, APIError(401, "Invalid or missing API key. Send it as "
                                                             "'Authorization: Bearer <key>'.",
                                                        code="invalid_api_key",
                                                        headers={"WWW-Authenticate": "Bearer"}))
            if self.state.draining and method != "GET":
                self.state.metrics.on_rejected("draining")
                return await _send_error(send, APIError(503, "The server is shutting down and takes no new "
                                                             "requests.", code="server_shutting_down",
                                                        headers={"Retry-After": "1"}))
        if method in ("POST", "PUT", "PATCH"):
            limit = (self.state.args.max_file_bytes if path == "/v1/files"
                     else self.state.args.max_request_bytes)
            cl = headers.get(b"content-length")
            if cl is not None:
                try:
                    if int(cl) > limit:
                        return await _send_error(send, _too_large(limit))
                except ValueError:
                    return await _send_error(send, APIError(400, "invalid Content-Length header"))
            if path == "/v1/files":  # uploads stream to disk: counted as they pass, never held whole
                return await self.app(scope, _bounded(receive, limit), send)
            # read the whole body here (bounded), then replay it
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await _send_error(send, _too_large(limit))
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def _bounded(receive, limit: int):
    """`receive` that raises 413 (answered by the app's error handler) once the body passes `limit`."""
    size = 0

    async def bounded():
        nonlocal size
        msg = await receive()
        size += len(msg.get("body", b""))
        if size > limit:
            raise _too_large(limit)
        return msg
    return bounded


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} bytes).",
                    code="request_too_large")
