"""The router process: an aiohttp server in front of the fleet, speaking the OpenAI API.

Endpoints
  POST /v1/completions, /v1/chat/completions   routed, retried, streams survive replica death
  POST /v1/*                                   other OpenAI endpoints: routed and retried (no stitching)
  GET  /v1/models                              the union of the fleet's models
  GET  /health                                 200 while some replica can take a request, else 503
  GET  /metrics                                Prometheus text: per replica and per region
  POST /register /heartbeat /deregister        replicas joining and leaving (Bearer router key)
  GET  /admin/fleet                            JSON view of the fleet (`strata router status`)

This module holds `Router` (its state, metrics and app wiring) and `run_router`; the behaviour is in the
mixins `Router` is made of: `proxy` (the routed endpoints), `admin` (the endpoints answered by the router
itself), `health` (probes, sweeps and scrapes) and `admission` (picking and releasing replicas).
"""
from __future__ import annotations

import asyncio
import random
import time

import aiohttp
from aiohttp import web

from strata import settings
from strata.router.admin import AdminMixin
from strata.router.admission import AdmissionMixin
from strata.router.config import RouterConfig
from strata.router.errors import NoCapacity
from strata.router.health import HealthMixin
from strata.router.metrics import Counter, Gauge, Histogram, registry_of, render
from strata.router.policies import make_policy
from strata.router.proxy import ProxyMixin
from strata.router.registry import BreakerState, Registry

__all__ = ["NoCapacity", "Router", "run_router"]


class Router(ProxyMixin, AdminMixin, HealthMixin, AdmissionMixin):
    """One router: the fleet's registry, the routing policy, the metrics and the aiohttp app."""

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
        self.metrics_registry = registry_of([
            self.m_requests, self.m_upstream, self.m_latency, self.m_replica_latency, self.m_ttft, self.m_retries,
            self.m_failovers, self.m_failover_fail, self.m_spills, self.m_rejected, self.m_breaker_opened,
            *self.gauges])

    def metrics_text(self) -> str:
        return render(self.metrics_registry)

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
    if settings.ROUTER_LOOP.get() != "asyncio":
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
