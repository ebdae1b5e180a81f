"""What the router's modules share: the OpenAI-style error response, the exceptions that mean a replica
could not be reached, and `NoCapacity` (no replica could take a request in time)."""
from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from strata.router.stream import dumps

CONN_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class NoCapacity(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=dumps({"error": {"message": message, "type": type_,
                                                              "param": param, "code": status}}),
                        content_type="application/json", headers=headers)
