"""Global serving, simulated: three regions with their RTTs and a diurnal load, one day, per routing policy —
p50/p99 latency, failures, cross-region share and cost — and what an outage of one region does to each.

The routing decisions are made by the router's own policy classes (strata.router.policies) over the router's
own Replica objects; only the replicas (continuous batching GPUs) and the network are simulated:

* regions us-east (UTC-5), eu-west (UTC+0), ap-south (UTC+5:30); RTT us-eu 75 ms, us-ap 220 ms, eu-ap 130 ms,
  10 ms from a client to its own region;
* demand per region follows the local time of day (night 15 % of peak, peak mid-afternoon), Poisson arrivals;
* a replica runs up to 32 sequences at once; a request costs a 400-token prefill (10k tokens/s) and a
  lognormal number of output tokens (mean ~160) at 15 ms/token, slowing to 30 ms/token at a full batch;
  beyond 32 it waits in the replica's queue; a client gives up after 60 s of waiting;
* the day is compressed into --day-seconds of simulated time (load changes 24h/day-seconds faster than real;
  service times are real); costs are scaled back to a real day;
* prices per GPU-hour (illustrative): us-east $2.50, eu-west $2.80, ap-south $3.10; egress $0.02/GB
  (cross-region only).

Policies (the fleet is sized for each region's own peak at 70 % utilisation unless said otherwise):
  local_only       each region serves only its own clients (independent deployments, geo-DNS)
  round_robin      one global pool, rotation
  least_outstanding  one global pool, fewest outstanding requests
  region_aware     local region first, nearest region by RTT when the local replicas are saturated or down
  region_aware_lean     the same, with a fleet sized for the global peak (peaks are hours apart)
  region_aware_autoscale  the same, each region scaled hourly to its forecast demand (min 1, 5-min start-up)

Mid-stream failover: when a region fails, the router policies resume the in-flight requests elsewhere
(re-prefill prompt + tokens so far, then the rest); local_only loses them.

    python benchmarks/global_serving.py [--day-seconds 1200] [--seed 0] [--json out.json]
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import random
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from strata.router.config import RouterConfig  # noqa: E402
from strata.router.policies import LeastOutstanding, RegionAware, RoundRobin, RouteContext  # noqa: E402
from strata.router.registry import Replica  # noqa: E402

REGIONS = {  # name: (UTC offset h, peak req/s, $ per GPU-hour)
    "us-east": (-5.0, 30.0, 2.50),
    "eu-west": (0.0, 24.0, 2.80),
    "ap-south": (5.5, 16.0, 3.10),
}
RTT_MS = {"us-east": {"eu-west": 75, "ap-south": 220}, "eu-west": {"ap-south": 130}}
ACCESS_MS = 10.0
BATCH = 32
PREFILL_TOK_S = 10_000.0
PROMPT_TOKENS = 400
TOK_S = 0.015
SLOWDOWN = 1.0          # per-token time x (1 + SLOWDOWN * running / BATCH)
GIVE_UP_S = 60.0
TARGET_UTIL = 0.7
EGRESS_PER_GB = 0.02
BYTES_PER_TOKEN = 60    # an SSE chunk per token
START_UP_REAL_S = 300.0


def demand(region: str, utc_hour: float) -> float:
    off, peak, _ = REGIONS[region]
    h = (utc_hour + off) % 24
    day = max(0.0, math.sin(math.pi * (h - 7.0) / 16.0)) if 7.0 <= h <= 23.0 else 0.0
    return peak * (0.15 + 0.85 * day ** 1.5)


def mean_service_s() -> float:
    mean_out = 160.0
    return PROMPT_TOKENS / PREFILL_TOK_S + mean_out * TOK_S * (1 + SLOWDOWN * TARGET_UTIL)


def replicas_for(rate: float) -> int:
    """Replicas to serve `rate` req/s at the target utilisation of the batch slots."""
    return max(1, math.ceil(rate * mean_service_s() / (BATCH * TARGET_UTIL)))


class SimReplica(Replica):
    """The router's Replica plus the simulated engine state."""

    def __init__(self, url, region):
        super().__init__(url=url, region=region)
        self.running = 0
        self.queue: deque = deque()
        self.up_since = 0.0
        self.alive = True
        self.ready_at = 0.0
        self.retire = False
        self.inflight: dict[int, list] = {}


