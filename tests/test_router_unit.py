"""Router logic without processes: config, breaker, policies, stream stitching, metrics, sbatch rendering."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest

from strata.router.config import ConfigError, RouterConfig, build_config, config_from_dict, parse_replica_flag
from strata.router.metrics import parse_prometheus, replica_value
from strata.router.policies import (CacheAware, LeastOutstanding, PowerOfTwo, RegionAware, RouteContext, RoundRobin,
                                    SessionAffinity, make_policy)
from strata.router.registry import BreakerState, CircuitBreaker, Registry, RegistryError, Replica
from strata.router.stream import SSEParser, StreamState, UpstreamError, loads


def test_router_does_not_import_torch():
    code = ("import sys, strata.router, strata.router.server, strata.router.cli, strata.router.slurm, "
            "strata.router.policies; from strata.cli import build_parser; build_parser('router'); "
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "assert not bad, bad; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


# ------------------------------------------------------------------------------------------ config

def _write(tmp_path, text):
    p = tmp_path / "fleet.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_config_file_and_flags(tmp_path):
    path = _write(tmp_path, """
        region: us-east
        policy: region_aware
        inner_policy: cache_aware
        regions:
          us-east: {eu-west: 75, ap-south: 190}
          eu-west: {ap-south: 120}
          ap-south: {}
        replicas:
          - {url: "http://10.0.0.5:8000/", region: us-east, weight: 2}
          - http://10.1.0.7:8000@eu-west
        health: {interval_s: 0.5, failure_threshold: 2}
        queue: {max_size: 8, timeout_s: 3}
    """)
    cfg = build_config(path, ["http://10.2.0.9:8000@ap-south"], {"port": 9100})
    assert [r.url for r in cfg.replicas] == ["http://10.0.0.5:8000", "http://10.1.0.7:8000", "http://10.2.0.9:8000"]
    assert cfg.replicas[0].weight == 2 and cfg.replicas[1].region == "eu-west"
    assert cfg.rtt("eu-west", "us-east") == 75 and cfg.rtt("ap-south", "eu-west") == 120
    assert cfg.rtt("us-east", "us-east") == 0
    assert cfg.health_interval_s == 0.5 and cfg.failure_threshold == 2 and cfg.queue_max_size == 8
    assert cfg.port == 9100 and cfg.policy == "region_aware"


@pytest.mark.parametrize("text,needle", [
    ("replicas: [ {url: http://a:1, region: x}\n", "malformed YAML (line"),
    ("replicas:\n  - {url: http://a:1}\n  - {url: 'http://A:1/'}\n", "duplicate replica http://a:1"),
    ("regions: [us, eu]\nreplicas:\n  - {url: http://a:1, region: mars}\n", "unknown region 'mars'"),
    ("replicas:\n  - {url: ftp://a:1}\n", "must start with http"),
    ("replicas:\n  - {region: us}\n", "missing 'url'"),
    ("polcy: round_robin\n", "unknown key(s) polcy"),
    ("policy: fastest\nreplicas: [http://a:1]\n", "unknown policy 'fastest'"),
    ("regions:\n  us: {eu: 10}\n  eu: {us: 20}\n", "given twice with different values"),
    ("regions:\n  us: {eu: -5}\n  eu: {}\n", "must be >= 0"),
    ("regions:\n  us: {xx: 5}\n", "unknown region 'xx'"),
    ("health: {interval: 1}\n", "health: unknown key(s) interval"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("region: mars\nregions: [us]\n", "router region 'mars'"),
    ("replicas:\n  - {url: 'http://a:99999'}\n", "bad port"),
])
def test_config_errors_are_clear(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        build_config(_write(tmp_path, text))
    assert needle in str(e.value)


def test_replica_flag_errors():
    assert parse_replica_flag("http://h:1@eu").region == "eu"
    assert parse_replica_flag("http://h:1", "us").region == "us"
    with pytest.raises(ConfigError, match="empty region"):
        parse_replica_flag("http://h:1@")
    with pytest.raises(ConfigError, match="duplicate replica"):
        build_config(None, ["http://h:1@a", "http://h:1/@b"])


def test_cli_rejects_bad_config_without_starting(tmp_path):
    bad = _write(tmp_path, "replicas: [ {url: http://a:1\n")
    out = subprocess.run([sys.executable, "-m", "strata.router", "--config", bad], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "malformed YAML" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "strata.router", "--replica", "http://a:1@x", "--replica",
                          "http://a:1@y"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "duplicate replica" in out.stderr


# ------------------------------------------------------------------------------------------ registry / breaker

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_breaker_opens_half_opens_and_closes():
    c = Clock()
    b = CircuitBreaker(failure_threshold=3, open_s=1.0, open_max_s=4.0, clock=c)
    for _ in range(2):
        b.acquire(); b.record_failure()
    assert b.state is BreakerState.CLOSED and b.available()
    b.acquire(); b.record_failure()
    assert b.state is BreakerState.OPEN and not b.available()
    c.t = 1.0
    assert b.available()
    assert b.acquire() is True and b.state is BreakerState.HALF_OPEN
    assert not b.available()          # one trial at a time
    b.record_failure()                # trial failed: open again, twice as long
    assert b.state is BreakerState.OPEN and b.open_until == pytest.approx(3.0)
    c.t = 3.0
    b.acquire(); b.record_success()
    assert b.state is BreakerState.CLOSED and b.current_open_s == 1.0


def test_registry_register_refresh_and_conflicts():
    cfg = RouterConfig(regions=["us", "eu"], region="us")
    reg = Registry(cfg)
    r, created = reg.register("http://h:1/", "eu", "m")
    assert created and r.url == "http://h:1" and r.region == "eu"
    r.healthy = False
    r.breaker.state = BreakerState.OPEN
    r2, created = reg.register("http://h:1", "eu")
    assert r2 is r and not created and r.healthy and r.breaker.state is BreakerState.CLOSED
    with pytest.raises(RegistryError) as e:
        reg.register("http://h:1", "us")
    assert e.value.status == 409 and "duplicate replica" in str(e.value)
    with pytest.raises(RegistryError, match="unknown region 'mars'"):
        reg.register("http://h:2", "mars")
    with pytest.raises(RegistryError, match="http"):
        reg.register("h:2", "us")
    r.outstanding = 1
    reg.deregister("http://h:1")
    assert r.draining and reg.get("http://h:1") is r and not reg.candidates(None)
    r.outstanding = 0
    reg.request_finished(r)
    assert reg.get("http://h:1") is None


# ------------------------------------------------------------------------------------------ policies

def reps(*specs):
    out = []
    for i, s in enumerate(specs):
        region, load = (s if isinstance(s, tuple) else (s, 0))
        r = Replica(url=f"http://r{i}:1", region=region)
        r.outstanding = load
        out.append(r)
    return out


def test_round_robin_and_weights():
    rs = reps("a", "a", "a")
    rr = RoundRobin()
    assert [rr.select(RouteContext(), rs).url for _ in range(6)] == [r.url for r in rs] * 2
    rs[0].weight = 2
    picks = [rr.select(RouteContext(), rs).url for _ in range(400)]
    assert picks.count(rs[0].url) == 200


def test_least_outstanding_and_power_of_two():
    rs = reps(("a", 3), ("a", 1), ("a", 2))
    assert LeastOutstanding().select(RouteContext(), rs) is rs[1]
    import random
    p2 = PowerOfTwo(random.Random(0))
    picks = [p2.select(RouteContext(), rs) for _ in range(300)]
    assert rs[0] not in picks                  # the most loaded never wins a pair
    assert picks.count(rs[1]) > picks.count(rs[2])


def test_cache_aware_sticks_to_prefix_within_balance():
    rs = reps("a", "a", "a")
    p = CacheAware(block_chars=16, balance_abs=2, balance_rel=1.0)
    sys_a = "You are a helpful assistant for tenant A. " * 4
    sys_b = "You are a pirate who answers tersely, arr. " * 4

    def route(prompt):
        ctx = RouteContext(prefix_text=prompt)
        r = p.select(ctx, rs)
        p.routed(ctx, r)
        return r

    first_a = route(sys_a + "q1")
    first_b = route(sys_b + "q1")
    assert first_a is not first_b                         # new prefixes spread by load
    assert all(route(sys_a + f"q{i}") is first_a for i in range(2, 6))
    first_a.outstanding = 5                               # now too loaded: goes elsewhere, which learns it
    other = route(sys_a + "q9")
    assert other is not first_a
    first_a.outstanding = 0
    other.outstanding = 1
    assert route(sys_a + "q10") is first_a                # both hold it: the less loaded


def test_session_affinity_is_stable_and_moves_only_lost_sessions():
    rs = reps("a", "a", "a", "a")
    p = SessionAffinity(LeastOutstanding())
    keys = [f"user-{i}" for i in range(200)]
    before = {k: p.select(RouteContext(session_key=k), rs) for k in keys}
    assert len({r.url for r in before.values()}) == 4
    assert all(p.select(RouteContext(session_key=k), rs) is before[k] for k in keys)
    after = {k: p.select(RouteContext(session_key=k), rs[:3]) for k in keys}
    moved = [k for k in keys if after[k] is not before[k]]
    assert moved and all(before[k] is rs[3] for k in moved)


def test_region_aware_prefers_local_then_nearest_by_rtt():
    cfg = RouterConfig(region="us", regions=["us", "eu", "ap"], rtt_ms={"us": {"eu": 80, "ap": 200},
                                                                         "eu": {"ap": 120}})
    p = RegionAware(cfg, LeastOutstanding())
    rs = reps("us", "eu", "ap")
    for client, want in (("us", "us"), ("eu", "eu"), ("ap", "ap")):
        ctx = RouteContext(client_region=client)
        assert p.select(ctx, rs).region == want and not ctx.spilled
    # local region gone: nearest by the matrix
    assert p.select(RouteContext(client_region="eu"), [rs[0], rs[2]]).region == "us"    # 80 < 120
    assert p.select(RouteContext(client_region="ap"), [rs[0], rs[1]]).region == "eu"    # 120 < 200
    ctx = RouteContext(client_region="us")
    assert p.select(ctx, [rs[1], rs[2]]).region == "eu" and ctx.spilled and ctx.served_region == "eu"


def test_region_aware_falls_back_to_measured_rtt():
    cfg = RouterConfig(region="home")
    p = RegionAware(cfg, LeastOutstanding())
    rs = reps("far", "near")
    rs[0].probe_rtt_ms, rs[1].probe_rtt_ms = 90.0, 12.0
    assert p.select(RouteContext(client_region="home"), rs).region == "near"


def test_make_policy_names():
    cfg = RouterConfig(inner_policy="cache_aware")
    assert make_policy("region_aware", cfg).inner.name == "cache_aware"
    assert make_policy("session_affinity", cfg).name == "session_affinity"


# ------------------------------------------------------------------------------------------ streams

def _chunk(i, text, fin=None, chat=False, **extra):
    if chat:
        ch = {"index": 0, "delta": {"content": text}, "finish_reason": fin}
    else:
        ch = {"index": 0, "text": text, "finish_reason": fin}
    ch.update(extra)
    return json.dumps({"id": f"id-{i}", "created": 100 + i, "model": "m", "choices": [ch]}).encode()


def test_sse_parser_handles_split_events_and_crlf():
    p = SSEParser()
    raw = b"data: {\"a\": 1}\n\n: comment\n\ndata: [DONE]\r\n\r\n"
    got = []
    for i in range(len(raw)):
        got += p.feed(raw[i:i + 1])
    assert got == [b'{"a": 1}', b"[DONE]"]


def test_completion_continuation_and_stitching():
    s = StreamState("completions", {"prompt": "Hello", "max_tokens": 5, "min_tokens": 2, "stream": True})
    assert s.process(_chunk(0, " a")).startswith(b"data: ")
    s.process(_chunk(0, " b"))
    cont = s.continuation()
    assert cont["prompt"] == "Hello a b" and cont["max_tokens"] == 3 and cont["min_tokens"] == 0
    assert cont["echo"] is False
    s.begin_segment()
    out = loads(s.process(_chunk(7, " c"))[6:])
    assert out["id"] == "id-0" and out["created"] == 100 and out["choices"][0]["text"] == " c"
    assert s.text == " a b c" and s.tokens == 3


def test_continuation_uses_token_ids_when_replica_reports_them():
    s = StreamState("completions", {"prompt": "Hi", "max_tokens": 4})
    s.process(json.dumps({"id": "x", "prompt_token_ids": [1, 5, 6], "choices": [
        {"index": 0, "text": "ab", "token_ids": [7, 8]}]}).encode())
    cont = s.continuation()
    assert cont["prompt"] == [1, 5, 6, 7, 8] and cont["max_tokens"] == 2


def test_chat_continuation_and_role_chunk_dropped():
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10, "stream": True}
    s = StreamState("chat", body)
    role = json.dumps({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}).encode()
    assert s.process(role) is not None
    s.process(_chunk(0, "Hel", chat=True))
    s.process(_chunk(0, "lo", chat=True))
    cont = s.continuation()
    assert cont["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    assert cont["max_completion_tokens"] == 8 and body["messages"] == [{"role": "user", "content": "hi"}]
    s.begin_segment()
    assert s.process(role) is None                                  # second role chunk hidden
    assert s.process(_chunk(1, "!", fin="stop", chat=True)) is not None and s.finished


def test_budget_spent_and_unresumable_cases():
    s = StreamState("completions", {"prompt": "p", "max_tokens": 2})
    s.process(_chunk(0, "x")); s.process(_chunk(0, "y"))
    assert s.continuation() is None
    assert b'"finish_reason":"length"' in s.final_chunk()
    assert not StreamState("completions", {"prompt": "p", "n": 2}).can_failover
    assert not StreamState("completions", {"prompt": "p", "echo": True}).can_failover
    assert StreamState("chat", {"messages": []}).continuation() == {"messages": []}   # nothing sent yet
    s = StreamState("completions", {"prompt": "p"})
    with pytest.raises(UpstreamError, match="mid-stream"):
        s.process(b'{"error": {"message": "engine died"}}')


# ------------------------------------------------------------------------------------------ metrics / slurm

def test_parse_replica_metrics():
    text = ('# HELP x\nstrata:num_requests_waiting{model_name="m"} 3\nstrata:num_requests_waiting{model_name="n"} 2\n'
            'vllm:kv_cache_usage_perc 0.5\nstrata:prefix_cache_hits_total 10\n')
    p = parse_prometheus(text)
    assert replica_value(p, "num_requests_waiting") == 5
    assert replica_value(p, "kv_cache_usage_perc") == 0.5


def _slurm_args(argv):
    from strata.router.slurm import add_slurm_serve_args

    ap = argparse.ArgumentParser()
    add_slurm_serve_args(ap)
    return ap.parse_args(argv)


def test_slurm_serve_script(tmp_path):
    from strata.router.slurm import SlurmServeError, render_serve_sbatch

    s = render_serve_sbatch(_slurm_args(["--nodes", "4", "--gpus-per-node", "8", "--tensor-parallel-size", "4",
                                         "--router", "http://router:9000", "--region", "eu-west", "M"]))
    assert "#SBATCH --nodes=4" in s and "#SBATCH --ntasks-per-node=2" in s and "#SBATCH --gpus-per-node=8" in s
    assert "--register-with \"$STRATA_ROUTER_URL\"" in s and "STRATA_REGION=eu-west" in s
    assert "strata serve M --host" in s and "--tensor-parallel-size \"$STRATA_TP\"" in s
    assert "test-router-key" not in s
    f = tmp_path / "job.sh"
    f.write_text(s)
    assert subprocess.run(["bash", "-n", str(f)]).returncode == 0
    cpu = render_serve_sbatch(_slurm_args(["--nodes", "2", "--replicas-per-node", "3", "--router", "http://r:1"]))
    assert "--ntasks-per-node=3" in cpu and "gpus-per-node" not in cpu
    for bad in (["--gpus-per-node", "8", "-tp", "3"], ["--gpus-per-node", "4", "-tp", "8"], ["-tp", "2"]):
        with pytest.raises(SlurmServeError):
            render_serve_sbatch(_slurm_args(["--router", "http://r:1", *bad]))


def test_router_asks_for_per_chunk_usage_and_hides_it():
    """The router asks replicas for continuous usage (exact token counts even when a chunk carries several
    tokens) and strips what the client did not ask for."""
    s = StreamState("completions", {"prompt": "p", "max_tokens": 10, "stream": True})
    up = s.upstream_body()
    assert up["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "stream_options" not in s.body
    two = json.dumps({"id": "a", "choices": [{"index": 0, "text": "xy", "finish_reason": None}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
    out = loads(s.process(two)[6:])
    assert "usage" not in out and s.tokens == 2                      # two tokens in one chunk, counted exactly
    assert s.process(b'{"id": "a", "choices": [], "usage": {"completion_tokens": 2}}') is None
    assert s.continuation()["max_tokens"] == 8
    # the client asked for the final usage only: it gets that, adjusted across a failover
    s = StreamState("chat", {"messages": [{"role": "user", "content": "q"}], "stream": True,
                             "stream_options": {"include_usage": True}})
    s.process(json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": "ab"}}],
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode())
    s.begin_segment()
    fin = loads(s.process(json.dumps({"id": "d", "choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}).encode())[6:])
    assert fin["id"] == "c" and fin["usage"]["completion_tokens"] == 6 and fin["usage"]["prompt_tokens"] == 3
    # a client that asked for continuous usage gets the replica's chunks as they are
    s = StreamState("completions", {"prompt": "p", "stream": True,
                                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert not s.inject_usage and s.upstream_body() == s.body
