"""Router configuration: a YAML fleet file and/or `--replica URL@REGION` flags, validated up front.

Every mistake raises `ConfigError` with a message that names the offending key or replica, so a bad
file never produces a half-configured router.

Fleet file (all keys optional except `replicas` entries' `url`)::

    region: us-east                 # the router's own region (clients without a region header)
    policy: region_aware            # round_robin | least_outstanding | power_of_two | cache_aware
                                    # | session_affinity | region_aware
    inner_policy: cache_aware       # what region_aware / session_affinity use inside a region
    regions:                        # declared regions with their round-trip times in ms (symmetric)
      us-east: {eu-west: 75, ap-south: 190}
      eu-west: {ap-south: 120}
      ap-south: {}
    replicas:
      - {url: http://10.0.0.5:8000, region: us-east, weight: 2}
      - {url: http://10.1.0.7:8000, region: eu-west, model: SmolLM2-135M-Instruct}
    health: {interval_s: 2, timeout_s: 1, metrics_interval_s: 2, failure_threshold: 3, open_s: 5}
    retry: {max_attempts: 4, backoff_base_s: 0.05, backoff_max_s: 1.0, max_failovers: 3}
    queue: {max_size: 1024, timeout_s: 30, retry_after_s: 2}
    limits: {max_outstanding_per_replica: 0, saturation_waiting: 0}   # 0: no limit
    cache_aware: {block_chars: 64, balance_abs: 16, balance_rel: 1.5, max_entries: 200000}
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from strata import settings

POLICIES = ("round_robin", "least_outstanding", "power_of_two", "cache_aware", "session_affinity",
            "region_aware")
DEFAULT_REGION = "default"


class ConfigError(ValueError):
    """A fleet file or flag that cannot be used; the message says which and why."""


@dataclass
class ReplicaSpec:
    url: str
    region: str = DEFAULT_REGION
    weight: float = 1.0
    model: str | None = None
    max_outstanding: int = 0          # 0: the router-wide limit (or none)


@dataclass
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 9000
    region: str | None = None                  # router's own region; None: first replica's region
    policy: str = "least_outstanding"
    inner_policy: str = "least_outstanding"
    router_key: str | None = None              # guards /register, /heartbeat, /deregister, /admin
    api_key: str | None = None                 # if set, clients must send it on /v1/*
    replicas: list[ReplicaSpec] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)       # declared regions (strict when non-empty)
    rtt_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    region_header: str = "x-strata-region"
    session_header: str = "x-session-id"
    # health
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    metrics_interval_s: float = 2.0
    failure_threshold: int = 3
    open_s: float = 5.0
    open_max_s: float = 60.0
    heartbeat_ttl_s: float = 15.0              # registered replicas that heartbeat and then stop
    remove_after_s: float = 60.0               # registered replicas unreachable this long are dropped
    # retries / failover
    max_attempts: int = 4
    backoff_base_s: float = 0.05
    backoff_max_s: float = 1.0
    max_failovers: int = 3
    connect_timeout_s: float = 3.0
    stream_idle_timeout_s: float = 60.0        # no byte from a streaming replica this long = failed
    request_timeout_s: float = 600.0           # whole non-streaming request
    # admission
    queue_max_size: int = 1024
    queue_timeout_s: float = 30.0
    retry_after_s: float = 2.0
    max_outstanding_per_replica: int = 0       # 0: unlimited
    saturation_waiting: int = 0                # replica-reported waiting queue that counts as saturated (0: off)
    # cache-aware
    cache_block_chars: int = 64
    cache_balance_abs: float = 16.0
    cache_balance_rel: float = 1.5
    cache_max_entries: int = 200_000
    seed: int | None = None

    # ---- derived ----
    def known_regions(self) -> set[str]:
        out = set(self.regions)
        out.update(self.rtt_ms)
        for row in self.rtt_ms.values():
            out.update(row)
        out.update(r.region for r in self.replicas)
        if self.region:
            out.add(self.region)
        return out

    def strict_regions(self) -> bool:
        return bool(self.regions)

    def rtt(self, a: str, b: str) -> float:
        """Round-trip time between regions in ms; 0 within a region; inf when unknown."""
        if a == b:
            return 0.0
        v = self.rtt_ms.get(a, {}).get(b)
        if v is None:
            v = self.rtt_ms.get(b, {}).get(a)
        return math.inf if v is None else float(v)


# ---------------------------------------------------------------------------------------------- parsing

def normalize_url(url: str, *, what: str = "replica url") -> str:
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{what}: expected a URL like http://host:8000, got {url!r}")
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{what} {url!r}: must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"{what} {url!r}: no host")
    try:
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{what} {url!r}: bad port ({e})") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"{what} {url!r}: must not carry a query or fragment")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{netloc}{path}"


def parse_replica_flag(text: str, default_region: str | None = None) -> ReplicaSpec:
    """`http://host:8000@us-east` (region after the last '@'); without '@' the router's region."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--replica: empty value")
    text = text.strip()
    region = default_region or DEFAULT_REGION
    scheme_end = text.find("://")
    at = text.rfind("@")
    if at > scheme_end >= 0:
        url, region = text[:at], text[at + 1:].strip()
        if not region:
            raise ConfigError(f"--replica {text!r}: empty region after '@'")
    else:
        url = text
    return ReplicaSpec(url=normalize_url(url, what="--replica"), region=region)