class LocalOnly:
    name = "local_only"

    def __init__(self):
        self.inner = LeastOutstanding()

    def select(self, ctx, candidates):
        local = [r for r in candidates if r.region == ctx.client_region]
        return self.inner.select(ctx, local) if local else None

    def routed(self, ctx, r):
        pass


class Sim:
    def __init__(self, policy_name: str, day_s: float, seed: int, outage: tuple[str, float, float] | None):
        self.policy_name = policy_name
        self.day_s = day_s
        self.scale = 86400.0 / day_s          # real seconds per simulated second of the day clock
        self.rng = random.Random(seed)
        self.outage = outage
        self.cfg = RouterConfig(region="us-east", regions=list(REGIONS), rtt_ms=RTT_MS)
        if policy_name == "local_only":
            self.policy = LocalOnly()
        elif policy_name == "round_robin":
            self.policy = RoundRobin()
        elif policy_name == "least_outstanding":
            self.policy = LeastOutstanding()
        else:
            self.policy = RegionAware(self.cfg, LeastOutstanding())
        self.autoscale = policy_name == "region_aware_autoscale"
        self.failover = policy_name != "local_only"
        self.replicas: list[SimReplica] = []
        self.events: list = []
        self.seq = 0
        self.lat: list[float] = []
        self.ttft: list[float] = []
        self.failed = 0
        self.done = 0
        self.cross = 0
        self.failovers = 0
        self.tokens = 0
        self.egress_bytes = 0.0
        self.gpu_s = {g: 0.0 for g in REGIONS}
        self.outage_lat: list[float] = []
        self.outage_failed = 0
        self.outage_total = 0
        self.peak_replicas = 0
        self._n = 0

    # ---------------------------------------------------------------- fleet
    def initial_fleet(self) -> dict[str, int]:
        if self.policy_name == "region_aware_lean":
            # size for the global peak (sum of the curves at its worst hour), split by regional peaks
            hours = [h / 4 for h in range(96)]
            total_peak = max(sum(demand(g, h) for g in REGIONS) for h in hours)
            n_total = replicas_for(total_peak)
            peaks = {g: REGIONS[g][1] for g in REGIONS}
            s = sum(peaks.values())
            return {g: max(1, round(n_total * peaks[g] / s)) for g in REGIONS}
        if self.autoscale:
            return {g: replicas_for(demand(g, 0.0)) for g in REGIONS}
        return {g: replicas_for(REGIONS[g][1]) for g in REGIONS}

    def add_replica(self, region: str, now: float, ready_at: float | None = None) -> SimReplica:
        self._n += 1
        r = SimReplica(f"http://{region}-{self._n}:8000", region)
        r.up_since = now
        r.ready_at = now if ready_at is None else ready_at
        self.replicas.append(r)
        return r

    def account(self, r: SimReplica, now: float) -> None:
        self.gpu_s[r.region] += now - r.up_since
        r.up_since = now

    # ---------------------------------------------------------------- events
    def push(self, t, kind, payload):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def utc_hour(self, t: float) -> float:
        return 24.0 * t / self.day_s

    def run(self) -> dict:
        for g, n in self.initial_fleet().items():
            for _ in range(n):
                self.add_replica(g, 0.0)
        lam_max = {g: REGIONS[g][1] for g in REGIONS}
        for g in REGIONS:   # thinning: candidate arrivals at the peak rate
            self.push(self.rng.expovariate(lam_max[g]), "arrive", g)
        if self.autoscale:
            self.push(0.0, "scale", None)
        if self.outage:
            g, h0, h1 = self.outage
            self.push(h0 / 24 * self.day_s, "down", g)
            self.push(h1 / 24 * self.day_s, "up", g)
        end = self.day_s
        while self.events:
            t, _, kind, p = heapq.heappop(self.events)
            if t > end and kind == "arrive":
                continue
            if kind == "arrive":
                self.push(t + self.rng.expovariate(lam_max[p]), "arrive", p)
                if self.rng.random() * lam_max[p] <= demand(p, self.utc_hour(t)):
                    out = max(16, min(1024, int(self.rng.lognormvariate(math.log(130), 0.65))))
                    req = [p, t, out, 0, None, None, False]   # region, arrival, out tokens, done tokens, ttft, replica, in_outage
                    if self.outage and self.outage[0] == p and self.outage[1] <= self.utc_hour(t) < self.outage[2]:
                        req[6] = True
                        self.outage_total += 1
                    self.dispatch(req, t)
            elif kind == "finish":
                self.finish(p, t)
            elif kind == "scale":
                self.rescale(t)
                if t < end:
                    self.push(t + self.day_s / 24, "scale", None)
            elif kind == "down":
                self.region_down(p, t)
            elif kind == "up":
                for _ in range(self.initial_fleet()[p] if not self.autoscale else replicas_for(demand(p, self.utc_hour(t)))):
                    self.add_replica(p, t, t + START_UP_REAL_S / self.scale)
        for r in self.replicas:
            if r.alive:
                self.account(r, max(end, r.up_since))
        return self.summary()

    def candidates(self, now):
        return [r for r in self.replicas if r.alive and not r.retire and r.ready_at <= now]

    def dispatch(self, req, now, exclude=None):
        cands = [r for r in self.candidates(now) if r is not exclude]
        free = [r for r in cands if r.outstanding < BATCH]
        ctx = RouteContext(client_region=req[0])
        r = self.policy.select(ctx, free) if free else None
        if r is None:
            r = self.policy.select(ctx, cands) if cands else None   # all busy: queue at the best one
        if r is None:
            self.fail(req)
            return
        req[5] = r
        r.outstanding += 1
        if r.running < BATCH:
            self.start(r, req, now)
        else:
            r.queue.append((now, req))

    def start(self, r: SimReplica, req, now):
        r.running += 1
        remaining = req[2] - req[3]
        prefill = (PROMPT_TOKENS + req[3]) / PREFILL_TOK_S
        per_tok = TOK_S * (1 + SLOWDOWN * r.running / BATCH)
        rtt = (ACCESS_MS + self.cfg.rtt(req[0], r.region)) / 1000.0
        if req[4] is None:
            req[4] = now - req[1] + prefill + rtt
        dur = prefill + remaining * per_tok
        key = id(req)
        r.inflight[key] = [req, now, prefill, per_tok]
        self.push(now + dur, "finish", (r, key))

    def finish(self, p, now):
        r, key = p
        item = r.inflight.pop(key, None)
        if item is None or not r.alive:
            return   # the replica died meanwhile
        req = item[0]
        r.running -= 1
        r.outstanding -= 1
        rtt = (ACCESS_MS + self.cfg.rtt(req[0], r.region)) / 1000.0
        total = now - req[1] + rtt
        self.lat.append(total)
        self.ttft.append(req[4])
        if req[6]:
            self.outage_lat.append(total)
        self.done += 1
        self.tokens += req[2]
        if r.region != req[0]:
            self.cross += 1
            self.egress_bytes += req[2] * BYTES_PER_TOKEN
        while r.queue and r.running < BATCH:
            t0, nxt = r.queue.popleft()
            if now - t0 > GIVE_UP_S:
                r.outstanding -= 1
                self.fail(nxt)
                continue
            self.start(r, nxt, now)
        if r.retire and r.outstanding == 0:
            self.account(r, now)
            r.alive = False

    def fail(self, req):
        self.failed += 1
        if req[6]:
            self.outage_failed += 1

    def region_down(self, g, now):
        if self.autoscale:
            self.rescale(now)
        for r in self.replicas:
            if r.region != g or not r.alive:
                continue
            self.account(r, now)
            r.alive = False
            stranded = [it[0] for it in r.inflight.values()]
            for key, it in r.inflight.items():   # tokens produced before the failure
                req, t0, prefill, per_tok = it
                req[3] = min(req[2] - 1, req[3] + max(0, int((now - t0 - prefill) / per_tok)))
            r.inflight.clear()
            stranded += [q[1] for q in r.queue]
            r.queue.clear()
            for req in stranded:
                if self.failover:
                    self.failovers += 1
                    self.dispatch(req, now, exclude=r)
                else:
                    self.fail(req)

    def rescale(self, now):
        """Hourly: each region gets replicas for its forecast demand over the next hour, plus the demand of
        any region that is down and spills to it (its nearest healthy region by RTT)."""
        h = self.utc_hour(now)
        down = {g for g in REGIONS if self.outage and self.outage[0] == g and self.outage[1] <= h < self.outage[2]}
        target = {g: max(demand(g, h), demand(g, h + 1)) for g in REGIONS}
        for g in down:
            near = min((x for x in REGIONS if x not in down), key=lambda x: self.cfg.rtt(g, x))
            target[near] += target[g]
        for g in REGIONS:
            if g in down:
                continue
            want = replicas_for(target[g])
            live = [r for r in self.replicas if r.region == g and r.alive and not r.retire]
            if len(live) < want:
                for _ in range(want - len(live)):
                    self.add_replica(g, now, now + START_UP_REAL_S / self.scale)
            elif len(live) > want:
                for r in sorted(live, key=lambda r: r.outstanding)[: len(live) - want]:
                    r.retire = True
                    if r.outstanding == 0:
                        self.account(r, now)
                        r.alive = False
        self.peak_replicas = max(self.peak_replicas, sum(1 for r in self.replicas if r.alive))

    def summary(self) -> dict:
        def pct(xs, q):
            if not xs:
                return float("nan")
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]

        gpu_h = {g: s * self.scale / 3600.0 for g, s in self.gpu_s.items()}
        cost = sum(gpu_h[g] * REGIONS[g][2] for g in REGIONS) + self.egress_bytes * self.scale / 1e9 * EGRESS_PER_GB
        total = self.done + self.failed
        return {
            "requests": total, "p50_s": pct(self.lat, 50), "p99_s": pct(self.lat, 99),
            "ttft_p50_s": pct(self.ttft, 50), "ttft_p99_s": pct(self.ttft, 99), "failed_pct": 100.0 * self.failed / max(1, total),
            "cross_region_pct": 100.0 * self.cross / max(1, self.done), "gpu_hours_per_day": sum(gpu_h.values()),
            "cost_per_day_usd": cost, "usd_per_1m_tokens": cost / max(1, self.tokens * self.scale) * 1e6,
            "failovers": self.failovers,
            "outage_requests": self.outage_total, "outage_failed_pct":
                100.0 * self.outage_failed / max(1, self.outage_total) if self.outage else None,
            "outage_p99_s": pct(self.outage_lat, 99) if self.outage else None,
        }


