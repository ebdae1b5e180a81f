"""The endpoints the router answers itself: /v1/models, /health, /metrics, replicas registering,
heartbeating and deregistering, and /admin/fleet."""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from typing import Any

from aiohttp import web

from strata.router.errors import _error
from strata.router.registry import RegistryError
from strata.router.stream import dumps, loads

log = logging.getLogger("strata.router")


class AdminMixin:
    """Part of `Router`: the fleet-info and registration handlers (`h_models` checks the API key as the
    proxied endpoints do)."""

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

