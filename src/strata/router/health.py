"""Watching the fleet in the background: active /health probes (which mark replicas down and up again),
dropping replicas whose heartbeats stopped or that stay unreachable, and scraping the replicas' /metrics
for the load-aware policies."""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from strata.router.errors import CONN_ERRORS
from strata.router.metrics import parse_prometheus, replica_value
from strata.router.registry import Replica
from strata.router.stream import loads

log = logging.getLogger("strata.router")


class HealthMixin:
    """Part of `Router`: the probe, sweep and scrape loops that `_on_startup` starts."""

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
