"""Process fixtures for router tests: replicas (swappable command), the router, and small clients.

The replica command defaults to the instant fake (tests/router_support/fake_replica.py). To run the same
tests against real servers, set STRATA_TEST_REPLICA_CMD to a template, e.g.

    STRATA_TEST_REPLICA_CMD='strata serve --host {host} --port {port} --max-model-len 1024'

`{host}` and `{port}` are filled in; registration flags (`--register-with URL --region R`) are appended when a
test asks for self-registration, and the router key is passed as $STRATA_ROUTER_KEY. Tests that need fault
injection the real server does not have (500-only replicas, dying after N tokens) are skipped with
`needs_fake`. A test can also give one replica its own command (`ReplicaProc(..., cmd=[...])`, `{host}` and
`{port}` filled in): tests/test_router_real.py runs real `strata serve` replicas that way, always.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_replica.py"
REPLICA_CMD = os.environ.get("STRATA_TEST_REPLICA_CMD")
USING_FAKE = not REPLICA_CMD
START_TIMEOUT = float(os.environ.get("STRATA_TEST_REPLICA_START_TIMEOUT", "30" if not REPLICA_CMD else "300"))
needs_fake = pytest.mark.skipif(not USING_FAKE, reason="needs the fake replica's fault injection")
ROUTER_KEY = "test-router-key"


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before: a test that keeps a port for a replica it
    starts later (a "dead" replica) must not see a router bound to it meanwhile."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_http(url: str, timeout: float = 60.0, ok=(200,), proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code in ok:
                return
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


class Proc:
    def __init__(self, argv: list[str], log: Path, env: dict | None = None, prefix: list[str] | None = None):
        self.argv = argv
        self.log = log
        self.env = env
        self.prefix = prefix or []
        self.p: subprocess.Popen | None = None

    def start(self) -> "Proc":
        e = dict(os.environ)
        e.update(self.env or {})
        e.setdefault("PYTHONUNBUFFERED", "1")
        self._fh = open(self.log, "ab")
        self.p = subprocess.Popen(self.prefix + self.argv, stdout=self._fh, stderr=subprocess.STDOUT, env=e,
                                  start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def signal(self, sig) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def kill(self) -> None:
        """SIGKILL (no goodbye to the router)."""
        if self.p is not None:
            if self.alive():
                os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)
            self._fh.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self.p is None:
            return
        if self.alive():
            os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self._fh.close()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class ReplicaProc(Proc):
    def __init__(self, tmp: Path, *, host: str = "127.0.0.1", port: int | None = None, region: str | None = None,
                 register_with: str | None = None, fake_args: list[str] | None = None,
                 prefix: list[str] | None = None, advertise: str | None = None, real_args: list[str] | None = None,
                 cmd: list[str] | None = None):
        self.real_args = real_args or []
        self.cmd = cmd        # an explicit replica command ({host}/{port} filled in), e.g. a real `strata serve`
        self.host = host
        self.port = port or free_port()
        self.region = region
        self.register_with = register_with
        self.fake_args = fake_args or []
        self.advertise = advertise
        super().__init__(self._argv(), tmp / f"replica-{self.port}.log", env={"STRATA_ROUTER_KEY": ROUTER_KEY},
                         prefix=prefix)

    @property
    def url(self) -> str:
        return f"http://{self.advertise or self.host}:{self.port}"

    @property
    def name(self) -> str:
        return self.url.split("://", 1)[1]

    def _argv(self) -> list[str]:
        if self.cmd is not None:
            argv = [a.format(host=self.host, port=self.port) for a in self.cmd] + self.real_args
        elif REPLICA_CMD:
            argv = shlex.split(REPLICA_CMD.format(host=self.host, port=self.port)) + self.real_args
        else:
            argv = [sys.executable, str(FAKE), "--host", self.host, "--port", str(self.port), *self.fake_args]
            if self.advertise:
                argv += ["--advertise", self.advertise]
        if self.register_with:
            argv += ["--register-with", self.register_with]
            if self.region:
                argv += ["--region", self.region]
            argv += ["--router-key", ROUTER_KEY]
        return argv

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "ReplicaProc":
        if not self.prefix:
            wait_http(self.url + "/health", timeout, proc=self.p)
        return self

    def restart(self) -> "ReplicaProc":
        self.kill()
        self.start()
        return self

    def control(self, **kw) -> dict:
        assert USING_FAKE
        return httpx.post(self.url + "/_control", json=kw, timeout=5).json()

    def metrics(self) -> dict[str, float]:
        from strata.router.metrics import parse_prometheus

        return parse_prometheus(httpx.get(self.url + "/metrics", timeout=5).text)


class RouterProc(Proc):
    def __init__(self, tmp: Path, *, replicas: list[str] = (), config: dict | None = None, args: list[str] = (),
                 key: str | None = ROUTER_KEY, port: int | None = None):
        self.port = port or free_port()
        argv = [sys.executable, "-m", "strata.router", "--host", "127.0.0.1", "--port", str(self.port),
                "--health-interval", "0.2", "--log-level", "WARNING"]
        if config is not None:
            import yaml

            path = tmp / f"fleet-{self.port}.yaml"
            path.write_text(yaml.safe_dump(config))
            argv += ["--config", str(path)]
        for r in replicas:
            argv += ["--replica", r]
        if key:
            argv += ["--router-key", key]
        argv += list(args)
        super().__init__(argv, tmp / f"router-{self.port}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> "RouterProc":
        wait_http(self.url + "/metrics", timeout, proc=self.p)
        return self

    def fleet(self) -> dict:
        return httpx.get(self.url + "/admin/fleet", headers={"Authorization": f"Bearer {ROUTER_KEY}"},
                         timeout=5).json()

    def wait_all_healthy(self, timeout: float = 20.0) -> None:
        """Until every replica the router knows passes its probes (a loaded 2-core machine can fail a first probe
        of a replica that has just started, and a test that asserts where traffic goes must not start then)."""
        self.wait_for(lambda: all(r["healthy"] for r in self.fleet()["replicas"]), timeout, "all replicas healthy")

    def replica_state(self, name: str) -> dict:
        for r in self.fleet()["replicas"]:
            if r["url"].endswith(name):
                return r
        raise KeyError(name)

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels` (read with prometheus_client's parser)."""
        return metric_sum(httpx.get(self.url + "/metrics", timeout=5).text, name, **labels)

    def wait_for(self, pred, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        raise TimeoutError(f"{what} not met within {timeout}s; fleet: {json.dumps(self.fleet())[:2000]}")


def metric_sum(text: str, name: str, **labels) -> float:
    """Sum of the samples named `name` (e.g. 'strata_router:failovers_total') in a Prometheus text exposition
    whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def until(pred, timeout: float = 10.0, what: str = "condition"):
    """`wait_for` inside an event loop: polls `pred` (a quick blocking check) and lets the loop's other tasks
    run in between."""
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        await asyncio.sleep(0.02)
    return v


def start_all(procs):
    for p in procs:
        p.start()
    for p in procs:
        p.wait_ready()
    return procs


# ------------------------------------------------------------------------------------------ clients

async def acomplete(session, base: str, prompt: str, *, max_tokens: int = 8, stream: bool = False,
                    chat: bool = False, headers: dict | None = None, extra: dict | None = None,
                    on_event=None) -> dict:
    """One request; returns {"status", "text", "ids", "region", "replica", "error", "events"}.
    `on_event(out)`, if given, is called after each streamed chunk (e.g. to kill a replica mid-stream)."""
    body: dict = {"max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    body.update(extra or {})
    out = {"status": None, "text": "", "ids": set(), "region": None, "replica": None, "error": None, "events": 0,
           "roles": 0, "finish": None}
    async with session.post(base + path, json=body, headers=headers or {}) as r:
        out["status"] = r.status
        out["region"] = r.headers.get("x-strata-region")
        out["replica"] = r.headers.get("x-strata-replica")
        out["retry_after"] = r.headers.get("Retry-After")
        if not stream or r.status != 200:
            data = await r.json(content_type=None)
            if r.status != 200:
                out["error"] = data.get("error")
                return out
            ch = data["choices"][0]
            out["text"] = ch["message"]["content"] if chat else ch["text"]
            out["ids"].add(data["id"])
            out["finish"] = ch.get("finish_reason")
            return out
        buf = b""
        done = False
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                if not ev.startswith(b"data: "):
                    continue
                payload = ev[6:]
                if payload == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(payload)
                out["events"] += 1
                if "error" in obj:
                    out["error"] = obj["error"]
                    continue
                out["ids"].add(obj["id"])
                for ch in obj.get("choices", []):
                    if chat:
                        d = ch.get("delta", {})
                        if "role" in d:
                            out["roles"] += 1
                        out["text"] += d.get("content") or ""
                    else:
                        out["text"] += ch.get("text") or ""
                    if ch.get("finish_reason"):
                        out["finish"] = ch["finish_reason"]
                if on_event is not None:
                    on_event(out)
        if not done and out["error"] is None:
            out["error"] = "stream ended without [DONE]"
    return out


def run(coro):
    return asyncio.run(coro)


async def many(base: str, jobs: list[dict], concurrency: int = 64) -> list[dict]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def one(j):
            async with sem:
                try:
                    return await acomplete(s, base, **j)
                except Exception as e:  # a failed request is a result, not a crash
                    return {"status": None, "error": f"{type(e).__name__}: {e}", "text": "", "ids": set()}
        return await asyncio.gather(*(one(j) for j in jobs))


def one(base: str, prompt: str, **kw) -> dict:
    return run(many(base, [dict(prompt=prompt, **kw)]))[0]
