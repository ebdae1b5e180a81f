"""A TCP proxy that adds a fixed one-way delay in each direction (a stand-in for `tc netem`, which this
kernel lacks). Order is kept; bandwidth is not limited.

    python tests/router_support/delay_proxy.py --listen 10.250.1.2:8000 --target 127.0.0.1:8001 --delay-ms 20

A round trip through it costs 2 x delay-ms (plus one extra 2 x delay for the TCP connect, like a real link).
"""
from __future__ import annotations

import argparse
import asyncio
import sys


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await q.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                try:
                    writer.write_eof()
                except (OSError, RuntimeError):
                    pass
                return
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return

    task = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            q.put_nowait((loop.time() + delay, data if data else None))
            if not data:
                break
    except (ConnectionError, OSError):
        q.put_nowait((loop.time() + delay, None))
    await task


async def handle(cr, cw, target_host, target_port, delay):
    await asyncio.sleep(delay)   # SYN one way
    try:
        tr, tw = await asyncio.open_connection(target_host, target_port)
    except OSError:
        cw.close()
        return
    await asyncio.sleep(delay)   # SYN-ACK back
    try:
        await asyncio.gather(pump(cr, tw, delay), pump(tr, cw, delay))
    finally:
        for w in (cw, tw):
            try:
                w.close()
            except Exception:
                pass


async def main_async(listen: str, target: str, delay_ms: float) -> None:
    lh, lp = listen.rsplit(":", 1)
    th, tp = target.rsplit(":", 1)
    delay = delay_ms / 1000.0
    server = await asyncio.start_server(lambda r, w: handle(r, w, th, int(tp), delay), lh, int(lp), backlog=1024)
    print(f"PROXY {listen} -> {target} +{delay_ms}ms each way", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    a = p.parse_args(argv)
    try:
        asyncio.run(main_async(a.listen, a.target, a.delay_ms))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
