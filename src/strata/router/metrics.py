"""A minimal Prometheus text-format metrics set (counters, gauges, histograms with labels), and a parser
for the replicas' own /metrics."""
from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_esc(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name = name
        self.help = help
        self.label_names = tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    kind = "counter"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.values: dict[tuple, float] = {}

    def inc(self, *labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels) -> float:
        return self.values.get(labels, 0.0)

    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> list[str]:
        out = self.header()
        for lv, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.label_names, lv)} {_fmt(v)}")
        return out


class Gauge(Metric):
    """Values computed at scrape time by a callback returning {label tuple: value}."""
    kind = "gauge"

    def __init__(self, name, help, labels=(), fn: Callable[[], dict[tuple, float]] | None = None):
        super().__init__(name, help, labels)
        self.fn = fn
        self.values: dict[tuple, float] = {}

    def set(self, *labels, value: float) -> None:
        self.values[labels] = value

    def render(self) -> list[str]:
        out = self.header()
        vals = self.fn() if self.fn else self.values
        for lv, v in sorted(vals.items()):
            out.append(f"{self.name}{_labels(self.label_names, lv)} {_fmt(v)}")
        return out


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name, help, labels=(), buckets=LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets)
        self.series: dict[tuple, list] = {}   # labels -> [counts per bucket..., sum, count]

    def observe(self, *labels, value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0] * len(self.buckets) + [0.0, 0]
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def quantile(self, q: float, *labels) -> float | None:
        """Bucket-resolution quantile (upper bound of the bucket holding it)."""
        s = self.series.get(labels)
        if not s or not s[-1]:
            return None
        target = q * s[-1]
        acc = 0
        for b, c in zip(self.buckets, s):
            acc += c
            if acc >= target:
                return b
        return math.inf

    def render(self) -> list[str]:
        out = self.header()
        for lv, s in sorted(self.series.items()):
            acc = 0
            for b, c in zip(self.buckets, s):
                acc += c
                le = 'le="' + _fmt(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, lv, le)} {acc}")
            le = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, lv, le)} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, lv)} {_fmt(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, lv)} {s[-1]}")
        return out


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for m in metrics:
        lines.extend(m.render())
    return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample per metric name (labels dropped). Good enough for replica load gauges."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace]
            rest = line[line.rfind("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            v = float(fields[0])
        except ValueError:
            continue
        if math.isnan(v):
            continue
        name = name.strip()
        out[name] = out.get(name, 0.0) + v
    return out


def replica_value(parsed: dict[str, float], key: str) -> float | None:
    """Look a replica metric up under strata's or vLLM's prefix (`strata:x`, `vllm:x`)."""
    for prefix in ("strata:", "vllm:"):
        v = parsed.get(prefix + key)
        if v is not None:
            return v
    return None
