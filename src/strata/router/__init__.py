"""Global-serving router: one OpenAI endpoint over many replicas in many regions.

Region-aware and cache-aware routing, health probes and circuit breakers, retries that queue instead of
failing, and streams that survive a replica dying. Never imports torch.
"""
from strata.router.config import ConfigError, ReplicaSpec, RouterConfig, build_config

__all__ = ["ConfigError", "ReplicaSpec", "RouterConfig", "build_config"]
