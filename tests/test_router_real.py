"""The router in front of three REAL `strata serve` replicas on loopback (issue 7's CI tests).

The replicas run the real engine on CPU with a tiny random Llama and the embedded SmolLM2 tokenizer
(router_support/real_replica.py: its output layer only emits whole " word" tokens, so text re-tokenizes to
the same ids and a greedy continuation after failover equals the uninterrupted run). They start once for
the module and register themselves with the main router; the tests that kill replicas start them again.

Covered here with real replicas: SIGKILL under steady concurrent load (no failed request, streams resume,
greedy texts equal a run without the failure); a restarted replica registers again and gets traffic;
cache-aware routing beats round robin on the replicas' own prefix-cache hit rate; regions by RTT matrix.
Fault injection the real server has no switch for (500-only replicas, 429s, dying after N tokens) stays in
test_router_fleet.py with the fake replica.
"""
from __future__ import annotations

import os
import random
import time

import httpx
import pytest

from router_support.fleet import ReplicaProc, RouterProc, many, one, run
from router_support.real_replica import MODEL_NAME, serve_argv, write_word_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

START = float(os.environ.get("STRATA_TEST_REAL_START_TIMEOUT", "90"))   # loaded 2-core CI: be generous
KV_BLOCKS = 64          # x 16 tokens per replica: room for ~3 of the cache test's 9 tenant prompts
# the router's health probes and scrapes get more time than the default 1 s: other tests load the machine
HEALTH = {"timeout_s": 3.0, "failure_threshold": 3}


class RealFleet:
    def __init__(self, tmp, model_dir):
        self.tmp = tmp
        self.cmd = serve_argv(model_dir, "--num-gpu-blocks-override", str(KV_BLOCKS), "--num-threads", "1")
        self.routers: list[RouterProc] = []
        # the main router: replicas register with it; one that stops heartbeating is dropped after 6 s, one
        # that is unreachable (killed before its first heartbeat, say) after 8 s
        self.main = self.router(config={"region": "local",
                                        "health": {**HEALTH, "heartbeat_ttl_s": 6.0, "remove_after_s": 8.0}},
                                args=["--queue-timeout", "60"])
        self.reps = [ReplicaProc(tmp, cmd=self.cmd, register_with=self.main.url, region="local")
                     for _ in range(3)]

    def start(self) -> "RealFleet":
        self.main.start().wait_ready(START)
        for r in self.reps:
            r.start()
        self.heal()
        return self

    def router(self, **kw) -> RouterProc:
        p = RouterProc(self.tmp, **kw)
        self.routers.append(p)
        return p

    def registered(self, rep) -> dict | None:
        for r in self.main.fleet()["replicas"]:
            if r["url"].endswith(rep.name) and not r["draining"]:
                return r
        return None

    def heal(self) -> None:
        """Every replica up and routable at the main router (restarting any a test left dead)."""
        for r in self.reps:
            if not r.alive():
                r.start()
        for r in self.reps:
            r.wait_ready(START)
        self.main.wait_for(lambda: all((self.registered(r) or {}).get("routable") for r in self.reps), START,
                           "3 replicas registered and routable")

    def close(self) -> None:
        for p in [*self.reps, *self.routers]:
            try:
                p.kill()
            except Exception:
                pass


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router_real")
    f = RealFleet(tmp, write_word_model(tmp / "model"))
    try:
        yield f.start()
    finally:
        f.close()
        for p in [*f.routers, *f.reps]:
            tail = p.log_text()[-2000:]
            if tail.strip():
                print(f"--- {p.log.name}\n{tail}")


@pytest.fixture
def fleet(real):
    real.heal()
    return real


def _prompts(n, tag):
    return [f"[{tag}] request {i}: tell me about the number {i * 7919 % 1000}" for i in range(n)]


def _ok(results):
    bad = [r for r in results if r["status"] != 200 or r["error"] is not None]
    assert not bad, bad[:3]
    return results


# ------------------------------------------------------------------------------------------ failover

