"""A small, instant, OpenAI-shaped replica for router tests and benchmarks (no model, no torch).

Text is deterministic and "greedy": each next token is a function of the whole context so far (the CRC of
prompt + generated text), so continuing a generation from prompt + the text already produced yields exactly
the text of the uninterrupted run, just as a greedy model would.

    python tests/router_support/fake_replica.py --port 8001 [--token-delay 0.01] [--mode ok|error500|
        die-after:N|hang|unhealthy|error429] [--register-with http://router:9000 --region us-east --router-key K]

Also: POST /_control {"mode": ..., "token_delay": ..., "health": 200|503} changes behaviour at run time;
GET /_stats returns counters. /metrics has strata:num_requests_running / _waiting, kv_cache_usage_perc and
the prefix-cache counters (an LRU of 64-character prompt blocks).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import zlib
from collections import OrderedDict

from aiohttp import ClientSession, ClientTimeout, web

VOCAB = [" " + w for w in (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue amber violet cyan "
    "north south east west river stone cloud ember frost grove harbor island jungle meadow orbit prism "
    "quartz ridge summit tundra valley willow zephyr").split()]
BLOCK_CHARS = 64
CHARS_PER_TOKEN = 4


def render_chat(messages, add_generation_prompt=True, continue_final_message=False) -> str:
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        last = i == len(messages) - 1
        if last and continue_final_message:
            out.append(f"<|{m.get('role')}|>{content}")
        else:
            out.append(f"<|{m.get('role')}|>{content}\n")
    if add_generation_prompt and not continue_final_message:
        out.append("<|assistant|>")
    return "".join(out)


class Replica:
    def __init__(self, args):
        self.args = args
        self.model = args.model
        self.mode = args.mode
        self.token_delay = args.token_delay
        self.health_status = 200
        self.running = 0
        self.waiting = 0
        self.sem = asyncio.Semaphore(args.max_running)
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.requests = 0
        self.completed = 0
        self.counter = 0
        self.name = f"{args.host}:{args.port}"

    # ------------------------------------------------------------------ model
    def prefix_cache(self, text: str) -> None:
        tokens = max(1, len(text) // CHARS_PER_TOKEN)
        self.prefix_queries += tokens
        h = 0
        hit = True
        cap = self.args.cache_blocks
        for i in range(0, len(text) - len(text) % BLOCK_CHARS, BLOCK_CHARS):
            h = zlib.crc32(text[i:i + BLOCK_CHARS].encode(), h)
            if hit and h in self.cache:
                self.prefix_hits += BLOCK_CHARS // CHARS_PER_TOKEN
                self.cache.move_to_end(h)
            else:
                hit = False
                self.cache[h] = None
                if len(self.cache) > cap:
                    self.cache.popitem(last=False)

    @staticmethod
    def tokens(context: str, n: int):
        crc = zlib.crc32(context.encode())
        for _ in range(n):
            tok = VOCAB[crc % len(VOCAB)]
            crc = zlib.crc32(tok.encode(), crc)
            yield tok

    # ------------------------------------------------------------------ http
    def _check_mode(self):
        if self.mode == "error429":
            raise web.HTTPTooManyRequests(text=json.dumps({"error": {"message": "queue full", "code": 429}}),
                                          content_type="application/json", headers={"Retry-After": "0.2"})
        if self.mode == "error500":
            raise web.HTTPInternalServerError(text=json.dumps({"error": {"message": "injected failure", "code": 500}}),
                                              content_type="application/json")

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat(self, request):
        return await self._generate(request, chat=True)

    async def _generate(self, request, chat: bool):
        self.requests += 1
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "bad json", "code": 400}}, status=400)
        self._check_mode()
        if body.get("model") not in (None, self.model):
            return web.json_response({"error": {"message": f"model {body.get('model')} not served", "code": 404}},
                                     status=404)
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return web.json_response({"error": {"message": "messages required", "code": 400}}, status=400)
            cont = bool(body.get("continue_final_message"))
            if cont and msgs[-1].get("role") != "assistant":
                return web.json_response({"error": {"message": "continue_final_message needs a final assistant "
                                                               "message", "code": 400}}, status=400)
            context = render_chat(msgs, body.get("add_generation_prompt", True), cont)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list):
                prompt = "".join(VOCAB[t % len(VOCAB)] for t in prompt) if prompt and isinstance(prompt[0], int) \
                    else (prompt[0] if prompt else "")
            if not isinstance(prompt, str):
                return web.json_response({"error": {"message": "prompt required", "code": 400}}, status=400)
            context = prompt
        n = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        self.prefix_cache(context)
        self.counter += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.args.port}-{self.counter}"
        created = int(time.time())
        prompt_tokens = max(1, len(context) // CHARS_PER_TOKEN)
        self.waiting += 1
        async with self.sem:
            self.waiting -= 1
            self.running += 1
            try:
                if body.get("stream"):
                    return await self._stream(request, body, chat, context, n, rid, created, prompt_tokens)
                if self.mode == "hang":
                    await asyncio.sleep(3600)
                if self.token_delay:
                    await asyncio.sleep(self.token_delay * n)
                text = "".join(self.tokens(context, n))
                self.completed += 1
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                              "finish_reason": "length"}
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
                    obj = "text_completion"
                return web.json_response({"id": rid, "object": obj, "created": created, "model": self.model,
                                          "choices": [choice], "usage": usage},
                                         headers={"x-replica": self.name})
            finally:
                self.running -= 1

    async def _stream(self, request, body, chat, context, n, rid, created, prompt_tokens):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-replica": self.name})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        so = body.get("stream_options") or {}
        continuous = bool(so.get("continuous_usage_stats"))
        produced = 0

        def chunk(choice):
            d = {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [choice]}
            if continuous:
                d["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": produced,
                              "total_tokens": prompt_tokens + produced}
            return b"data: " + json.dumps(d).encode() + b"\n\n"

        if chat:
            await resp.write(chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}))
        die_after = int(self.mode.split(":")[1]) if self.mode.startswith("die-after:") else None
        for i, tok in enumerate(self.tokens(context, n)):
            if self.mode == "hang":
                await asyncio.sleep(3600)
            if die_after is not None and i >= die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            fin = "length" if i == n - 1 else None
            produced = i + 1
            if chat:
                c = {"index": 0, "delta": {"content": tok}, "logprobs": None, "finish_reason": fin}
            else:
                c = {"index": 0, "text": tok, "logprobs": None, "finish_reason": fin}
            await resp.write(chunk(c))
        if so.get("include_usage"):
            await resp.write(b"data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                                     "model": self.model, "choices": [], "usage": {
                                                         "prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                         "total_tokens": prompt_tokens + n}}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        self.completed += 1
        return resp

    async def health(self, request):
        if self.mode == "unhealthy":
            return web.Response(status=503, text="unhealthy")
        return web.Response(status=self.health_status, text="ok" if self.health_status == 200 else "unhealthy")

    async def models(self, request):
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "fake", "max_model_len": 4096}]})

    async def metrics(self, request):
        lines = [
            "# TYPE strata:num_requests_running gauge",
            f'strata:num_requests_running{{model_name="{self.model}"}} {self.running}',
            "# TYPE strata:num_requests_waiting gauge",
            f'strata:num_requests_waiting{{model_name="{self.model}"}} {self.waiting}',
            "# TYPE strata:kv_cache_usage_perc gauge",
            f'strata:kv_cache_usage_perc{{model_name="{self.model}"}} {min(1.0, len(self.cache) / self.args.cache_blocks)}',
            "# TYPE strata:prefix_cache_queries_total counter",
            f'strata:prefix_cache_queries_total{{model_name="{self.model}"}} {self.prefix_queries}',
            "# TYPE strata:prefix_cache_hits_total counter",
            f'strata:prefix_cache_hits_total{{model_name="{self.model}"}} {self.prefix_hits}',
        ]
        return web.Response(text="\n".join(lines) + "\n")

    async def control(self, request):
        body = await request.json()
        if "mode" in body:
            self.mode = body["mode"]
        if "token_delay" in body:
            self.token_delay = float(body["token_delay"])
        if "health" in body:
            self.health_status = int(body["health"])
        return web.json_response({"mode": self.mode, "token_delay": self.token_delay, "health": self.health_status})

    async def stats(self, request):
        return web.json_response({"requests": self.requests, "completed": self.completed, "running": self.running,
                                  "prefix_queries": self.prefix_queries, "prefix_hits": self.prefix_hits})


async def _register_loop(args, app):
    me = f"http://{args.advertise or args.host}:{args.port}"
    hdr = {"Authorization": f"Bearer {args.router_key}"} if args.router_key else {}
    async with ClientSession(timeout=ClientTimeout(total=3)) as s:
        for _ in range(100):
            try:
                async with s.post(args.register_with.rstrip("/") + "/register", headers=hdr,
                                  json={"url": me, "region": args.region, "model": args.model}) as r:
                    print(f"REGISTER {r.status} {await r.text()}", flush=True)
                    if r.status < 300:
                        break
                    if r.status in (400, 401, 403, 409):
                        return
            except Exception as e:  # router not up yet
                print(f"REGISTER failed: {e}", flush=True)
            await asyncio.sleep(0.2)
        while args.heartbeat_interval > 0:
            await asyncio.sleep(args.heartbeat_interval)
            try:
                async with s.post(args.register_with.rstrip("/") + "/heartbeat", headers=hdr, json={"url": me}):
                    pass
            except Exception:
                pass


async def _deregister(args):
    me = f"http://{args.advertise or args.host}:{args.port}"
    hdr = {"Authorization": f"Bearer {args.router_key}"} if args.router_key else {}
    try:
        async with ClientSession(timeout=ClientTimeout(total=2)) as s:
            async with s.post(args.register_with.rstrip("/") + "/deregister", headers=hdr, json={"url": me}):
                pass
    except Exception:
        pass


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake-model")
    p.add_argument("--mode", default="ok")
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument("--max-running", type=int, default=100000)
    p.add_argument("--cache-blocks", type=int, default=64)
    p.add_argument("--register-with", default=None)
    p.add_argument("--advertise", default=None, help="host to register (default --host)")
    p.add_argument("--region", default=None)
    p.add_argument("--router-key", default=os.environ.get("STRATA_ROUTER_KEY"))
    p.add_argument("--heartbeat-interval", type=float, default=0.0)
    args = p.parse_args(argv)

    async def build():
        rep = Replica(args)
        app = web.Application()
        app.router.add_post("/v1/completions", rep.completions)
        app.router.add_post("/v1/chat/completions", rep.chat)
        app.router.add_get("/v1/models", rep.models)
        app.router.add_get("/health", rep.health)
        app.router.add_get("/metrics", rep.metrics)
        app.router.add_post("/_control", rep.control)
        app.router.add_get("/_stats", rep.stats)
        if args.register_with:
            async def start(app):
                app["reg"] = asyncio.create_task(_register_loop(args, app))

            async def stop(app):
                app["reg"].cancel()
                await _deregister(args)
            app.on_startup.append(start)
            app.on_shutdown.append(stop)
        return app

    print(f"READY {args.port}", flush=True)
    web.run_app(build(), host=args.host, port=args.port, print=None, access_log=None, backlog=4096,
                shutdown_timeout=1)


if __name__ == "__main__":
    sys.exit(main())
