"""Joining a router: POST {router}/register at start-up, {router}/heartbeat every few seconds,
{router}/deregister at shutdown. Body: {"url", "region", "model"} (heartbeats add the load figures).
The router key, when given, goes in `Authorization: Bearer <key>` (and `X-Router-Key`).
A router that is down never stops the server: registration retries with backoff from the heartbeat loop.
"""
from __future__ import annotations

import asyncio
import logging
import socket

logger = logging.getLogger("strata.serve.registration")


def advertised_url(host: str, port: int, explicit: str | None, ssl: bool = False) -> str:
    if explicit:
        return explicit.rstrip("/")
    if host in ("0.0.0.0", "", "::"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'https' if ssl else 'http'}://{host}:{port}"


class RouterRegistration:
    def __init__(self, router_url: str, url: str, region: str | None, model: str, *, key: str | None = None,
                 interval: float = 5.0, load=None):
        self.router = router_url.rstrip("/")
        self.body = {"url": url, "region": region, "model": model}
        self.headers = {}
        if key:
            self.headers = {"Authorization": f"Bearer {key}", "X-Router-Key": key}
        self.interval = interval
        self.load = load  # () -> dict of load figures for heartbeats
        self.registered = False
        self._task: asyncio.Task | None = None
        self._client = None

    async def start(self) -> None:
        import httpx
        self._client = httpx.AsyncClient(timeout=5.0)
        self._task = asyncio.create_task(self._loop())

    async def _post(self, path: str, body: dict) -> bool:
        try:
            r = await self._client.post(self.router + path, json=body, headers=self.headers)
        except Exception as e:  # noqa: BLE001 - router unreachable
            logger.warning("router %s%s unreachable: %s", self.router, path, e)
            return False
        if r.status_code >= 400:
            logger.warning("router %s%s answered %s: %s", self.router, path, r.status_code, r.text[:300])
            return False
        if path == "/register":
            # the router may ask for a shorter heartbeat interval than ours (its replica TTL / 3)
            try:
                asked = float(r.json().get("heartbeat_interval_s"))
                if 0 < asked < self.interval:
                    self.interval = asked
            except (ValueError, TypeError, AttributeError):
                pass
        return True

    async def _loop(self) -> None:
        backoff = 0.5
        while True:
            if not self.registered:
                self.registered = await self._post("/register", self.body)
                if self.registered:
                    logger.info("registered with router %s as %s", self.router, self.body["url"])
                    backoff = 0.5
                else:
                    await asyncio.sleep(min(backoff, self.interval))
                    backoff *= 2
                    continue
            await asyncio.sleep(self.interval)
            body = dict(self.body)
            if self.load is not None:
                try:
                    body.update(self.load())
                except Exception:  # noqa: BLE001
                    pass
            if not await self._post("/heartbeat", body):
                # the router may have restarted and forgotten us: register again
                self.registered = False

    async def stop(self) -> None:
        """Stop heartbeats and deregister (once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._post("/deregister", self.body)
            await self._client.aclose()
            self._client = None