_SECTIONS: dict[str, dict[str, str]] = {
    # section -> {yaml key: RouterConfig field}
    "health": {"interval_s": "health_interval_s", "timeout_s": "health_timeout_s",
               "metrics_interval_s": "metrics_interval_s", "failure_threshold": "failure_threshold",
               "open_s": "open_s", "open_max_s": "open_max_s", "heartbeat_ttl_s": "heartbeat_ttl_s",
               "remove_after_s": "remove_after_s"},
    "retry": {"max_attempts": "max_attempts", "backoff_base_s": "backoff_base_s",
              "backoff_max_s": "backoff_max_s", "max_failovers": "max_failovers",
              "connect_timeout_s": "connect_timeout_s", "stream_idle_timeout_s": "stream_idle_timeout_s",
              "request_timeout_s": "request_timeout_s"},
    "queue": {"max_size": "queue_max_size", "timeout_s": "queue_timeout_s", "retry_after_s": "retry_after_s"},
    "limits": {"max_outstanding_per_replica": "max_outstanding_per_replica",
               "saturation_waiting": "saturation_waiting"},
    "cache_aware": {"block_chars": "cache_block_chars", "balance_abs": "cache_balance_abs",
                    "balance_rel": "cache_balance_rel", "max_entries": "cache_max_entries"},
}
_TOP = {"host", "port", "region", "policy", "inner_policy", "router_key", "router_key_env", "api_key",
        "api_key_env", "replicas", "regions", "region_header", "session_header", "seed"}


def _num(value: Any, where: str, *, integer: bool = False, minimum: float | None = 0.0) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if integer and int(value) != value:
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)


def config_from_dict(data: Any, *, source: str = "config") -> RouterConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    unknown = set(data) - _TOP - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"known: {', '.join(sorted(_TOP | set(_SECTIONS)))}")
    cfg = RouterConfig()
    for key in ("host", "region", "policy", "inner_policy", "region_header", "session_header"):
        if key in data and data[key] is not None:
            if not isinstance(data[key], str) or not data[key].strip():
                raise ConfigError(f"{source}: '{key}' must be a non-empty string, got {data[key]!r}")
            setattr(cfg, key, data[key].strip())
    if "port" in data:
        cfg.port = _num(data["port"], f"{source}: port", integer=True, minimum=0)
    if "seed" in data and data["seed"] is not None:
        cfg.seed = _num(data["seed"], f"{source}: seed", integer=True, minimum=None)
    for key, env_key, attr in (("router_key", "router_key_env", "router_key"), ("api_key", "api_key_env", "api_key")):
        if data.get(key) is not None:
            cfg.__dict__[attr] = str(data[key])
        if data.get(env_key):
            val = os.environ.get(str(data[env_key]))
            if not val:
                raise ConfigError(f"{source}: {env_key} names ${data[env_key]}, which is not set")
            cfg.__dict__[attr] = val
    # regions + RTT matrix
    regions = data.get("regions")
    if regions is not None:
        if isinstance(regions, list):
            for r in regions:
                if not isinstance(r, str) or not r:
                    raise ConfigError(f"{source}: regions: expected region names, got {r!r}")
            cfg.regions = list(regions)
        elif isinstance(regions, dict):
            cfg.regions = [str(r) for r in regions]
            for a, row in regions.items():
                if row is None:
                    row = {}
                if not isinstance(row, dict):
                    raise ConfigError(f"{source}: regions.{a}: expected a mapping region -> RTT ms, got {row!r}")
                for b, ms in row.items():
                    ms = _num(ms, f"{source}: regions.{a}.{b} (RTT ms)")
                    cfg.rtt_ms.setdefault(str(a), {})[str(b)] = ms
            for a, row in cfg.rtt_ms.items():
                for b in row:
                    if b not in regions:
                        raise ConfigError(f"{source}: regions.{a}.{b}: unknown region {b!r}; "
                                          f"declared: {', '.join(cfg.regions)}")
                    other = cfg.rtt_ms.get(b, {}).get(a)
                    if other is not None and other != row[b]:
                        raise ConfigError(f"{source}: RTT {a}<->{b} given twice with different values "
                                          f"({row[b]:g} and {other:g} ms)")
        else:
            raise ConfigError(f"{source}: regions must be a list or a mapping, got {type(regions).__name__}")
    for section, mapping in _SECTIONS.items():
        sec = data.get(section)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise ConfigError(f"{source}: '{section}' must be a mapping, got {sec!r}")
        bad = set(sec) - set(mapping)
        if bad:
            raise ConfigError(f"{source}: {section}: unknown key(s) {', '.join(sorted(map(str, bad)))}; "
                              f"known: {', '.join(sorted(mapping))}")
        for k, attr in mapping.items():
            if k in sec:
                integer = isinstance(getattr(cfg, attr), int) and not isinstance(getattr(cfg, attr), bool)
                setattr(cfg, attr, _num(sec[k], f"{source}: {section}.{k}", integer=integer))
    reps = data.get("replicas") or []
    if not isinstance(reps, list):
        raise ConfigError(f"{source}: replicas must be a list, got {type(reps).__name__}")
    for i, item in enumerate(reps):
        where = f"{source}: replicas[{i}]"
        if isinstance(item, str):
            cfg.replicas.append(parse_replica_flag(item, cfg.region))
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with 'url', got {item!r}")
        bad = set(item) - {"url", "region", "weight", "model", "max_outstanding"}
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, bad)))}")
        if "url" not in item:
            raise ConfigError(f"{where}: missing 'url'")
        spec = ReplicaSpec(url=normalize_url(item["url"], what=f"{where}.url"),
                           region=str(item.get("region") or cfg.region or DEFAULT_REGION))
        if "weight" in item:
            spec.weight = _num(item["weight"], f"{where}.weight")
            if spec.weight <= 0:
                raise ConfigError(f"{where}.weight: must be > 0")
        if item.get("model") is not None:
            spec.model = str(item["model"])
        if "max_outstanding" in item:
            spec.max_outstanding = _num(item["max_outstanding"], f"{where}.max_outstanding", integer=True)
        cfg.replicas.append(spec)
    return cfg


