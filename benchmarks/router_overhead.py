"""Router overhead, measured side by side in one run (CPU, loopback, real processes):

1. latency added by the router at a fixed open-loop rate (default 500 requests/s) against replicas that
   answer instantly: the same request stream is sent straight to a replica and through the router, in
   alternating phases, and the percentiles are compared;
2. concurrent streams (default 2,000) held open through the router at once, each checked token for token,
   with the router's resident memory and CPU time.

    python benchmarks/router_overhead.py [--rate 500] [--seconds 8] [--streams 2000] [--json out.json]

Uses the instant fake replica from tests/router_support (no model), so it measures the router only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "router_support" / "fake_replica.py"
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, log):
    return subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def wait_ready(url: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(url)


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def proc_stats(pid: int) -> dict:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024.0   # MiB
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tck
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


async def open_loop(session, url: str, rate: float, seconds: float, body: bytes) -> dict:
    """Send requests at fixed intervals regardless of completions; record each latency."""
    lat: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    t0 = loop.time() + 0.05
    tasks = []

    async def one(due):
        nonlocal errors
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.perf_counter()
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
        except aiohttp.ClientError:
            errors += 1
            return
        lat.append(time.perf_counter() - t)

    for i in range(n):
        tasks.append(asyncio.create_task(one(t0 + i / rate)))
    await asyncio.gather(*tasks)
    wall = loop.time() - t0
    return {"n": n, "errors": errors, "achieved_rps": len(lat) / wall, "lat": lat}


async def overhead(direct: str, routed: str, rate: float, seconds: float, rounds: int, router_pid: int) -> dict:
    body = json.dumps({"prompt": "ping", "max_tokens": 4}).encode()
    conn = aiohttp.TCPConnector(limit=0)
    res = {"direct": [], "router": []}
    errs = {"direct": 0, "router": 0}
    router_cpu = 0.0
    async with aiohttp.ClientSession(connector=conn) as s:
        # warm-up (connections, caches)
        for url in (direct, routed):
            await open_loop(s, url + "/v1/completions", rate / 2, 1.0, body)
        for _ in range(rounds):
            for name, url in (("direct", direct), ("router", routed)):
                c0 = proc_stats(router_pid).get("cpu_s", 0.0)
                r = await open_loop(s, url + "/v1/completions", rate, seconds, body)
                if name == "router":
                    router_cpu += proc_stats(router_pid).get("cpu_s", 0.0) - c0
                res[name].extend(r["lat"])
                errs[name] += r["errors"]
    out = {}
    for name, lat in res.items():
        out[name] = {"requests": len(lat), "errors": errs[name], "p50_ms": 1e3 * pct(lat, 50),
                     "p90_ms": 1e3 * pct(lat, 90), "p99_ms": 1e3 * pct(lat, 99),
                     "mean_ms": 1e3 * statistics.fmean(lat)}
    out["added_p50_ms"] = out["router"]["p50_ms"] - out["direct"]["p50_ms"]
    out["added_p99_ms"] = out["router"]["p99_ms"] - out["direct"]["p99_ms"]
    out["router_cpu_us_per_request"] = 1e6 * router_cpu / max(1, len(res["router"]))
    return out


async def streams(routed: str, n: int, tokens: int, ramp_s: float, router_pid: int) -> dict:
    from router_support.fake_replica import Replica

    conn = aiohttp.TCPConnector(limit=0)
    ok = 0
    bad = []
    ttft: list[float] = []
    live = 0
    peak = 0
    peak_stats = {}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    timeout = aiohttp.ClientTimeout(total=600)

    async def one(i):
        nonlocal ok, live, peak
        await asyncio.sleep(ramp_s * i / n)
        prompt = f"stream {i}"
        want = "".join(Replica.tokens(prompt, tokens))
        text = ""
        t = time.perf_counter()
        first = None
        try:
            async with s.post(routed + "/v1/completions", json={"prompt": prompt, "max_tokens": tokens,
                                                                "stream": True}) as r:
                live += 1
                peak = max(peak, live)
                buf = b""
                async for chunk in r.content.iter_any():
                    if first is None:
                        first = time.perf_counter() - t
                    buf += chunk
                    while b"\n\n" in buf:
                        ev, buf = buf.split(b"\n\n", 1)
                        if ev.startswith(b"data: {"):
                            text += json.loads(ev[6:])["choices"][0]["text"]
                live -= 1
        except aiohttp.ClientError as e:
            bad.append(f"{type(e).__name__}: {e}")
            return
        if text == want:
            ok += 1
            ttft.append(first)
        else:
            bad.append(f"text mismatch on {i}")

    async def sampler():
        nonlocal peak_stats
        while True:
            await asyncio.sleep(0.5)
            st = proc_stats(router_pid)
            if live >= peak and st:
                peak_stats = {**st, "live_streams": live}

    cpu0 = proc_stats(router_pid).get("cpu_s", 0.0)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        samp = asyncio.create_task(sampler())
        await asyncio.gather(*(one(i) for i in range(n)))
        samp.cancel()
    wall = loop.time() - t0
    end = proc_stats(router_pid)
    return {"streams": n, "completed_exact": ok, "failed": len(bad), "first_errors": bad[:3],
            "peak_concurrent": peak, "wall_s": wall, "ttft_p50_ms": 1e3 * pct(ttft, 50),
            "ttft_p99_ms": 1e3 * pct(ttft, 99), "router_rss_at_peak_mib": peak_stats.get("VmRSS"),
            "router_fds_at_peak": peak_stats.get("fds"), "router_peak_rss_mib": end.get("VmHWM"),
            "router_cpu_s": end.get("cpu_s", 0.0) - cpu0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--stream-tokens", type=int, default=40)
    ap.add_argument("--token-delay", type=float, default=0.25, help="seconds between tokens in the stream test")
    ap.add_argument("--ramp", type=float, default=4.0, help="seconds over which the streams are opened")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--logdir", default="/tmp")
    a = ap.parse_args()

    procs = []
    try:
        ports = [free_port() for _ in range(a.replicas)]
        for p in ports:
            procs.append(start([sys.executable, str(FAKE), "--port", str(p)], f"{a.logdir}/bench-replica-{p}.log"))
        rport = free_port()
        router = start([sys.executable, "-m", "strata.router", "--host", "127.0.0.1", "--port", str(rport),
                        "--log-level", "WARNING", *sum((["--replica", f"http://127.0.0.1:{p}"] for p in ports), [])],
                       f"{a.logdir}/bench-router.log")
        procs.append(router)
        routed = f"http://127.0.0.1:{rport}"
        direct = f"http://127.0.0.1:{ports[0]}"

        async def go():
            for p in ports:
                await wait_ready(f"http://127.0.0.1:{p}/health")
            await wait_ready(routed + "/health")
            res = {"overhead": await overhead(direct, routed, a.rate, a.seconds, a.rounds, router.pid)}
            # the stream test: slow the replicas down so that every stream stays open at once
            async with aiohttp.ClientSession() as s:
                for p in ports:
                    async with s.post(f"http://127.0.0.1:{p}/_control", json={"token_delay": a.token_delay}):
                        pass
            res["streams"] = await streams(routed, a.streams, a.stream_tokens, a.ramp, router.pid)
            return res

        res = asyncio.run(go())
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    res["setup"] = {"rate_rps": a.rate, "seconds_per_phase": a.seconds, "rounds": a.rounds,
                    "replicas": a.replicas, "stream_tokens": a.stream_tokens, "token_delay_s": a.token_delay,
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg(), "host": platform.node(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        banner = Path(f"{a.logdir}/bench-router.log").read_text().splitlines()[0]
        res["setup"]["router_loop"] = banner.rsplit("loop=", 1)[1].strip()
    except (OSError, IndexError):
        pass
    o, s = res["overhead"], res["streams"]
    print(f"host {platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, router loop "
          f"{res['setup'].get('router_loop')}")
    print(f"open loop at {a.rate:.0f} req/s, {a.rounds} x {a.seconds:.0f} s per side, alternating:")
    for k in ("direct", "router"):
        v = o[k]
        print(f"  {k:<7} n={v['requests']:>5} errors={v['errors']}  p50 {v['p50_ms']:.2f} ms  "
              f"p90 {v['p90_ms']:.2f} ms  p99 {v['p99_ms']:.2f} ms")
    print(f"  added by the router: p50 {o['added_p50_ms']:.2f} ms, p99 {o['added_p99_ms']:.2f} ms; router CPU "
          f"{o['router_cpu_us_per_request']:.0f} us per request")
    print(f"{s['streams']} streams of {a.stream_tokens} tokens ({a.token_delay}s apart): completed exactly "
          f"{s['completed_exact']}, failed {s['failed']}, peak concurrent {s['peak_concurrent']}, "
          f"TTFT p50 {s['ttft_p50_ms']:.1f} ms p99 {s['ttft_p99_ms']:.1f} ms, router RSS at peak "
          f"{s['router_rss_at_peak_mib']} MiB (max {s['router_peak_rss_mib']}), fds {s['router_fds_at_peak']}, "
          f"router CPU {s['router_cpu_s']:.1f} s over {s['wall_s']:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
