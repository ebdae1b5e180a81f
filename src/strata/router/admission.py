"""Admission: picking a replica for a request, waiting in the router's queue while none can take one, and
releasing it with the outcome that feeds its circuit breaker."""
from __future__ import annotations

import asyncio
import logging
import time

from strata.router.errors import NoCapacity
from strata.router.policies import RouteContext
from strata.router.registry import BreakerState, Replica

log = logging.getLogger("strata.router")

OK, FAIL, NEUTRAL = "ok", "fail", "neutral"


class AdmissionMixin:
    """Part of `Router`: uses its `cfg`, `registry`, `policy`, `rng`, `waiting`, `_event` and metrics."""

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
