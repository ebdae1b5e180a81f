"""Prometheus metrics under vLLM's names with the `strata:` prefix, on `prometheus_client` (text exposition
format 0.0.4), each server with a registry of its own.

Gauges and engine counters (running/waiting, KV usage, preemptions, prefix cache) come from the engine's
stats snapshot at scrape time. Token totals and latency histograms are observed per request from the
timestamps `AsyncLLM` records (engine-thread clock at the end of the step that produced the token):
- prompt tokens are counted when a request's first token arrives (the prompt is then fully computed);
- generation tokens as they are delivered;
- TTFT once per request, inter-token latency once per output token after a completion's first,
  end-to-end / queue / prefill / decode / inference time once per finished request (aborts included; their
  `finished_reason` is "abort").
"""
from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from strata.engine.async_llm import AsyncLLM, RequestTiming

# No `<name>_created` series next to every counter and histogram (vLLM's names only).
prometheus_client.disable_created_metrics()

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value."""
    out, e = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if v > max_value:
                return tuple(float(x) for x in out)
            out.append(v)
        e += 1


class _EngineStats:
    """Collector of the engine's own gauges and counters, read from its stats snapshot at scrape time."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.engine: AsyncLLM | None = None

    def collect(self):
        engine = self.engine
        if engine is None:
            return
        s = engine.stats()

        def family(kind, name, help, v):
            f = kind(name, help, labels=["model_name"])
            f.add_metric([self.model_name], v)
            return f

        G, C = GaugeMetricFamily, CounterMetricFamily
        yield family(G, "strata:num_requests_running", "Number of requests in model execution batches.",
                     s.num_running)
        yield family(G, "strata:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting)
        yield family(G, "strata:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     float(s.kv_cache_usage))
        yield family(G, "strata:gpu_cache_usage_perc", "KV-cache usage (old name of strata:kv_cache_usage_perc).",
                     float(s.kv_cache_usage))
        yield family(C, "strata:num_preemptions_total", "Cumulative number of preemptions from the engine.",
                     s.num_preemptions_total)
        yield family(C, "strata:prefix_cache_queries_total",
                     "Prefix cache queries, in terms of number of queried tokens.", s.prefix_cache_queries_total)
        yield family(C, "strata:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.",
                     s.prefix_cache_hits_total)
        yield family(G, "strata:engine_dead", "1 once the engine has died.", 1 if engine.is_dead else 0)
        yield family(G, "strata:server_draining", "1 while the server drains for shutdown.",
                     1 if engine.is_draining else 0)


class ServerMetrics:
    """Observer of AsyncLLM timing + renderer of /metrics."""

    def __init__(self, model_name: str, max_model_len: int):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=False)
        self._engine_stats = _EngineStats(model_name)
        self.registry.register(self._engine_stats)
        reg, label = self.registry, [model_name]

        def counter(name, help, extra=None, values=()):
            c = prometheus_client.Counter(name, help, ["model_name"] + ([extra] if extra else []), registry=reg)
            for v in values:  # series shown (at 0) before anything happened
                c.labels(model_name, v)
            return c if extra else c.labels(*label)

        def hist(name, help, buckets):
            return prometheus_client.Histogram(name, help, ["model_name"], buckets=buckets, registry=reg).labels(*label)

        self.prompt_tokens = counter("strata:prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = counter("strata:generation_tokens_total", "Number of generation tokens processed.")
        self.success = counter("strata:request_success_total", "Count of finished requests by finish reason.",
                               "finished_reason", ("abort", "error", "length", "stop"))
        self.rejected = counter("strata:request_rejected_total",
                                "Requests refused before reaching the engine, by reason.", "reason",
                                ("draining", "queue_full"))
        tok_buckets = token_buckets(max(max_model_len, 1))
        self.ttft = hist("strata:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = hist("strata:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS)
        self.tpot = hist("strata:request_time_per_output_token_seconds",
                         "Histogram of time per output token (after the first) per request, in seconds.",
                         ITL_BUCKETS)
        self.e2e = hist("strata:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue = hist("strata:request_queue_time_seconds",
                          "Histogram of time spent waiting before first scheduled, in seconds.",
                          REQUEST_LATENCY_BUCKETS)
        self.inference = hist("strata:request_inference_time_seconds",
                              "Histogram of time from first scheduled to last token, in seconds.",
                              REQUEST_LATENCY_BUCKETS)
        self.prefill = hist("strata:request_prefill_time_seconds",
                            "Histogram of time from first scheduled to first token, in seconds.",
                            REQUEST_LATENCY_BUCKETS)
        self.decode = hist("strata:request_decode_time_seconds",
                           "Histogram of time from first token to last token, in seconds.", REQUEST_LATENCY_BUCKETS)
        self.req_prompt = hist("strata:request_prompt_tokens", "Number of prefill tokens processed per request.",
                               tok_buckets)
        self.req_gen = hist("strata:request_generation_tokens",
                            "Number of generation tokens processed per request.", tok_buckets)
        self.req_max_tokens = hist("strata:request_params_max_tokens",
                                   "Histogram of the max_tokens request parameter.", tok_buckets)
        self.req_n = hist("strata:request_params_n", "Histogram of the n request parameter.",
                          (1.0, 2.0, 5.0, 10.0, 20.0))

    # ---- AsyncLLM observer
    def on_first_token(self, t: RequestTiming, ttft: float) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(t.num_prompt_tokens)

    def on_inter_token(self, t: RequestTiming, seconds: float, num_tokens: int) -> None:
        for _ in range(num_tokens):  # one observation per token
            self.itl.observe(seconds)

    def on_finished(self, t: RequestTiming) -> None:
        for r in t.finish_reasons:
            self.success.labels(self.model_name, r or "abort").inc()
        end = t.finished_time if t.finished_time is not None else t.last_token_time
        if end is not None:
            self.e2e.observe(max(0.0, end - t.arrival_time))
        if t.first_token_time is None:
            return  # aborted before its first token: no token-level figures
        sched = t.first_scheduled_time if t.first_scheduled_time is not None else t.first_token_time
        self.queue.observe(max(0.0, sched - t.arrival_time))
        self.prefill.observe(max(0.0, t.first_token_time - sched))
        last = t.last_token_time or t.first_token_time
        self.decode.observe(max(0.0, last - t.first_token_time))
        self.inference.observe(max(0.0, last - sched))
        self.req_prompt.observe(t.num_prompt_tokens)
        self.req_gen.observe(t.num_generation_tokens)
        n_out = t.num_generation_tokens / max(1, len(t.finish_reasons))
        if n_out > 1:
            self.tpot.observe((last - t.first_token_time) / (n_out - 1))
        if t.params.max_tokens is not None:
            self.req_max_tokens.observe(t.params.max_tokens)
        self.req_n.observe(t.params.n)

    def on_tokens(self, t: RequestTiming, n: int) -> None:
        self.generation_tokens.inc(n)

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    # ---- exposition
    def render(self, engine: AsyncLLM | None) -> str:
        """Text exposition format 0.0.4; the engine's gauges are read now (none without an engine)."""
        self._engine_stats.engine = engine
        return generate_latest(self.registry).decode("utf-8")