def load_config_file(path: str) -> RouterConfig:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read fleet config {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    return config_from_dict(data, source=path)


def validate(cfg: RouterConfig) -> RouterConfig:
    """Checks that need the whole config (after flags were merged in)."""
    if cfg.policy not in POLICIES:
        raise ConfigError(f"unknown policy {cfg.policy!r}; choose one of {', '.join(POLICIES)}")
    if cfg.inner_policy not in POLICIES or cfg.inner_policy in ("region_aware", "session_affinity"):
        raise ConfigError(f"unknown inner_policy {cfg.inner_policy!r}; choose one of "
                          f"round_robin, least_outstanding, power_of_two, cache_aware")
    if cfg.region is None:
        if cfg.regions:
            cfg.region = cfg.regions[0]
        elif cfg.replicas:
            cfg.region = cfg.replicas[0].region
        else:
            cfg.region = DEFAULT_REGION
    if cfg.strict_regions():
        declared = set(cfg.regions)
        if cfg.region not in declared:
            raise ConfigError(f"router region {cfg.region!r} is not among the declared regions "
                              f"({', '.join(cfg.regions)})")
        for spec in cfg.replicas:
            if spec.region not in declared:
                raise ConfigError(f"replica {spec.url}: unknown region {spec.region!r}; declared regions: "
                                  f"{', '.join(cfg.regions)}")
    seen: dict[str, ReplicaSpec] = {}
    for spec in cfg.replicas:
        if spec.url in seen:
            raise ConfigError(f"duplicate replica {spec.url} (regions {seen[spec.url].region!r} and "
                              f"{spec.region!r}); each replica may appear once")
        seen[spec.url] = spec
    if cfg.max_attempts < 1:
        raise ConfigError("retry.max_attempts must be >= 1")
    if cfg.failure_threshold < 1:
        raise ConfigError("health.failure_threshold must be >= 1")
    if cfg.health_interval_s <= 0 or cfg.health_timeout_s <= 0:
        raise ConfigError("health.interval_s and health.timeout_s must be > 0")
    if cfg.cache_block_chars < 1:
        raise ConfigError("cache_aware.block_chars must be >= 1")
    return cfg


def build_config(config_path: str | None = None, replica_flags: list[str] | None = None,
                 overrides: dict[str, Any] | None = None) -> RouterConfig:
    cfg = load_config_file(config_path) if config_path else RouterConfig()
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if not hasattr(cfg, k):
            raise ConfigError(f"unknown setting {k}")
        setattr(cfg, k, v)
    for flag in replica_flags or []:
        cfg.replicas.append(parse_replica_flag(flag, cfg.region))
    if cfg.router_key is None and settings.ROUTER_KEY.get():
        cfg.router_key = settings.ROUTER_KEY.get()
    return validate(cfg)


def config_as_dict(cfg: RouterConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for k in ("router_key", "api_key"):
        if d.get(k):
            d[k] = "***"
    return d