POLICIES = ["local_only", "round_robin", "least_outstanding", "region_aware", "region_aware_lean",
            "region_aware_autoscale"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--day-seconds", type=float, default=1200.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--outage-region", default="eu-west")
    ap.add_argument("--outage-utc", default="12,14", help="start,end hour (UTC) of the region outage")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    h0, h1 = (float(x) for x in a.outage_utc.split(","))
    results = {}
    t_start = time.time()
    for scenario, outage in (("normal day", None), (f"{a.outage_region} down {h0:g}-{h1:g} UTC",
                                                    (a.outage_region, h0, h1))):
        results[scenario] = {}
        for name in a.policies.split(","):
            t = time.time()
            results[scenario][name] = Sim(name, a.day_seconds, a.seed, outage).run()
            results[scenario][name]["sim_wall_s"] = time.time() - t
    fleet = {g: replicas_for(REGIONS[g][1]) for g in REGIONS}
    print(f"global serving simulation: {len(REGIONS)} regions, fleet sized for regional peaks {fleet}, "
          f"day compressed to {a.day_seconds:g} s, seed {a.seed} ({time.time() - t_start:.0f} s wall)")
    for scenario, res in results.items():
        print(f"\n== {scenario}")
        print(f"{'policy':<24}{'p50 s':>7}{'p99 s':>7}{'TTFT50':>8}{'TTFT99':>8}{'fail%':>7}{'cross%':>8}{'GPU-h':>8}"
              f"{'$/day':>9}{'$/1M tok':>9}" + (f"{'out.p99':>9}{'out.fail%':>10}{'resumed':>8}" if 'down' in scenario else ""))
        for name, r in res.items():
            line = (f"{name:<24}{r['p50_s']:>7.2f}{r['p99_s']:>7.2f}{r['ttft_p50_s']:>8.3f}{r['ttft_p99_s']:>8.2f}{r['failed_pct']:>7.2f}"
                    f"{r['cross_region_pct']:>8.1f}{r['gpu_hours_per_day']:>8.0f}{r['cost_per_day_usd']:>9.0f}"
                    f"{r['usd_per_1m_tokens']:>9.3f}")
            if "down" in scenario:
                line += f"{r['outage_p99_s']:>9.2f}{r['outage_failed_pct']:>10.1f}{r['failovers']:>8d}"
            print(line)
    out = {"results": results, "setup": {"day_seconds": a.day_seconds, "seed": a.seed, "regions": REGIONS,
                                         "rtt_ms": RTT_MS, "fleet_regional_peaks": fleet,
                                         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
                                         "cpus": os.cpu_count()}}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
