"""`strata bench serve`: online serving benchmark against any OpenAI-compatible server.

Requests arrive as a Poisson process at `--request-rate` (or a gamma process with `--burstiness`; `inf`
sends all at once), optionally capped at `--max-concurrency` in flight. Every request streams; per request
we record TTFT (first chunk carrying tokens), the gaps between such chunks (inter-token latency, ITL), time per
output token after the first (TPOT) and end-to-end latency; output tokens come from the server's usage
(`stream_options.include_usage`) when it reports them, else from the chunk count.

Prompts: `--dataset random` (random token ids of `--random-input-len`), or a workload JSON
(`[{"prompt_ids": [...], "output_len": N}, ...]`, e.g. ../shared/workloads/sharegpt1000.json), or JSONL
with a "prompt" text field (plus optional "output_len"). Token-id prompts go to /v1/completions as ids; for
chat, or with `--prompt-as-text`, they are decoded with `--tokenizer` (default: the embedded SmolLM2's).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Prompt:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root (the /v1 suffix is optional)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--dataset", default="random", help="'random', a workload JSON, or a JSONL with 'prompt'")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random lengths drawn from [len*(1-r), len*(1+r)]")
    p.add_argument("--output-len", type=int, default=None, help="override every request's output length")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: ignore_eos, exact output lengths)")
    p.add_argument("--no-usage", dest="usage", action="store_false",
                   help="do not ask for stream_options.include_usage (for servers that reject it)")
    p.add_argument("--prompt-as-text", action="store_true", help="decode token-id prompts to text")
    p.add_argument("--tokenizer", default=None, help="tokenizer for decoding ids (HF dir or .gguf)")
    p.add_argument("--percentiles", default="50,90,99")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--output-json", default=None, help="write the results here")
    p.add_argument("--label", default=None, help="free text stored in the JSON (e.g. the server's name)")
    return p


# ------------------------------------------------------------------------------------------------ prompts
def _load_tokenizer(path: str | None):
    from strata.engine.tokenizer import Tokenizer
    if path is None:
        from strata.models.embedded import default_model_path
        return Tokenizer.from_gguf(default_model_path())
    return Tokenizer.from_pretrained(path)


def load_prompts(args) -> list[Prompt]:
    rng = random.Random(args.seed)
    out: list[Prompt] = []
    if args.dataset == "random":
        r = args.random_range_ratio
        for _ in range(args.num_prompts):
            n_in = max(1, int(rng.uniform(args.random_input_len * (1 - r), args.random_input_len * (1 + r))))
            n_out = max(1, int(rng.uniform(args.random_output_len * (1 - r), args.random_output_len * (1 + r))))
            out.append(Prompt([rng.randrange(1000, 30000) for _ in range(n_in)], n_in, n_out))
    else:
        with open(args.dataset, encoding="utf-8") as f:
            head = f.read(1)
            f.seek(0)
            rows = json.load(f) if head == "[" else [json.loads(line) for line in f if line.strip()]
        for row in rows[: args.num_prompts]:
            if "prompt_ids" in row:
                ids = list(row["prompt_ids"])
                out.append(Prompt(ids, len(ids), int(row.get("output_len", args.random_output_len))))
            else:
                out.append(Prompt(str(row["prompt"]), 0, int(row.get("output_len", args.random_output_len))))
    if args.output_len is not None:
        for p in out:
            p.output_len = args.output_len
    needs_text = args.prompt_as_text or args.endpoint == "/v1/chat/completions"
    if needs_text and any(isinstance(p.prompt, list) for p in out):
        tok = _load_tokenizer(args.tokenizer)
        for p in out:
            if isinstance(p.prompt, list):
                p.prompt = tok.decode(p.prompt, skip_special_tokens=False)
    return out


# ------------------------------------------------------------------------------------------------ running
def _root(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def _one(client, args, model: str, p: Prompt) -> Result:
    res = Result(prompt_len=p.prompt_len)
    body: dict = {"model": model, "max_tokens": p.output_len, "temperature": args.temperature, "stream": True}
    if args.usage:
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": p.prompt}]
    else:
        body["prompt"] = p.prompt
    res.start = t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", args.endpoint, json=body, timeout=args.timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                    if not res.prompt_len:
                        res.prompt_len = obj["usage"].get("prompt_tokens", 0)
                # a token arrival: a choice with text (completions) or content (chat), even empty (the
                # server may hold text back, e.g. an incomplete UTF-8 character); not chat's role chunk
                got = False
                for c in obj.get("choices") or []:
                    d = c.get("delta")
                    if d is None:
                        got |= c.get("text") is not None and (c.get("text") != "" or c.get("finish_reason") is None)
                    elif "role" not in d:
                        got |= d.get("content") is not None
                if got:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
        res.e2e = time.perf_counter() - t0
        if not res.output_tokens:
            res.output_tokens = chunks
        res.ok = True
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yield request indexes at Poisson (gamma, when burstiness != 1) arrival times."""
    for i in range(n):
        yield i
        if math.isinf(rate) or rate <= 0:
            continue
        theta = 1.0 / (rate * burstiness)
        await asyncio.sleep(rng.gammavariate(burstiness, theta))