def test_sigkill_under_load_loses_nothing(fleet):
    """Steady concurrent load (streamed completions and chats, unary requests) through the main router; one
    replica is SIGKILLed while a stream it serves is half-way. No request fails, the streams it was serving
    resume on another replica, and every greedy text equals the text of the same load without the failure."""
    router, victim = fleet.main, fleet.reps[1]
    models = httpx.get(router.url + "/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["replicas"]) for m in models] == [(MODEL_NAME, 3)]
    prompts = _prompts(42, "kill")
    jobs = ([dict(prompt=p, max_tokens=32, stream=True) for p in prompts[:24]]
            + [dict(prompt=p, max_tokens=32, stream=True, chat=True) for p in prompts[24:36]]
            + [dict(prompt=p, max_tokens=32) for p in prompts[36:]]
            + [dict(prompt=p, max_tokens=32, chat=True) for p in prompts[36:]])
    random.Random(3).shuffle(jobs)
    t0 = time.monotonic()
    baseline = _ok(run(many(router.url, jobs, concurrency=12)))
    base_s = time.monotonic() - t0
    assert all(b["finish"] == "length" and b["text"] for b in baseline)
    assert len({b["replica"] for b in baseline}) == 3
    failovers_before = router.metric("strata_router:failovers_total", replica=victim.name)

    killed = {}
    finished = set()

    def kill_mid_stream(out):
        # once the load is in full swing (eight streams finished: the first wave is over), the first stream
        # served by the victim that is part-way through (4 to 24 chunks of 32 tokens): SIGKILL the victim
        if out["finish"] is not None:
            finished.add(id(out))
        if (not killed and len(finished) >= 8 and out["replica"] == victim.name and out["finish"] is None
                and 4 <= out["events"] <= 24):
            victim.kill()
            killed["t"] = time.monotonic()

    kill_jobs = [dict(j, on_event=kill_mid_stream) if j.get("stream") else j for j in jobs]
    t0 = time.monotonic()
    results = run(many(router.url, kill_jobs, concurrency=12))
    t1 = time.monotonic()
    assert killed, "no stream was routed to the victim"
    assert not victim.alive()
    print(f"killed after {killed['t'] - t0:.2f} s of a {t1 - t0:.2f} s load (baseline {base_s:.2f} s)")
    for job, b, r in zip(jobs, baseline, results):
        assert r["status"] == 200 and r["error"] is None, (job, r)
        assert r["text"] == b["text"], (job, r["text"], b["text"])
        assert r["finish"] == "length"
        if job.get("stream"):
            assert len(r["ids"]) == 1
        if job.get("chat") and job.get("stream"):
            assert r["roles"] == 1
    assert sum(r["replica"] == victim.name for r in results) >= 1
    assert router.metric("strata_router:failovers_total", replica=victim.name) > failovers_before
    # the load kept going after the kill: requests finished on the two survivors
    after = [r for r in results if r["replica"] != victim.name]
    assert {r["replica"] for r in after} == {fleet.reps[0].name, fleet.reps[2].name}


def test_restarted_replica_registers_again_and_gets_traffic(real):
    """A replica that died is dropped by the router (no heartbeats); started again, it registers itself
    again and gets its share of the traffic. (Picks up the replica the SIGKILL test left dead.)"""
    fleet = real
    router, rep = fleet.main, fleet.reps[1]
    for r in fleet.reps:
        if r is not rep and not r.alive():
            r.start().wait_ready(START)
    if rep.alive():
        rep.kill()
    _ok(run(many(router.url, [dict(prompt=p, max_tokens=4) for p in _prompts(9, "down")], concurrency=3)))
    router.wait_for(lambda: fleet.registered(rep) is None, 30, "dead replica dropped from the fleet")

    res = _ok(run(many(router.url, [dict(prompt=p, max_tokens=4) for p in _prompts(9, "two")], concurrency=3)))
    assert rep.name not in {r["replica"] for r in res}

    rep.start().wait_ready(START)
    st = router.wait_for(lambda: (fleet.registered(rep) or {}).get("routable") and fleet.registered(rep),
                         START, "restarted replica registered again")
    assert not st["static"]
    res = _ok(run(many(router.url, [dict(prompt=p, max_tokens=4) for p in _prompts(24, "back")], concurrency=3)))
    served = sum(r["replica"] == rep.name for r in res)
    assert served >= 4, [r["replica"] for r in res]
    assert fleet.registered(rep)["requests_total"] >= served


# ------------------------------------------------------------------------------------------ cache-aware

def test_cache_aware_beats_round_robin_on_prefix_hits(fleet):
    """Nine tenants with their own long system prompt (~8 KV blocks each); each replica's KV cache holds
    64 blocks, about three tenants. Round robin sends every tenant everywhere (LRU thrash); cache-aware keeps
    tenants on their replica. Hit rates are read from the replicas' own /metrics (the engine's prefix cache)."""
    reps = fleet.reps
    urls = [r.url for r in reps]
    rr = fleet.router(replicas=urls, config={"health": HEALTH}, args=["--policy", "round_robin"])
    ca = fleet.router(replicas=urls, config={"health": HEALTH}, args=["--policy", "cache_aware"])
    for p in (rr, ca):
        p.start()
    for p in (rr, ca):
        p.wait_ready(START)
        p.wait_for(lambda: all(r["routable"] and r["models"] for r in p.fleet()["replicas"]), START, "routable")

    def counters():
        ms = [r.metrics() for r in reps]
        return (sum(m.get("strata:prefix_cache_queries_total", 0) for m in ms),
                sum(m.get("strata:prefix_cache_hits_total", 0) for m in ms))

    def hit_rate(router, tag):
        rng = random.Random(7)
        systems = [f"[{tag}] System prompt of tenant {t}: " + f"policy clause {t}; " * 24 for t in range(9)]
        jobs = [dict(prompt=systems[rng.randrange(9)] + f"\nQ{i}: what now?", max_tokens=2) for i in range(90)]
        q0, h0 = counters()
        _ok(run(many(router.url, jobs, concurrency=3)))
        q1, h1 = counters()
        return (h1 - h0) / (q1 - q0)

    rr_rate = hit_rate(rr, "rr")
    ca_rate = hit_rate(ca, "ca")
    print(f"prefix-cache hit rate (real replicas): round_robin {rr_rate:.2f}, cache_aware {ca_rate:.2f}")
    assert ca_rate > rr_rate + 0.1


# ------------------------------------------------------------------------------------------ regions

def _served(base, region, n=4):
    res = _ok(run(many(base, [dict(prompt=p, max_tokens=2, headers={"x-strata-region": region})
                              for p in _prompts(n, f"{region}{time.time()}")], concurrency=4)))
    return {r["region"] for r in res}


def test_regions_stay_local_spill_by_rtt_and_come_back(fleet):
    """One real replica per region, an RTT matrix: requests stay in their region while it is healthy, move
    to the nearest healthy region when it fails (no request fails), and come back when it recovers."""
    rs = dict(zip(("us", "eu", "ap"), fleet.reps))
    router = fleet.router(config={"region": "us", "policy": "region_aware", "health": HEALTH,
                                  "regions": {"us": {"eu": 80, "ap": 200}, "eu": {"ap": 120}, "ap": {}},
                                  "replicas": [{"url": r.url, "region": g} for g, r in rs.items()]})
    router.start().wait_ready(START)
    router.wait_for(lambda: all(r["routable"] for r in router.fleet()["replicas"]), START, "3 regions up")
    for g in rs:
        assert _served(router.url, g) == {g}
    r = one(router.url, "no header", max_tokens=2)
    assert r["status"] == 200 and r["region"] == "us"                     # the router's own region

    rs["eu"].kill()
    assert _served(router.url, "eu", 6) == {"us"}          # eu-us 80 ms < eu-ap 120 ms; no request fails
    assert _served(router.url, "us") == {"us"}
    rs["us"].kill()
    assert _served(router.url, "eu") == {"ap"}
    assert _served(router.url, "us") == {"ap"}
    assert router.metric("strata_router:spills_total", client_region="eu", served_region="us") >= 6

    rs["eu"].start().wait_ready(START)
    router.wait_for(lambda: _served(router.url, "eu") == {"eu"}, 30, "eu traffic back in eu")
    assert _served(router.url, "us") == {"eu"}             # us still down: us-eu 80 < us-ap 200
    rs["us"].start().wait_ready(START)
    router.wait_for(lambda: _served(router.url, "us") == {"us"}, 30, "us traffic back in us")
    assert _served(router.url, "ap") == {"ap"}
