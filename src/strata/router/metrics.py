"""The router's Prometheus metrics (counters, histograms, gauges computed at scrape time) on `prometheus_client`,
each router with a registry of its own, and a reader for the replicas' own /metrics."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# No `<name>_created` series next to every counter and histogram: the exposition keeps the names it always had.
prometheus_client.disable_created_metrics()


class Counter:
    """A counter; label values are given positionally, in the order of `labels`."""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name, self.label_names = name, tuple(labels)
        self.collector = prometheus_client.Counter(name, help, self.label_names, registry=None)

    def inc(self, *labels, amount: float = 1.0) -> None:
        (self.collector.labels(*labels) if labels else self.collector).inc(amount)

    def total(self) -> float:
        """Sum over every label set."""
        return sum(s.value for m in self.collector.collect() for s in m.samples if s.name.endswith("_total"))


class Histogram:
    def __init__(self, name: str, help: str, labels: Iterable[str] = (), buckets=LATENCY_BUCKETS):
        self.name, self.label_names = name, tuple(labels)
        self.collector = prometheus_client.Histogram(name, help, self.label_names, buckets=buckets, registry=None)

    def observe(self, *labels, value: float) -> None:
        (self.collector.labels(*labels) if labels else self.collector).observe(value)


class Gauge:
    """Values computed at scrape time by a callback returning {label tuple: value}."""

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 fn: Callable[[], dict[tuple, float]] | None = None):
        self.name, self.help, self.label_names, self.fn = name, help, tuple(labels), fn
        self.collector = self

    def collect(self):
        g = GaugeMetricFamily(self.name, self.help, labels=self.label_names)
        for lv, v in sorted(self.fn().items()):
            g.add_metric([str(x) for x in lv], v)
        yield g


def registry_of(metrics: Iterable[Counter | Histogram | Gauge]) -> CollectorRegistry:
    """A registry of its own for one router (never prometheus_client's global one: routers in one process
    must not share metrics)."""
    reg = CollectorRegistry(auto_describe=False)
    for m in metrics:
        reg.register(m.collector)
    return reg


def render(registry: CollectorRegistry) -> str:
    """Prometheus text exposition format 0.0.4."""
    return generate_latest(registry).decode("utf-8")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample per sample name (labels dropped). Good enough for replica load gauges. A malformed
    line ends the reading; what came before it is kept."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not math.isnan(s.value):
                    out[s.name] = out.get(s.name, 0.0) + s.value
    except ValueError:
        pass
    return out


def replica_value(parsed: dict[str, float], key: str) -> float | None:
    """Look a replica metric up under strata's or vLLM's prefix (`strata:x`, `vllm:x`)."""
    for prefix in ("strata:", "vllm:"):
        v = parsed.get(prefix + key)
        if v is not None:
            return v
    return None