async def run(args) -> dict:
    import httpx

    prompts = load_prompts(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or len(prompts) or 1
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=_root(args.base_url), headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        sem = asyncio.Semaphore(limit)
        rng = random.Random(args.seed)

        async def limited(p):
            async with sem:
                return await _one(client, args, model, p)

        t0 = time.perf_counter()
        tasks = []
        async for i in _arrivals(len(prompts), args.request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(limited(prompts[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(args, model, results, duration)


# ------------------------------------------------------------------------------------------------ report
def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(name: str, xs_s: list[float], pcts: list[float]) -> dict:
    xs = [x * 1000.0 for x in xs_s]
    d = {f"mean_{name}_ms": (sum(xs) / len(xs)) if xs else float("nan")}
    for q in pcts:
        d[f"p{q:g}_{name}_ms"] = _pct(xs, q)
    return d


def summarize(args, model: str, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    pcts = [float(x) for x in str(args.percentiles).split(",") if x]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "label": args.label, "base_url": args.base_url, "endpoint": args.endpoint, "model": model,
        "dataset": args.dataset, "num_prompts": len(results), "request_rate": args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else float("nan"),
        "output_throughput": out_tokens / duration if duration > 0 else float("nan"),
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else float("nan"),
    }
    summary.update(_stats("ttft", [r.ttft for r in ok], pcts))
    summary.update(_stats("tpot", tpots, pcts))
    summary.update(_stats("itl", [x for r in ok for x in r.itl], pcts))
    summary.update(_stats("e2el", [r.e2e for r in ok], pcts))
    return summary


def _print(s: dict) -> None:
    print(f"{'=' * 16} Serving benchmark {'=' * 16}")
    for k in ("model", "endpoint", "request_rate", "max_concurrency", "completed", "failed", "duration_s",
              "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
              "total_token_throughput"):
        v = s[k]
        print(f"{k:<28} {v:.2f}" if isinstance(v, float) else f"{k:<28} {v}")
    for k, v in s.items():
        if k.endswith("_ms"):
            print(f"{k:<28} {v:.2f}")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")


def _json_safe(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata bench serve", description=__doc__.split("\n\n")[0])
    add_args(parser)
    args = parser.parse_args(argv)
    return main_args(args)


def main_args(args) -> int:
    summary = asyncio.run(run(args))
    _print(summary)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(_json_safe(summary), f, indent=2)
    return 0 if summary["failed"] == 0 else 1


__all__ = ["add_args", "main", "main_args", "run", "summarize", "Result"]

if __name__ == "__main__":
    sys.exit(main())
