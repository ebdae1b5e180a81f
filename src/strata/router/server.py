"""The router process: an aiohttp server in front of the fleet, speaking the OpenAI API.

Endpoints
  POST /v1/completions, /v1/chat/completions   routed, retried, streams survive replica death
  POST /v1/*                                   other OpenAI endpoints: routed and retried (no stitching)
  GET  /v1/models                              the union of the fleet's models
  GET  /health                                 200 while some replica can take a request, else 503
  GET  /metrics                                Prometheus text: per replica and per region
  POST /register /heartbeat /deregister        replicas joining and leaving (Bearer router key)
  GET  /admin/fleet                            JSON view of the fleet (`strata router status`)
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import random
import time
from typing import Any

import aiohttp
from aiohttp import web

from strata.router.config import RouterConfig
from strata.router.metrics import Counter, Gauge, Histogram, parse_prometheus, render, replica_value
from strata.router.policies import RouteContext, make_policy
from strata.router.registry import BreakerState, Registry, RegistryError, Replica
from strata.router.stream import (DONE, StreamState, Upstream, UpstreamError, dumps, error_event, loads,
                                  sse)

log = logging.getLogger("strata.router")

RETRY_STATUSES = frozenset({500, 502, 503, 504})
OVERLOAD_STATUSES = frozenset({429})
CONN_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
FORWARD_HEADERS = ("authorization", "x-request-id", "traceparent", "tracestate", "openai-organization")

OK, FAIL, NEUTRAL = "ok", "fail", "neutral"


class NoCapacity(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=dumps({"error": {"message": message, "type": type_,
                                                              "param": param, "code": status}}),
                        content_type="application/json", headers=headers)


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


class Router:
    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.registry = Registry(cfg)
        for spec in cfg.replicas:
            self.registry.add_static(spec)
        self.registry.listeners.append(self._notify)
        self.rng = random.Random(cfg.seed)
        self.policy = make_policy(cfg.policy, cfg, self.rng)
        self.waiting = 0
        self._event: asyncio.Event | None = None
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()
        self._init_metrics()
        self.app = self._build_app()

    # ------------------------------------------------------------------------------------------ metrics
    def _init_metrics(self):
        P = "strata_router:"
        self.m_requests = Counter(P + "requests_total", "Client requests by client region, serving region and "
                                  "HTTP status", ("client_region", "served_region", "status"))
        self.m_upstream = Counter(P + "replica_requests_total", "Requests sent to each replica by outcome "
                                  "(ok, error, client_error, overloaded)", ("replica", "region", "outcome"))
        self.m_latency = Histogram(P + "request_latency_seconds", "End-to-end latency at the router",
                                   ("served_region",))
        self.m_replica_latency = Histogram(P + "replica_latency_seconds", "Latency of successful requests per "
                                           "replica", ("replica", "region"))
        self.m_ttft = Histogram(P + "time_to_first_chunk_seconds", "Streams: time to the first chunk",
                                ("served_region",))
        self.m_retries = Counter(P + "retries_total", "Retries before the first byte, by the replica that "
                                 "failed", ("replica", "region"))
        self.m_failovers = Counter(P + "failovers_total", "Mid-stream failovers, by the replica that died",
                                   ("replica", "region"))
        self.m_failover_fail = Counter(P + "failover_failures_total", "Streams that could not be continued",
                                       ("reason",))
        self.m_spills = Counter(P + "spills_total", "Requests served outside the client's region",
                                ("client_region", "served_region"))
        self.m_rejected = Counter(P + "rejected_total", "Requests answered 503 for lack of capacity",
                                  ("reason",))
        self.m_breaker_opened = Counter(P + "breaker_opened_total", "Times a replica's breaker opened",
                                        ("replica", "region"))

        def per_replica(fn):
            return lambda: {(r.name, r.region): fn(r) for r in self.registry}

        def per_region(fn):
            def f():
                out: dict[tuple, float] = {}
                for r in self.registry:
                    out[(r.region,)] = out.get((r.region,), 0) + fn(r)
                return out
            return f

        self.gauges = [
            Gauge(P + "replica_outstanding", "Requests in flight at the router per replica",
                  ("replica", "region"), per_replica(lambda r: r.outstanding)),
            Gauge(P + "replica_healthy", "1 when the active probe passes", ("replica", "region"),
                  per_replica(lambda r: int(r.healthy))),
            Gauge(P + "replica_breaker_state", "0 closed, 1 open, 2 half-open", ("replica", "region"),
                  per_replica(lambda r: {BreakerState.CLOSED: 0, BreakerState.OPEN: 1,
                                         BreakerState.HALF_OPEN: 2}[r.breaker.state])),
            Gauge(P + "replica_num_requests_waiting", "Replica-reported waiting requests", ("replica", "region"),
                  per_replica(lambda r: r.rep_waiting)),
            Gauge(P + "replica_num_requests_running", "Replica-reported running requests", ("replica", "region"),
                  per_replica(lambda r: r.rep_running)),
            Gauge(P + "replica_kv_cache_usage_perc", "Replica-reported KV-cache usage", ("replica", "region"),
                  per_replica(lambda r: r.rep_kv_usage)),
            Gauge(P + "replica_probe_rtt_ms", "Router-measured /health round trip (EWMA)", ("replica", "region"),
                  per_replica(lambda r: -1 if r.probe_rtt_ms is None else round(r.probe_rtt_ms, 3))),
            Gauge(P + "region_replicas", "Replicas per region", ("region",), per_region(lambda r: 1)),
            Gauge(P + "region_routable_replicas", "Replicas per region that can take a request now",
                  ("region",), per_region(lambda r: int(r.routable()))),
            Gauge(P + "region_outstanding", "Requests in flight per region", ("region",),
                  per_region(lambda r: r.outstanding)),
            Gauge(P + "queue_depth", "Requests waiting for a replica", (), lambda: {(): self.waiting}),
        ]

    def metrics_text(self) -> str:
        return render([self.m_requests, self.m_upstream, self.m_latency, self.m_replica_latency, self.m_ttft,
                       self.m_retries, self.m_failovers, self.m_failover_fail, self.m_spills, self.m_rejected,
                       self.m_breaker_opened, *self.gauges])

    # ------------------------------------------------------------------------------------------ app
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.h_completions)
        app.router.add_post("/v1/chat/completions", self.h_chat)
        app.router.add_get("/v1/models", self.h_models)
        app.router.add_post("/v1/{tail:.*}", self.h_other)
        app.router.add_get("/health", self.h_health)
        app.router.add_get("/metrics", self.h_metrics)
        app.router.add_post("/register", self.h_register)
        app.router.add_post("/heartbeat", self.h_heartbeat)
        app.router.add_post("/deregister", self.h_deregister)
        app.router.add_get("/admin/fleet", self.h_fleet)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app):
        self._event = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30,
                                         enable_cleanup_closed=True, ttl_dns_cache=60)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             read_bufsize=1 << 18)
        self._tasks.append(asyncio.create_task(self._health_loop()))
        self._tasks.append(asyncio.create_task(self._metrics_loop()))

    async def _on_cleanup(self, app):
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------------------------------------ admission
    def _notify(self) -> None:
        ev = self._event
        if ev is not None:
            ev.set()
            self._event = asyncio.Event()

    def _pick(self, ctx: RouteContext, exclude: list[Replica]) -> Replica | None:
        cands = self.registry.candidates(ctx.model, exclude)
        if not cands and exclude:
            cands = self.registry.candidates(ctx.model)
        if not cands:
            return None
        r = self.policy.select(ctx, cands)
        if r is None:
            return None
        r.breaker.acquire()
        r.outstanding += 1
        r.requests_total += 1
        self.policy.routed(ctx, r)
        return r

    async def acquire(self, ctx: RouteContext, exclude: list[Replica], deadline: float | None = None) -> Replica:
        r = self._pick(ctx, exclude)
        if r is not None:
            return r
        if self.waiting >= self.cfg.queue_max_size:
            self.m_rejected.inc("queue_full")
            raise NoCapacity("queue_full", f"no replica can take the request and the wait queue is full "
                                           f"({self.cfg.queue_max_size})")
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.cfg.queue_timeout_s
        self.waiting += 1
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.m_rejected.inc("queue_timeout")
                    raise NoCapacity("queue_timeout", f"no replica could take the request within "
                                                      f"{self.cfg.queue_timeout_s:g} s")
                ev = self._event
                try:
                    await asyncio.wait_for(ev.wait(), timeout=min(remaining, 0.2))
                except asyncio.TimeoutError:
                    pass
                r = self._pick(ctx, exclude)
                if r is not None:
                    return r
        finally:
            self.waiting -= 1

    def release(self, r: Replica, outcome: str, *, conn_refused: bool = False) -> None:
        r.outstanding -= 1
        if outcome == OK:
            r.breaker.record_success()
        elif outcome == FAIL:
            r.failures_total += 1
            before = r.breaker.state
            r.breaker.record_failure()
            if r.breaker.state is BreakerState.OPEN and before is not BreakerState.OPEN:
                self.m_breaker_opened.inc(r.name, r.region)
                log.warning("breaker opened for %s (%d consecutive failures)", r.url,
                            r.breaker.consecutive_failures)
            if conn_refused:
                r.healthy = False
                if r.down_since is None:
                    r.down_since = time.monotonic()
        else:
            r.breaker.release()
        self.registry.request_finished(r)
        if self.waiting:
            self._notify()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** (attempt - 1)))
        return self.rng.uniform(cap / 2, cap)     # "equal jitter": never 0, never in lockstep

    def _unavailable(self, e: NoCapacity) -> web.Response:
        ra = max(1, int(math.ceil(self.cfg.retry_after_s)))
        return _error(503, str(e), type_="service_unavailable", headers={"Retry-After": str(ra)})

    # ------------------------------------------------------------------------------------------ routing
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

    # ------------------------------------------------------------------------------------------ fleet info
    async def h_models(self, request):
        bad = self._check_api_key(request)
        if bad is not None:
            return bad
        seen: dict[str, dict] = {}
        for r in self.registry:
            if r.draining:
                continue
            for m in r.models:
                if m.get("id") and m["id"] not in seen:
                    seen[m["id"]] = dict(m)
            if r.model and r.model not in seen:
                seen[r.model] = {"id": r.model, "object": "model", "created": int(self.started_at),
                                 "owned_by": "strata"}
        for mid, m in seen.items():
            m["replicas"] = sum(1 for r in self.registry if mid in r.model_ids() and not r.draining)
            m["regions"] = sorted({r.region for r in self.registry if mid in r.model_ids()})
        return web.Response(body=dumps({"object": "list", "data": list(seen.values())}),
                            content_type="application/json")

    async def h_health(self, request):
        n = sum(1 for r in self.registry if r.routable())
        return web.Response(status=200 if n else 503, body=dumps({"status": "ok" if n else "no replicas",
                                                                   "routable_replicas": n}),
                            content_type="application/json")

    async def h_metrics(self, request):
        return web.Response(text=self.metrics_text(), content_type="text/plain", charset="utf-8")

    def fleet_view(self) -> dict[str, Any]:
        now = time.monotonic()
        reps = []
        for r in sorted(self.registry, key=lambda r: (r.region, r.url)):
            reps.append({
                "url": r.url, "region": r.region, "weight": r.weight, "models": r.model_ids(),
                "static": r.static, "healthy": r.healthy, "draining": r.draining,
                "breaker": r.breaker.state.value, "routable": r.routable(), "outstanding": r.outstanding,
                "replica_running": r.rep_running, "replica_waiting": r.rep_waiting,
                "kv_cache_usage": r.rep_kv_usage,
                "prefix_cache_hit_rate": (r.rep_prefix_hits / r.rep_prefix_queries) if r.rep_prefix_queries else None,
                "probe_rtt_ms": r.probe_rtt_ms, "requests_total": r.requests_total,
                "failures_total": r.failures_total,
                "down_for_s": None if r.down_since is None else round(now - r.down_since, 1),
                "last_heartbeat_s": None if r.last_heartbeat is None else round(now - r.last_heartbeat, 1),
            })
        regions = sorted(self.registry.known_regions())
        return {
            "router_region": self.cfg.region, "policy": self.policy.name,
            "inner_policy": getattr(getattr(self.policy, "inner", None), "name", None),
            "uptime_s": round(time.time() - self.started_at, 1), "queue_depth": self.waiting,
            "regions": {g: {"replicas": sum(1 for r in self.registry if r.region == g),
                            "routable": sum(1 for r in self.registry if r.region == g and r.routable()),
                            "rtt_ms": {h: (None if math.isinf(self.cfg.rtt(g, h)) else self.cfg.rtt(g, h))
                                       for h in regions if h != g}} for g in regions},
            "replicas": reps,
            "totals": {"requests": self.m_requests.total(), "retries": self.m_retries.total(),
                       "failovers": self.m_failovers.total(), "spills": self.m_spills.total(),
                       "rejected": self.m_rejected.total()},
        }

    # ------------------------------------------------------------------------------------------ registration
    def _check_router_key(self, request: web.Request) -> web.Response | None:
        if not self.cfg.router_key:
            return _error(403, "this router accepts no registrations: start it with --router-key (or "
                               "STRATA_ROUTER_KEY) and give replicas the same key", type_="permission_error")
        got = request.headers.get("Authorization")
        if not got:
            return _error(401, "missing 'Authorization: Bearer <router key>'", type_="authentication_error")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.cfg.router_key}".encode()):
            return _error(403, "wrong router key", type_="permission_error")
        return None

    async def _json_body(self, request) -> dict | web.Response:
        try:
            body = loads(await request.read())
        except ValueError as e:
            return _error(400, f"body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        if not isinstance(body.get("url"), str):
            return _error(400, "missing 'url' (the replica's base URL, e.g. http://10.0.0.5:8000)", param="url")
        return body

    async def h_register(self, request):
        body = await self._keyed_json_body(request)
        if isinstance(body, web.Response):
            return body
        region = body.get("region")
        if region is not None and not isinstance(region, str):
            return _error(400, "region must be a string", param="region")
        try:
            r, created = self.registry.register(body["url"], region, body.get("model"), body.get("weight"),
                                                body.get("max_outstanding"))
        except RegistryError as e:
            return _error(e.status, str(e), param="region" if "region" in str(e) else "url")
        log.info("%s replica %s in %s", "registered" if created else "re-registered", r.url, r.region)
        if self.session is not None:
            asyncio.create_task(self._probe(r))
        return web.Response(status=201 if created else 200, body=dumps({
            "url": r.url, "region": r.region, "created": created,
            "heartbeat_interval_s": self.cfg.heartbeat_ttl_s / 3}), content_type="application/json")

    async def _keyed_json_body(self, request):
        """The JSON body of a replica's register/heartbeat/deregister call, or the error response
        (missing or wrong router key, bad body)."""
        bad = self._check_router_key(request)
        if bad is not None:
            return bad
        return await self._json_body(request)

    async def h_heartbeat(self, request):
        body = await self._keyed_json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            r = self.registry.heartbeat(body["url"], body)
        except RegistryError as e:
            return _error(e.status, str(e), param="url")
        return web.Response(body=dumps({"url": r.url, "ok": True}), content_type="application/json")

    async def h_deregister(self, request):
        body = await self._keyed_json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            r = self.registry.deregister(body["url"])
        except RegistryError as e:
            return _error(e.status, str(e), param="url")
        log.info("deregistered %s (%d requests still running)", r.url, r.outstanding)
        return web.Response(body=dumps({"url": r.url, "draining": r.outstanding}), content_type="application/json")

    async def h_fleet(self, request):
        if self.cfg.router_key:
            bad = self._check_router_key(request)
            if bad is not None:
                return bad
        return web.Response(body=dumps(self.fleet_view()), content_type="application/json")

    # ------------------------------------------------------------------------------------------ health
    async def _probe(self, r: Replica) -> None:
        t = aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)
        t0 = time.perf_counter()
        ok = False
        refused = False
        try:
            async with self.session.get(r.url + "/health", timeout=t) as resp:
                await resp.read()
                ok = resp.status == 200
        except aiohttp.ClientConnectorError:
            refused = True
        except CONN_ERRORS:
            pass
        now = time.monotonic()
        if ok:
            rtt = (time.perf_counter() - t0) * 1000.0
            r.probe_rtt_ms = rtt if r.probe_rtt_ms is None else 0.7 * r.probe_rtt_ms + 0.3 * rtt
            r.probe_failures = 0
            if not r.healthy or r.down_since is not None:
                r.healthy = True
                r.down_since = None
                r.breaker.half_open_now()
                log.info("replica %s is healthy again", r.url)
                self._notify()
            if not r.models:
                await self._fetch_models(r)
        else:
            r.probe_failures += 1
            fails = r.probe_failures
            if refused or fails >= 2:
                if r.healthy:
                    log.warning("replica %s failed its health probe", r.url)
                r.healthy = False
                if r.down_since is None:
                    r.down_since = now

    async def _fetch_models(self, r: Replica) -> None:
        try:
            async with self.session.get(r.url + "/v1/models",
                                        timeout=aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)) as resp:
                if resp.status == 200:
                    data = loads(await resp.read())
                    r.models = [m for m in data.get("data", []) if isinstance(m, dict)]
        except (*CONN_ERRORS, ValueError, AttributeError):
            pass

    def _sweep(self) -> None:
        now = time.monotonic()
        for r in self.registry:
            if r.static:
                continue
            # Only replicas that have heartbeated are held to the TTL (registration without heartbeats is
            # allowed); one that dies before its first heartbeat goes after `remove_after_s` unreachable.
            if r.last_heartbeat is not None and now - r.last_heartbeat > self.cfg.heartbeat_ttl_s:
                log.warning("replica %s missed its heartbeats; dropped", r.url)
                r.draining = True
                self.registry.request_finished(r)
            elif r.down_since is not None and now - r.down_since > self.cfg.remove_after_s:
                log.warning("replica %s unreachable for %.0f s; dropped", r.url, now - r.down_since)
                self.registry.remove(r.url)

    async def _health_loop(self):
        while True:
            try:
                reps = list(self.registry)
                if reps:
                    await asyncio.gather(*(self._probe(r) for r in reps), return_exceptions=True)
                self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - never let the loop die
                log.exception("health loop")
            await asyncio.sleep(self.cfg.health_interval_s)

    async def _scrape(self, r: Replica) -> None:
        try:
            async with self.session.get(r.url + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)) as resp:
                if resp.status != 200:
                    return
                parsed = parse_prometheus((await resp.read()).decode("utf-8", "replace"))
        except CONN_ERRORS:
            return
        for attr, key in (("rep_running", "num_requests_running"), ("rep_waiting", "num_requests_waiting"),
                          ("rep_kv_usage", "kv_cache_usage_perc"),
                          ("rep_prefix_queries", "prefix_cache_queries_total"),
                          ("rep_prefix_hits", "prefix_cache_hits_total")):
            v = replica_value(parsed, key)
            if v is None and key.endswith("_total"):
                v = replica_value(parsed, key[:-6])
            if v is not None:
                setattr(r, attr, v)
        r.metrics_at = time.monotonic()

    async def _metrics_loop(self):
        while True:
            try:
                reps = [r for r in self.registry if r.healthy]
                if reps:
                    await asyncio.gather(*(self._scrape(r) for r in reps), return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover
                log.exception("metrics loop")
            await asyncio.sleep(self.cfg.metrics_interval_s)


class _ClientGone(Exception):
    pass


async def _write(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
    except ConnectionError as e:
        raise _ClientGone() from e


def run_router(cfg: RouterConfig, *, print_banner: bool = True) -> None:
    """Run until interrupted."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover
        pass
    loop_name = "asyncio"
    if os.environ.get("STRATA_ROUTER_LOOP", "auto") != "asyncio":
        try:  # optional: uvloop makes the event loop (and so the router's added latency) cheaper
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            loop_name = "uvloop"
        except ImportError:
            pass
    router = Router(cfg)
    if print_banner:
        regions = sorted(router.registry.known_regions())
        print(f"strata router on http://{cfg.host}:{cfg.port}  policy={router.policy.name}  "
              f"region={cfg.region}  replicas={len(router.registry)}  regions={','.join(regions)}  "
              f"registration={'on' if cfg.router_key else 'off (no --router-key)'}  loop={loop_name}", flush=True)
    web.run_app(router.app, host=cfg.host, port=cfg.port, print=None, access_log=None,
                handle_signals=True, backlog=4096, shutdown_timeout=5)
