"""`strata router` (run the router) and `strata router status` (admin view of a running fleet).

No torch import here or anywhere under strata.router.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from strata import settings
from strata.router.config import POLICIES, ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "router", help="route OpenAI requests over a fleet of replicas (regions, health, failover)",
        description="Run the global-serving router, or `strata router status` to look at a running one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  strata router --config fleet.yaml --port 9000\n"
               "  strata router --replica http://10.0.0.5:8000@us-east --replica http://10.1.0.7:8000@eu-west"
               " --region us-east\n"
               "  strata router status --router http://localhost:9000")
    add_router_args(p)
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="router_command", metavar="{status}")
    s = sub.add_parser("status", help="show the fleet of a running router")
    s.add_argument("--router", default=settings.ROUTER_URL.get(),
                   help="router URL (default: $STRATA_ROUTER_URL or http://127.0.0.1:9000)")
    s.add_argument("--router-key", default=None, help="router key (default: $STRATA_ROUTER_KEY)")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(func=_status)


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="fleet YAML (replicas, regions and RTT matrix, health, retry, queue)")
    p.add_argument("--replica", action="append", default=[], metavar="URL[@REGION]",
                   help="a replica, repeatable (e.g. http://10.0.0.5:8000@us-east)")
    p.add_argument("--host", default=None, help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 9000)")
    p.add_argument("--region", default=None, help="the router's region: clients without a region header "
                                                  "are served from here first")
    p.add_argument("--policy", default=None, choices=POLICIES, help="routing policy (default least_outstanding)")
    p.add_argument("--inner-policy", default=None, help="policy inside a region for region_aware / "
                                                        "session_affinity (default least_outstanding)")
    p.add_argument("--router-key", default=None,
                   help="shared secret replicas present to /register (default: $STRATA_ROUTER_KEY; "
                        "without one, registration is off)")
    p.add_argument("--api-key", default=None, help="require this Bearer key from clients on /v1/*")
    p.add_argument("--queue-size", type=int, default=None, help="requests that may wait for a replica (1024)")
    p.add_argument("--queue-timeout", type=float, default=None, help="seconds a request may wait (30)")
    p.add_argument("--max-attempts", type=int, default=None, help="tries per request before the first byte (4)")
    p.add_argument("--max-outstanding", type=int, default=None,
                   help="requests in flight per replica before it counts as saturated (0: no limit)")
    p.add_argument("--health-interval", type=float, default=None, help="seconds between /health probes (2)")
    p.add_argument("--log-level", default="INFO")


def args_to_overrides(args) -> dict:
    return {"host": args.host, "port": args.port, "region": args.region, "policy": args.policy,
            "inner_policy": args.inner_policy, "router_key": args.router_key, "api_key": args.api_key,
            "queue_max_size": args.queue_size, "queue_timeout_s": args.queue_timeout,
            "max_attempts": args.max_attempts, "max_outstanding_per_replica": args.max_outstanding,
            "health_interval_s": args.health_interval,
            "metrics_interval_s": args.health_interval}


def _run(args) -> int:
    import logging

    from strata.router.config import build_config

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_config(args.config, args.replica, args_to_overrides(args))
    except ConfigError as e:
        print(f"strata router: error: {e}", file=sys.stderr)
        return 2
    if not cfg.replicas and not cfg.router_key:
        print("strata router: error: no replicas (--config / --replica) and no --router-key for replicas to "
              "register with", file=sys.stderr)
        return 2
    from strata.router.server import run_router

    run_router(cfg)
    return 0


def fetch_status(router: str, key: str | None = None, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(router.rstrip("/") + "/admin/fleet")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def format_status(view: dict) -> str:
    lines = [f"router region {view['router_region']}  policy {view['policy']}"
             + (f" (inner {view['inner_policy']})" if view.get("inner_policy") else "")
             + f"  uptime {view['uptime_s']:.0f}s  queue {view['queue_depth']}"]
    t = view["totals"]
    lines.append(f"requests {t['requests']:.0f}  retries {t['retries']:.0f}  failovers {t['failovers']:.0f}  "
                 f"spills {t['spills']:.0f}  rejected {t['rejected']:.0f}")
    lines.append("")
    lines.append(f"{'REGION':<14}{'ROUTABLE':>9}  RTT ms")
    for g, info in view["regions"].items():
        rtts = ", ".join(f"{h} {v:g}" for h, v in info["rtt_ms"].items() if v is not None) or "-"
        lines.append(f"{g:<14}{info['routable']:>4}/{info['replicas']:<4}  {rtts}")
    lines.append("")
    hdr = (f"{'REPLICA':<28}{'REGION':<12}{'STATE':<10}{'BREAKER':<10}{'OUT':>5}{'RUN':>6}{'WAIT':>6}"
           f"{'KV%':>6}{'HIT%':>6}{'RTTms':>8}{'REQS':>8}{'FAILS':>7}  MODELS")
    lines.append(hdr)
    for r in view["replicas"]:
        state = "draining" if r["draining"] else ("up" if r["healthy"] else "down")
        hit = "-" if r["prefix_cache_hit_rate"] is None else f"{100 * r['prefix_cache_hit_rate']:.0f}"
        rtt = "-" if r["probe_rtt_ms"] is None else f"{r['probe_rtt_ms']:.1f}"
        name = r["url"].split("://", 1)[-1]
        lines.append(f"{name:<28}{r['region']:<12}{state:<10}{r['breaker']:<10}{r['outstanding']:>5}"
                     f"{r['replica_running']:>6.0f}{r['replica_waiting']:>6.0f}{100 * r['kv_cache_usage']:>6.0f}"
                     f"{hit:>6}{rtt:>8}{r['requests_total']:>8}{r['failures_total']:>7}  "
                     f"{','.join(r['models']) or '?'}")
    if not view["replicas"]:
        lines.append("(no replicas)")
    return "\n".join(lines)


def _status(args) -> int:
    key = args.router_key or settings.ROUTER_KEY.get() or None
    try:
        view = fetch_status(args.router, key)
    except urllib.error.HTTPError as e:
        print(f"strata router status: {args.router} answered HTTP {e.code}: {e.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"strata router status: cannot reach {args.router}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    print(json.dumps(view, indent=2) if args.json else format_status(view))
    return 0


def main(argv: list[str] | None = None) -> int:
    from strata.core.cliutil import Parser  # torch-free, like everything the router imports

    parser = Parser(prog="strata")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["router", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)
