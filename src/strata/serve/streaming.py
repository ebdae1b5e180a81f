"""Streaming plumbing: an SSE response that aborts its generation when the client disconnects, the same
for non-streaming requests, and merging several request streams into one."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable

from starlette.responses import Response

try:  # faster, and identical output for our payloads
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """Streams `body` (bytes chunks). If the client goes away first, the producing generator is cancelled,
    so its `finally` blocks (which abort the engine requests) run at once, not at the next token."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        h = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        h.update(headers or {})
        self.init_headers(h)

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_t = asyncio.create_task(pump())
        watch_t = asyncio.create_task(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump_t, watch_t}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (pump_t, watch_t):
                if not t.done():
                    t.cancel()
            await asyncio.gather(pump_t, watch_t, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001
                    pass
        if pump_t in done and not pump_t.cancelled() and pump_t.exception() is not None:
            exc = pump_t.exception()
            if not isinstance(exc, OSError):
                raise exc


async def run_or_disconnect(receive, coro: Awaitable) -> Any:
    """Await `coro`, cancelling it (and raising ClientDisconnected) if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    if task in done:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Yield (index, item) from several async iterators as items arrive. Exceptions propagate; closing the
    merged iterator closes the inputs."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def drain(i: int, it: AsyncIterator) -> None:
        try:
            async for item in it:
                await q.put((i, item, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await q.put((i, None, e))
            return
        await q.put((i, end, None))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        left = len(tasks)
        while left:
            i, item, err = await q.get()
            if err is not None:
                if isinstance(err, asyncio.CancelledError):
                    raise err
                raise err
            if item is end:
                left -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
