"""Proxying the OpenAI API to the replicas: request checks, retries before the first byte (a 429 waits in
the router's queue), and streams that continue on another replica when theirs dies mid-way (the
stitching itself is in `stream.py`)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time

import aiohttp
from aiohttp import web

from strata.router.admission import FAIL, NEUTRAL, OK
from strata.router.errors import CONN_ERRORS, NoCapacity, _error
from strata.router.policies import RouteContext
from strata.router.registry import Replica
from strata.router.stream import DONE, StreamState, Upstream, UpstreamError, dumps, error_event, loads, sse

log = logging.getLogger("strata.router")

RETRY_STATUSES = frozenset({500, 502, 503, 504})
OVERLOAD_STATUSES = frozenset({429})
FORWARD_HEADERS = ("authorization", "x-request-id", "traceparent", "tracestate", "openai-organization")


def _prefix_text(kind: str | None, body: dict) -> str:
    if kind == "completions":
        p = body.get("prompt")
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p:
            if isinstance(p[0], str):
                return p[0]
            return ",".join(map(str, p if isinstance(p[0], int) else p[0]))
        return ""
    if kind == "chat":
        parts = []
        for m in body.get("messages") or []:
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, list):
                c = "".join(x.get("text", "") for x in c if isinstance(x, dict))
            parts.append(f"<{m.get('role')}>{c or ''}\n")
        return "".join(parts)
    return ""


class ProxyMixin:
    """Part of `Router`: the handlers of the proxied endpoints (/v1/completions, /v1/chat/completions and
    the other POST /v1/*)."""

    def _unavailable(self, e: NoCapacity) -> web.Response:
        ra = max(1, int(math.ceil(self.cfg.retry_after_s)))
        return _error(503, str(e), type_="service_unavailable", headers={"Retry-After": str(ra)})

    def _check_api_key(self, request: web.Request) -> web.Response | None:
        if not self.cfg.api_key:
            return None
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.cfg.api_key}".encode()):
            return _error(401, "invalid or missing API key", type_="authentication_error")
        return None

    def _context(self, request: web.Request, kind: str | None, body: dict) -> RouteContext | web.Response:
        region = request.headers.get(self.cfg.region_header)
        if region is not None:
            region = region.strip()
            known = self.registry.known_regions()
            if region not in known:
                return _error(400, f"unknown region {region!r} in header {self.cfg.region_header}; known "
                                   f"regions: {', '.join(sorted(known))}", param=self.cfg.region_header)
        else:
            region = self.cfg.region
        session = request.headers.get(self.cfg.session_header) or body.get("user")
        model = body.get("model")
        return RouteContext(model=model if isinstance(model, str) else None,
                            prefix_text=_prefix_text(kind, body),
                            session_key=str(session) if session else None, client_region=region)

    def _forward_headers(self, request: web.Request) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        for k in FORWARD_HEADERS:
            v = request.headers.get(k)
            if v is not None:
                h[k] = v
        return h

    async def h_completions(self, request):
        return await self._handle(request, "completions", "/v1/completions")

    async def h_chat(self, request):
        return await self._handle(request, "chat", "/v1/chat/completions")

    async def h_other(self, request):
        return await self._handle(request, None, "/v1/" + request.match_info["tail"])

    async def _handle(self, request: web.Request, kind: str | None, path: str):
        t0 = time.perf_counter()
        bad = self._check_api_key(request)
        if bad is not None:
            return bad
        raw = await request.read()
        try:
            body = loads(raw) if raw else {}
        except ValueError as e:
            return _error(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        ctx = self._context(request, kind, body)
        if isinstance(ctx, web.Response):
            self.m_requests.inc("unknown", "", "400")
            return ctx
        if ctx.model and len(self.registry) and not self.registry.any_serves(ctx.model):
            models = sorted({m for r in self.registry for m in r.model_ids()})
            return _error(404, f"The model `{ctx.model}` does not exist. Models in the fleet: "
                               f"{', '.join(models) or '(none known yet)'}", type_="NotFoundError", param="model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            return _error(400, "'stream' must be true or false", param="stream")
        headers = self._forward_headers(request)
        if stream:
            resp = await self._stream(request, kind, path, body, raw, ctx, headers, t0)
        else:
            resp = await self._unary(kind, path, raw, ctx, headers, t0)
        return resp

    def _account(self, ctx: RouteContext, r: Replica | None, status: int, t0: float) -> None:
        served = r.region if r is not None else ""
        self.m_requests.inc(ctx.client_region or "", served, str(status))
        if r is not None and status < 400:
            self.m_latency.observe(served, value=time.perf_counter() - t0)
            if served != ctx.client_region:
                self.m_spills.inc(ctx.client_region or "", served)

    async def _unary(self, kind, path, raw: bytes, ctx: RouteContext, headers, t0) -> web.Response:
        tried: list[Replica] = []
        last: web.Response | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.queue_timeout_s
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, sock_connect=self.cfg.connect_timeout_s)
        attempt = 0
        while True:
            try:
                r = await self.acquire(ctx, tried, deadline)
            except NoCapacity as e:
                self._account(ctx, None, 503, t0)
                return last if last is not None and e.reason == "queue_timeout" and tried else self._unavailable(e)
            ts = time.perf_counter()
            try:
                async with self.session.post(r.url + path, data=raw, headers=headers, timeout=timeout) as up:
                    data = await up.read()
                    status = up.status
                    ctype = up.headers.get("Content-Type", "application/json")
            except CONN_ERRORS as e:
                refused = isinstance(e, aiohttp.ClientConnectorError)
                self.release(r, FAIL, conn_refused=refused)
                self.m_upstream.inc(r.name, r.region, "error")
                last = _error(502, f"replica {r.name} failed: {type(e).__name__}: {e}", type_="bad_gateway")
            else:
                if status in OVERLOAD_STATUSES:      # full: wait for it (or another) in the router's queue
                    self._overloaded(r, up.headers)
                    last = web.Response(status=status, body=data, headers={"Content-Type": ctype})
                    continue
                if status in RETRY_STATUSES:
                    self.release(r, FAIL)
                    self.m_upstream.inc(r.name, r.region, "error")
                    last = web.Response(status=status, body=data, headers={"Content-Type": ctype})
                else:
                    self.release(r, OK if status < 400 or status in (400, 404, 422) else NEUTRAL)
                    self.m_upstream.inc(r.name, r.region, "ok" if status < 400 else "client_error")
                    if status < 400:
                        self.m_replica_latency.observe(r.name, r.region, value=time.perf_counter() - ts)
                    self._account(ctx, r, status, t0)
                    return web.Response(status=status, body=data, headers={
                        "Content-Type": ctype, "x-strata-replica": r.name, "x-strata-region": r.region})
            tried.append(r)
            attempt += 1
            if attempt >= self.cfg.max_attempts:
                break
            self.m_retries.inc(r.name, r.region)
            await asyncio.sleep(self._backoff(attempt))
        self._account(ctx, None, last.status, t0)
        return last

    def _overloaded(self, r: Replica, headers) -> None:
        """A replica answered 429 (its own queue is full): leave it alone for Retry-After (at most 2 s)."""
        try:
            wait = float(headers.get("Retry-After", "0.25"))
        except ValueError:
            wait = 0.25
        r.busy_until = time.monotonic() + min(max(wait, 0.05), 2.0)
        self.release(r, NEUTRAL)
        self.m_upstream.inc(r.name, r.region, "overloaded")

    async def _open_stream(self, ctx, path, data: bytes, headers, tried: list[Replica], deadline,
                           attempts: int):
        """Connect a streaming request and read its first event, retrying across replicas. Nothing has been
        sent to the client for this segment yet. Returns (replica, upstream, first payload) or a Response."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s,
                                        sock_read=self.cfg.stream_idle_timeout_s)
        last: web.Response | None = None
        attempt = 0
        while True:
            try:
                r = await self.acquire(ctx, tried, deadline)
            except NoCapacity as e:
                return last if last is not None and e.reason == "queue_timeout" and tried else self._unavailable(e)
            up = None
            try:
                up = await self.session.post(r.url + path, data=data, headers=headers, timeout=timeout)
                if up.status != 200:
                    body = await up.read()
                    ctype = up.headers.get("Content-Type", "application/json")
                    up.release()
                    resp = web.Response(status=up.status, body=body, headers={"Content-Type": ctype})
                    if up.status in OVERLOAD_STATUSES:
                        self._overloaded(r, up.headers)
                        last = resp
                        continue
                    if up.status in RETRY_STATUSES:
                        self.release(r, FAIL)
                        self.m_upstream.inc(r.name, r.region, "error")
                        last = resp
                    else:
                        self.release(r, OK if up.status in (400, 404, 422) else NEUTRAL)
                        self.m_upstream.inc(r.name, r.region, "client_error")
                        resp.headers["x-strata-replica"] = r.name
                        return resp
                else:
                    u = Upstream(up)
                    first = await u.next()
                    if first is None:
                        raise UpstreamError("stream ended before its first event")
                    return r, u, first
            except (UpstreamError, *CONN_ERRORS) as e:
                if up is not None:
                    up.close()
                self.release(r, FAIL, conn_refused=isinstance(e, aiohttp.ClientConnectorError))
                self.m_upstream.inc(r.name, r.region, "error")
                last = _error(502, f"replica {r.name} failed: {type(e).__name__}: {e}", type_="bad_gateway")
            tried.append(r)
            attempt += 1
            if attempt >= attempts:
                return last
            self.m_retries.inc(r.name, r.region)
            await asyncio.sleep(self._backoff(attempt))

    async def _stream(self, request, kind, path, body: dict, raw: bytes, ctx: RouteContext, headers, t0):
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        state = StreamState(kind, body)
        tried: list[Replica] = []
        data = dumps(state.upstream_body()) if state.inject_usage else raw
        opened = await self._open_stream(ctx, path, data, headers, tried, loop.time() + cfg.queue_timeout_s,
                                         cfg.max_attempts)
        if isinstance(opened, web.Response):
            self._account(ctx, None, opened.status, t0)
            return opened
        r, up, payload = opened
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "x-strata-replica": r.name, "x-strata-region": r.region})
        try:
            await resp.prepare(request)
        except ConnectionError:
            up.close()
            self.release(r, NEUTRAL)
            return resp
        self.m_ttft.observe(r.region, value=time.perf_counter() - t0)
        served_first = r
        seg_start = time.perf_counter()
        held = True
        try:
            while True:
                # ---- pump one segment
                failure: str | None = None
                done = False
                try:
                    while payload is not None:
                        if payload == DONE:
                            done = True
                            break
                        out = state.process(payload)
                        if out is not None:
                            await _write(resp, out)
                        payload = await up.next()
                    if not done and not state.finished:
                        failure = "stream ended without [DONE]"
                except UpstreamError as e:
                    failure = str(e)
                except CONN_ERRORS as e:
                    failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                up.close()
                if failure is None or state.finished:
                    held = False
                    self.release(r, OK)
                    self.m_upstream.inc(r.name, r.region, "ok")
                    self.m_replica_latency.observe(r.name, r.region, value=time.perf_counter() - seg_start)
                    await _write(resp, sse(DONE))
                    self._account(ctx, served_first, 200, t0)
                    break
                # ---- the replica failed mid-stream
                held = False
                self.release(r, FAIL, conn_refused=True)
                self.m_upstream.inc(r.name, r.region, "error")
                self.m_failovers.inc(r.name, r.region)
                log.warning("stream from %s failed after %d tokens (%s)", r.url, state.tokens, failure)
                if not state.can_failover or state.failovers >= cfg.max_failovers:
                    reason = state.why_not or "too many failovers"
                    self.m_failover_fail.inc(reason)
                    await _write(resp, error_event(f"replica {r.name} failed mid-stream ({failure}) and the "
                                                   f"stream cannot be continued: {reason}"))
                    await _write(resp, sse(DONE))
                    self._account(ctx, served_first, 502, t0)
                    break
                try:
                    cont = state.continuation()
                except UpstreamError as e:
                    self.m_failover_fail.inc("not resumable")
                    await _write(resp, error_event(str(e)))
                    await _write(resp, sse(DONE))
                    self._account(ctx, served_first, 502, t0)
                    break
                if cont is None:     # token budget already spent: close it ourselves
                    await _write(resp, state.final_chunk("length"))
                    await _write(resp, sse(DONE))
                    self._account(ctx, served_first, 200, t0)
                    break
                tried.append(r)
                state.begin_segment()
                opened = await self._open_stream(ctx, path, dumps(state.upstream_body(cont)), headers, tried,
                                                 loop.time() + cfg.queue_timeout_s, cfg.max_attempts)
                if isinstance(opened, web.Response):
                    self.m_failover_fail.inc("no replica")
                    msg = opened.text if opened.body is not None else ""
                    await _write(resp, error_event(f"stream could not be continued on another replica "
                                                   f"(HTTP {opened.status}): {msg}"[:2000]))
                    await _write(resp, sse(DONE))
                    self._account(ctx, served_first, 502, t0)
                    break
                r, up, payload = opened
                held = True
                seg_start = time.perf_counter()
        except (_ClientGone, asyncio.CancelledError) as e:
            up.close()
            if held:
                self.release(r, NEUTRAL)
            self._account(ctx, served_first, 499, t0)
            if isinstance(e, asyncio.CancelledError):
                raise
        return resp


class _ClientGone(Exception):
    pass


async def _write(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
    except ConnectionError as e:
        raise _ClientGone() from e
