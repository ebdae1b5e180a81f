"""The fleet: replicas (static or self-registered), their live load, health and circuit breakers."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from strata.router.config import ReplicaSpec, RouterConfig, normalize_url, ConfigError


class RegistryError(ValueError):
    """A registration the router refuses (HTTP status in `.status`)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker. CLOSED -> (threshold failures) -> OPEN for `open_s` -> HALF_OPEN: one
    trial request; success closes it, failure re-opens it with the open time doubled (up to `open_max_s`)."""

    def __init__(self, failure_threshold: int = 3, open_s: float = 5.0, open_max_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.base_open_s = open_s
        self.open_max_s = max(open_max_s, open_s)
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.current_open_s = open_s
        self.open_until = 0.0
        self.trial_in_flight = False
        self.times_opened = 0

    def available(self) -> bool:
        """May a request be sent now? (does not change state)"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return self.clock() >= self.open_until
        return not self.trial_in_flight

    def acquire(self) -> bool:
        """Called when a request is actually sent. Returns True when it is the half-open trial."""
        if self.state is BreakerState.OPEN and self.clock() >= self.open_until:
            self.state = BreakerState.HALF_OPEN
            self.trial_in_flight = False
        if self.state is BreakerState.HALF_OPEN:
            self.trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.consecutive_failures = 0
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
            self.current_open_s = self.base_open_s
        self.trial_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self.current_open_s = min(self.current_open_s * 2, self.open_max_s)
            self._open()
        elif self.state is BreakerState.CLOSED and self.consecutive_failures >= self.failure_threshold:
            self._open()
        self.trial_in_flight = False

    def release(self) -> None:
        """The request ended without telling anything about the replica (client error, client gone)."""
        self.trial_in_flight = False

    def half_open_now(self) -> None:
        """An active probe says the replica is back: let a trial through without waiting out the timer."""
        if self.state is BreakerState.OPEN:
            self.open_until = self.clock()

    def reset(self) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.current_open_s = self.base_open_s
        self.trial_in_flight = False

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self.open_until = self.clock() + self.current_open_s
        self.times_opened += 1


@dataclass(eq=False)
class Replica:
    url: str
    region: str
    weight: float = 1.0
    model: str | None = None
    static: bool = True
    max_outstanding: int = 0
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool = True
    draining: bool = False
    outstanding: int = 0
    # replica-reported (scraped from its /metrics)
    rep_running: float = 0.0
    rep_waiting: float = 0.0
    rep_kv_usage: float = 0.0
    rep_prefix_queries: float = 0.0
    rep_prefix_hits: float = 0.0
    metrics_at: float = 0.0
    models: list[dict] = field(default_factory=list)   # /v1/models "data" entries, when fetched
    probe_rtt_ms: float | None = None
    probe_failures: int = 0
    busy_until: float = 0.0         # answered 429: not sent new work before this (monotonic)
    registered_at: float = field(default_factory=time.monotonic)
    last_heartbeat: float | None = None
    down_since: float | None = None
    # router-side counters
    requests_total: int = 0
    failures_total: int = 0
    generation: int = 0             # bumps on each (re-)registration

    @property
    def name(self) -> str:
        return self.url.split("://", 1)[-1]

    def load(self) -> float:
        """Outstanding requests at the router plus the replica's own queue, per unit of weight."""
        return (self.outstanding + self.rep_waiting) / self.weight

    def saturated(self, cfg: RouterConfig) -> bool:
        limit = self.max_outstanding or cfg.max_outstanding_per_replica
        if limit and self.outstanding >= limit:
            return True
        if cfg.saturation_waiting and self.rep_waiting >= cfg.saturation_waiting:
            return True
        if self.busy_until and time.monotonic() < self.busy_until:
            return True
        return False

    def routable(self) -> bool:
        return self.healthy and not self.draining and self.breaker.available()

    def serves(self, model: str | None) -> bool:
        if not model:
            return True
        if self.model is None and not self.models:
            return True   # unknown yet: assume it does
        if self.model == model:
            return True
        return any(m.get("id") == model for m in self.models)

    def model_ids(self) -> list[str]:
        ids = [m.get("id") for m in self.models if m.get("id")]
        if self.model and self.model not in ids:
            ids.insert(0, self.model)
        return ids


