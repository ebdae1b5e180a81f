"""/metrics of the server and the router through `prometheus_client`: the exposition parses with the official
parser, names and types are the documented ones, and several servers or routers in one process keep their
metrics apart (a registry each, never the process-wide default one)."""
from __future__ import annotations

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from router_support.fleet import RouterProc, free_port
from test_serve_utils import MODEL_NAME, ServerProcess, write_tiny_model

SERVER_TYPES = {
    "strata:num_requests_running": "gauge", "strata:num_requests_waiting": "gauge",
    "strata:kv_cache_usage_perc": "gauge", "strata:engine_dead": "gauge",
    "strata:num_preemptions": "counter", "strata:prefix_cache_queries": "counter",
    "strata:prefix_cache_hits": "counter", "strata:prompt_tokens": "counter", "strata:generation_tokens": "counter",
    "strata:request_success": "counter", "strata:request_rejected": "counter",
    "strata:time_to_first_token_seconds": "histogram", "strata:inter_token_latency_seconds": "histogram",
    "strata:e2e_request_latency_seconds": "histogram", "strata:request_params_n": "histogram",
}
ROUTER_TYPES = {
    "strata_router:requests": "counter", "strata_router:replica_requests": "counter",
    "strata_router:rejected": "counter", "strata_router:request_latency_seconds": "histogram",
    "strata_router:time_to_first_chunk_seconds": "histogram", "strata_router:replica_healthy": "gauge",
    "strata_router:region_replicas": "gauge", "strata_router:queue_depth": "gauge",
}


def parse(text: str) -> tuple[dict[str, str], dict[tuple, float]]:
    """({family: type}, {(sample name, sorted labels): value}) by prometheus_client's own parser."""
    types, samples = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def test_server_metrics_exposition(tmp_path):
    srv = ServerProcess(write_tiny_model(tmp_path / "model"), log_path=str(tmp_path / "server.log")).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
        r = httpx.get(srv.url + "/metrics", timeout=10)
    finally:
        srv.stop()
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    types, samples = parse(r.text)
    assert {k: types.get(k) for k in SERVER_TYPES} == SERVER_TYPES
    assert not [name for name, _ in samples if name.endswith("_created")]
    m = (("model_name", MODEL_NAME),)
    assert samples[("strata:prompt_tokens_total", m)] == 3
    assert samples[("strata:generation_tokens_total", m)] == 3
    assert samples[("strata:request_success_total", (("finished_reason", "length"),) + m)] == 1
    assert samples[("strata:request_rejected_total", m + (("reason", "queue_full"),))] == 0
    assert samples[("strata:time_to_first_token_seconds_count", m)] == 1
    assert samples[("strata:inter_token_latency_seconds_count", m)] == 2
    assert samples[("strata:time_to_first_token_seconds_bucket", (("le", "+Inf"),) + m)] == 1


def test_two_server_metrics_in_one_process_stay_apart():
    from strata.serve.metrics import ServerMetrics

    a, b = ServerMetrics("a", 64), ServerMetrics("b", 64)   # one shared registry would refuse the second
    a.on_rejected("queue_full")
    a.on_rejected("queue_full")
    _, sa = parse(a.render(None))
    _, sb = parse(b.render(None))
    assert sa[("strata:request_rejected_total", (("model_name", "a"), ("reason", "queue_full")))] == 2
    assert sb[("strata:request_rejected_total", (("model_name", "b"), ("reason", "queue_full")))] == 0
    assert ("strata:num_requests_running", (("model_name", "a"),)) not in sa   # no engine, no engine gauges


def test_two_routers_in_one_process_stay_apart():
    from strata.router.config import build_config
    from strata.router.server import Router

    cfg = build_config(None, ["http://127.0.0.1:1@us", "http://127.0.0.1:2@eu"], {"region": "us"})
    one, two = Router(cfg), Router(cfg)
    one.m_requests.inc("us", "eu", "200", amount=2)
    one.m_latency.observe("eu", value=0.2)
    one.m_rejected.inc("queue_full")
    types, s1 = parse(one.metrics_text())
    _, s2 = parse(two.metrics_text())
    assert {k: types.get(k) for k in ROUTER_TYPES} == ROUTER_TYPES
    labels = (("client_region", "us"), ("served_region", "eu"), ("status", "200"))
    assert s1[("strata_router:requests_total", labels)] == 2 and ("strata_router:requests_total", labels) not in s2
    assert s1[("strata_router:request_latency_seconds_bucket", (("le", "0.25"), ("served_region", "eu")))] == 1
    assert s1[("strata_router:request_latency_seconds_bucket", (("le", "0.1"), ("served_region", "eu")))] == 0
    assert s1[("strata_router:request_latency_seconds_bucket", (("le", "1.0"), ("served_region", "eu")))] == 1
    assert s1[("strata_router:region_replicas", (("region", "eu"),))] == 1
    assert one.m_requests.total() == 2 and two.m_requests.total() == 0
    assert not [name for name, _ in s1 if name.endswith("_created")]


def test_router_process_metrics_parse(tmp_path):
    """A real router process: its /metrics is read by the official parser."""
    router = RouterProc(tmp_path, replicas=[f"http://127.0.0.1:{free_port()}@us"], args=["--region", "us"])
    router.start().wait_ready()
    try:
        assert httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": "x"},
                          headers={"x-strata-region": "mars"}, timeout=10).status_code == 400
        types, samples = parse(httpx.get(router.url + "/metrics", timeout=5).text)
    finally:
        router.stop()
    assert {k: types.get(k) for k in ROUTER_TYPES} == ROUTER_TYPES
    assert samples[("strata_router:region_replicas", (("region", "us"),))] == 1
    assert samples[("strata_router:requests_total",
                    (("client_region", "unknown"), ("served_region", ""), ("status", "400")))] == 1
