"""Routing policies behind one interface.

The router hands a policy the replicas that may take a request now (healthy, breaker closed or half-open,
serving the model, not saturated, not already tried for this request); the policy picks one.

    policy.select(ctx, candidates) -> Replica | None
    policy.routed(ctx, replica)          # told after the choice (cache-aware learns prefixes here)
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from strata.router.config import RouterConfig
from strata.router.registry import Replica


@dataclass
class RouteContext:
    model: str | None = None
    prefix_text: str | None = None      # the prompt as text, for cache-aware routing
    session_key: str | None = None      # `user` field or session header, for affinity
    client_region: str | None = None
    served_region: str | None = None    # filled by region-aware: where it went
    spilled: bool = False
    extra: dict = field(default_factory=dict)


class Policy:
    name = "policy"

    def select(self, ctx: RouteContext, candidates: Sequence[Replica]) -> Replica | None:
        raise NotImplementedError

    def routed(self, ctx: RouteContext, replica: Replica) -> None:
        pass


class RoundRobin(Policy):
    """Smooth weighted round robin over whatever is available (plain rotation when weights are equal)."""
    name = "round_robin"

    def __init__(self):
        self.current: dict[str, float] = {}

    def select(self, ctx, candidates):
        if not candidates:
            return None
        total = 0.0
        best = None
        for r in candidates:
            cw = self.current.get(r.url, 0.0) + r.weight
            self.current[r.url] = cw
            total += r.weight
            if best is None or cw > self.current[best.url]:
                best = r
        self.current[best.url] -= total
        if len(self.current) > 4 * len(candidates) + 64:   # forget replicas that left
            live = {r.url for r in candidates}
            self.current = {k: v for k, v in self.current.items() if k in live}
        return best


class LeastOutstanding(Policy):
    """Lowest (outstanding + replica queue) / weight; ties rotate so equal replicas share the work."""
    name = "least_outstanding"

    def __init__(self):
        self.tick = 0

    def select(self, ctx, candidates):
        if not candidates:
            return None
        best_load = math.inf
        best: list[Replica] = []
        for r in candidates:
            load = r.load()
            if load < best_load:
                best_load, best = load, [r]
            elif load == best_load:
                best.append(r)
        self.tick += 1
        return best[self.tick % len(best)]


class PowerOfTwo(Policy):
    """Two random candidates, the less loaded wins: near least-loaded with no herd on one replica."""
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def select(self, ctx, candidates):
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            return candidates[0]
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        return a if a.load() <= b.load() else b


class CacheAware(Policy):
    """Send requests that share a prompt prefix to a replica that already saw that prefix.

    The router keeps an approximate map from prefix-block hashes (every `block_chars` characters, each hash
    chained on the previous one, so a hash names a whole prefix) to the replicas that were sent that prefix,
    bounded LRU. A request goes to the replica holding its deepest known prefix, as long as that replica's
    load is within `balance_abs` requests of the least-loaded candidate (or within `balance_rel` times it);
    otherwise, or with no known prefix, to the least-loaded candidate, which then learns the prefix.
    """
    name = "cache_aware"

    def __init__(self, block_chars: int = 64, balance_abs: float = 16.0, balance_rel: float = 1.5,
                 max_entries: int = 200_000):
        self.block_chars = block_chars
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.max_entries = max_entries
        self.table: OrderedDict[int, dict[str, int]] = OrderedDict()
        self.fallback = LeastOutstanding()
        self.clock = 0
        self.hits = 0          # routed by prefix
        self.misses = 0

    def _hashes(self, text: str) -> list[int]:
        b = self.block_chars
        out = []
        h = 0
        for i in range(0, len(text) - len(text) % b, b):
            h = hash((h, text[i:i + b]))
            out.append(h)
        return out

    def select(self, ctx, candidates):
        if not candidates:
            return None
        text = ctx.prefix_text or ""
        hashes = self._hashes(text)
        ctx.extra["prefix_hashes"] = hashes
        by_url = {r.url: r for r in candidates}
        min_load = min(r.load() for r in candidates)
        limit = max(min_load + self.balance_abs, min_load * self.balance_rel)
        best: Replica | None = None
        for h in hashes:
            owners = self.table.get(h)
            if not owners:
                break
            eligible = [by_url[u] for u in owners if u in by_url and by_url[u].load() <= limit]
            if not eligible:
                break
            # deeper match found; among the holders prefer the least loaded, then the most recent
            best = min(eligible, key=lambda r: (r.load(), -owners[r.url]))
        if best is not None:
            self.hits += 1
            return best
        self.misses += 1
        return self.fallback.select(ctx, candidates)

    def routed(self, ctx, replica):
        hashes = ctx.extra.get("prefix_hashes")
        if hashes is None:
            hashes = self._hashes(ctx.prefix_text or "")
        self.clock += 1
        t = self.table
        for h in hashes:
            owners = t.get(h)
            if owners is None:
                owners = t[h] = {}
            else:
                t.move_to_end(h)
            owners[replica.url] = self.clock
            if len(owners) > 8:   # keep the most recent holders
                del owners[min(owners, key=owners.get)]
        while len(t) > self.max_entries:
            t.popitem(last=False)


def _hrw_score(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest(), "big")


class SessionAffinity(Policy):
    """Same session (the `user` field or a session header) -> same replica, by rendezvous hashing, so only
    the sessions of a replica that leaves move. Requests without a session use the inner policy."""
    name = "session_affinity"

    def __init__(self, inner: Policy):
        self.inner = inner

    def select(self, ctx, candidates):
        if not candidates:
            return None
        if not ctx.session_key:
            return self.inner.select(ctx, candidates)
        key = ctx.session_key
        return max(candidates, key=lambda r: (_hrw_score(key, r.url) * r.weight, r.url))

    def routed(self, ctx, replica):
        self.inner.routed(ctx, replica)


class RegionAware(Policy):
    """Serve from the client's region (its header, or the router's region); when that region has no replica
    that can take the request (down, breaker open, saturated), spill to the nearest region that has one, by
    the RTT matrix (then by the router's measured probe RTT when the matrix has no entry). The inner policy
    picks the replica inside the chosen region."""
    name = "region_aware"

    def __init__(self, cfg: RouterConfig, inner: Policy):
        self.cfg = cfg
        self.inner = inner

    def region_order(self, client_region: str, regions: set[str], candidates: Sequence[Replica]) -> list[str]:
        measured: dict[str, float] = {}
        if client_region == self.cfg.region:
            for r in candidates:
                if r.probe_rtt_ms is not None:
                    measured[r.region] = min(measured.get(r.region, math.inf), r.probe_rtt_ms)
        return sorted(regions, key=lambda g: (self.cfg.rtt(client_region, g), measured.get(g, math.inf), g))

    def select(self, ctx, candidates):
        if not candidates:
            return None
        client = ctx.client_region or self.cfg.region
        groups: dict[str, list[Replica]] = {}
        for r in candidates:
            groups.setdefault(r.region, []).append(r)
        if client in groups:
            region = client
        else:
            region = self.region_order(client, set(groups), candidates)[0]
        ctx.served_region = region
        ctx.spilled = region != client
        return self.inner.select(ctx, groups[region])

    def routed(self, ctx, replica):
        self.inner.routed(ctx, replica)


def make_policy(name: str, cfg: RouterConfig, rng: random.Random | None = None) -> Policy:
    def simple(n: str) -> Policy:
        if n == "round_robin":
            return RoundRobin()
        if n == "least_outstanding":
            return LeastOutstanding()
        if n == "power_of_two":
            return PowerOfTwo(rng)
        if n == "cache_aware":
            return CacheAware(cfg.cache_block_chars, cfg.cache_balance_abs, cfg.cache_balance_rel,
                              cfg.cache_max_entries)
        raise ValueError(f"unknown policy {n!r}")

    if name == "region_aware":
        return RegionAware(cfg, simple(cfg.inner_policy))
    if name == "session_affinity":
        return SessionAffinity(simple(cfg.inner_policy))
    return simple(name)
