"""Prometheus metrics under vLLM's names with the `strata:` prefix (text exposition format 0.0.4).

Gauges and engine counters (running/waiting, KV usage, preemptions, prefix cache) come from the engine's
stats snapshot at scrape time. Token totals and latency histograms are observed per request from the
timestamps `AsyncLLM` records (engine-thread clock at the end of the step that produced the token):
- prompt tokens are counted when a request's first token arrives (the prompt is then fully computed);
- generation tokens as they are delivered;
- TTFT once per request, inter-token latency once per output token after a completion's first,
  end-to-end / queue / prefill / decode / inference time once per finished request (aborts included; their
  `finished_reason` is "abort").
All updates happen on the event loop thread, so no locks.
"""
from __future__ import annotations

import bisect
import math

from strata.engine.async_llm import AsyncLLM, RequestTiming

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


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return f"{v}.0" if abs(v) < 1e16 else repr(float(v))
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += n
        self.sum += v * n
        self.count += n

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            lines.append(f'{self.name}_bucket{{{labels},le="{_fmt(b)}"}} {_fmt(acc)}')
        lines.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {_fmt(self.count)}')
        lines.append(f"{self.name}_sum{{{labels}}} {_fmt(self.sum)}")
        lines.append(f"{self.name}_count{{{labels}}} {_fmt(self.count)}")
        return lines


class ServerMetrics:
    """Observer of AsyncLLM timing + renderer of /metrics."""

    def __init__(self, model_name: str, max_model_len: int):
        self.model_name = model_name
        self.labels = f'model_name="{_escape(model_name)}"'
        tok_buckets = token_buckets(max(max_model_len, 1))
        H = Histogram
        self.ttft = H("strata:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                      TTFT_BUCKETS)
        self.itl = H("strata:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                     ITL_BUCKETS)
        self.tpot = H("strata:request_time_per_output_token_seconds",
                      "Histogram of time per output token (after the first) per request, in seconds.",
                      ITL_BUCKETS)
        self.e2e = H("strata:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                     REQUEST_LATENCY_BUCKETS)
        self.queue = H("strata:request_queue_time_seconds",
                       "Histogram of time spent waiting before first scheduled, in seconds.",
                       REQUEST_LATENCY_BUCKETS)
        self.inference = H("strata:request_inference_time_seconds",
                           "Histogram of time from first scheduled to last token, in seconds.",
                           REQUEST_LATENCY_BUCKETS)
        self.prefill = H("strata:request_prefill_time_seconds",
                         "Histogram of time from first scheduled to first token, in seconds.",
                         REQUEST_LATENCY_BUCKETS)
        self.decode = H("strata:request_decode_time_seconds",
                        "Histogram of time from first token to last token, in seconds.", REQUEST_LATENCY_BUCKETS)
        self.req_prompt = H("strata:request_prompt_tokens", "Number of prefill tokens processed per request.",
                            tok_buckets)
        self.req_gen = H("strata:request_generation_tokens", "Number of generation tokens processed per request.",
                         tok_buckets)
        self.req_max_tokens = H("strata:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                tok_buckets)
        self.req_n = H("strata:request_params_n", "Histogram of the n request parameter.",
                       (1.0, 2.0, 5.0, 10.0, 20.0))
        self.histograms = [self.ttft, self.itl, self.tpot, self.e2e, self.queue, self.inference, self.prefill,
                           self.decode, self.req_prompt, self.req_gen, self.req_max_tokens, self.req_n]
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0}
        self.rejected: dict[str, int] = {}

    # ---- AsyncLLM observer
    def on_first_token(self, t: RequestTiming, ttft: float) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens_total += t.num_prompt_tokens

    def on_inter_token(self, t: RequestTiming, seconds: float, num_tokens: int) -> None:
        self.itl.observe(seconds, num_tokens)

    def on_finished(self, t: RequestTiming) -> None:
        for r in t.finish_reasons:
            key = r or "abort"
            self.success[key] = self.success.get(key, 0) + 1
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
        self.generation_tokens_total += n

    def on_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    # ---- exposition
    def render(self, engine: AsyncLLM | None) -> str:
        L = self.labels
        s = engine.stats() if engine is not None else None
        lines: list[str] = []

        def gauge(name, help, v):
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name}{{{L}}} {_fmt(v)}"])

        def counter(name, help, v):
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name}{{{L}}} {_fmt(v)}"])

        if s is not None:
            gauge("strata:num_requests_running", "Number of requests in model execution batches.", s.num_running)
            gauge("strata:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting)
            gauge("strata:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", float(s.kv_cache_usage))
            gauge("strata:gpu_cache_usage_perc", "KV-cache usage (old name of strata:kv_cache_usage_perc).",
                  float(s.kv_cache_usage))
            counter("strata:num_preemptions_total", "Cumulative number of preemptions from the engine.",
                    s.num_preemptions_total)
            counter("strata:prefix_cache_queries_total",
                    "Prefix cache queries, in terms of number of queried tokens.", s.prefix_cache_queries_total)
            counter("strata:prefix_cache_hits_total",
                    "Prefix cache hits, in terms of number of cached tokens.", s.prefix_cache_hits_total)
            gauge("strata:engine_dead", "1 once the engine has died.", 1 if engine.is_dead else 0)
            gauge("strata:server_draining", "1 while the server drains for shutdown.", 1 if engine.is_draining else 0)
        counter("strata:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens_total)
        counter("strata:generation_tokens_total", "Number of generation tokens processed.",
                self.generation_tokens_total)
        name = "strata:request_success_total"
        lines.extend([f"# HELP {name} Count of finished requests by finish reason.", f"# TYPE {name} counter"])
        for reason, v in sorted(self.success.items()):
            lines.append(f'{name}{{{L},finished_reason="{reason}"}} {_fmt(v)}')
        name = "strata:request_rejected_total"
        lines.extend([f"# HELP {name} Requests refused before reaching the engine, by reason.",
                      f"# TYPE {name} counter"])
        for reason in sorted(set(self.rejected) | {"queue_full", "draining"}):
            lines.append(f'{name}{{{L},reason="{reason}"}} {_fmt(self.rejected.get(reason, 0))}')
        for h in self.histograms:
            lines.extend(h.render(L))
        return "\n".join(lines) + "\n"