class Registry:
    """All replicas by URL. Static replicas come from the config; registered ones join and leave at run time."""

    def __init__(self, cfg: RouterConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self.listeners: list[Callable[[], None]] = []

    def __iter__(self):
        return iter(list(self.replicas.values()))

    def __len__(self) -> int:
        return len(self.replicas)

    def get(self, url: str) -> Replica | None:
        return self.replicas.get(url)

    def _breaker(self) -> CircuitBreaker:
        c = self.cfg
        return CircuitBreaker(c.failure_threshold, c.open_s, c.open_max_s, clock=self.clock)

    def known_regions(self) -> set[str]:
        out = self.cfg.known_regions()
        out.update(r.region for r in self.replicas.values())
        return out

    def check_region(self, region: str, what: str = "region") -> None:
        if not isinstance(region, str) or not region:
            raise RegistryError(f"{what}: expected a non-empty region name, got {region!r}")
        if self.cfg.strict_regions() and region not in self.cfg.regions:
            raise RegistryError(f"unknown {what} {region!r}; declared regions: {', '.join(self.cfg.regions)}")

    def add_static(self, spec: ReplicaSpec) -> Replica:
        if spec.url in self.replicas:
            raise RegistryError(f"duplicate replica {spec.url}", 409)
        self.check_region(spec.region)
        r = Replica(url=spec.url, region=spec.region, weight=spec.weight, model=spec.model, static=True,
                    max_outstanding=spec.max_outstanding, breaker=self._breaker())
        self.replicas[r.url] = r
        self._changed()
        return r

    def register(self, url: str, region: str | None, model: str | None = None, weight: float | None = None,
                 max_outstanding: int | None = None) -> tuple[Replica, bool]:
        """Add or refresh a self-registered replica. Returns (replica, created)."""
        try:
            url = normalize_url(url, what="url")
        except ConfigError as e:
            raise RegistryError(str(e)) from None
        region = region or self.cfg.region
        self.check_region(region)
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise RegistryError(f"weight: expected a positive number, got {weight!r}")
        if model is not None and not isinstance(model, str):
            raise RegistryError(f"model: expected a string, got {model!r}")
        existing = self.replicas.get(url)
        now = self.clock()
        if existing is not None:
            if existing.region != region:
                raise RegistryError(f"duplicate replica {url}: already in the fleet in region "
                                    f"{existing.region!r}, not {region!r}; deregister it first", 409)
            # a restarted replica registering again: fresh health, closed breaker
            existing.healthy = True
            existing.draining = False
            existing.down_since = None
            existing.breaker.reset()
            existing.generation += 1
            existing.last_heartbeat = None
            if model:
                existing.model = model
            if weight:
                existing.weight = float(weight)
            self._changed()
            return existing, False
        r = Replica(url=url, region=region, weight=float(weight or 1.0), model=model, static=False,
                    max_outstanding=int(max_outstanding or 0), breaker=self._breaker(), registered_at=now)
        self.replicas[url] = r
        self._changed()
        return r, True

    def heartbeat(self, url: str, load: dict | None = None) -> Replica:
        """A registered replica says it is alive; it may add its load figures (num_requests_running,
        num_requests_waiting, kv_cache_usage_perc), used until the next /metrics scrape."""
        try:
            url = normalize_url(url, what="url")
        except ConfigError as e:
            raise RegistryError(str(e)) from None
        r = self.replicas.get(url)
        if r is None:
            raise RegistryError(f"unknown replica {url}; register first", 404)
        r.last_heartbeat = self.clock()
        for attr, key in (("rep_running", "num_requests_running"), ("rep_waiting", "num_requests_waiting"),
                          ("rep_kv_usage", "kv_cache_usage_perc")):
            v = (load or {}).get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
                setattr(r, attr, float(v))
        if not r.healthy or r.down_since is not None:
            r.healthy = True
            r.down_since = None
            r.breaker.half_open_now()
            self._changed()
        return r

    def deregister(self, url: str) -> Replica:
        """Stop sending new requests; the replica is dropped once its outstanding requests finish."""
        try:
            url = normalize_url(url, what="url")
        except ConfigError as e:
            raise RegistryError(str(e)) from None
        r = self.replicas.get(url)
        if r is None:
            raise RegistryError(f"unknown replica {url}", 404)
        r.draining = True
        if r.outstanding == 0:
            self.remove(url)
        self._changed()
        return r

    def remove(self, url: str) -> None:
        if self.replicas.pop(url, None) is not None:
            self._changed()

    def request_finished(self, r: Replica) -> None:
        if r.draining and r.outstanding == 0 and self.replicas.get(r.url) is r:
            self.remove(r.url)

    def candidates(self, model: str | None, exclude: Iterable[Replica] = ()) -> list[Replica]:
        ex = set(map(id, exclude))
        cfg = self.cfg
        return [r for r in self.replicas.values()
                if id(r) not in ex and r.routable() and r.serves(model) and not r.saturated(cfg)]

    def any_serves(self, model: str | None) -> bool:
        return any(r.serves(model) for r in self.replicas.values() if not r.draining)

    def _changed(self) -> None:
        for fn in self.listeners:
            fn()
