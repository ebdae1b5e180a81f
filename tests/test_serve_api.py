"""The OpenAI-compatible server end to end: one real `strata serve` process (tiny random Llama, real engine,
SmolLM2 tokenizer) on loopback, driven with the official `openai` client and raw HTTP."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from test_serve_utils import MODEL_NAME, ServerProcess, metrics, sse_events, write_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_api")
    srv = ServerProcess(write_tiny_model(d / "model"), "--batch-dir", str(d / "batches"),
                        log_path=str(d / "server.log")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path, body, **kw):
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, timeout=60, **kw)
    return httpx.post(server.url + path, content=body, timeout=60,
                      headers={"content-type": "application/json"}, **kw)


def wait_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server.url)
        if (m["strata:num_requests_running"] == 0 and m["strata:num_requests_waiting"] == 0
                and m["strata:kv_cache_usage_perc"] == 0):
            return m
        assert time.monotonic() < deadline, f"engine not idle: {m}"
        time.sleep(0.1)


CHAT = [{"role": "user", "content": "Say something."}]


# ---------------------------------------------------------------------------------------------- basics
def test_health_version_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    r = httpx.get(server.url + "/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_completion_forms_n_and_usage(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5
    # token-id prompts, several prompts, n > 1: choice index = prompt * n + sample
    r = client.completions.create(model=MODEL_NAME, prompt=[[10, 11, 12], [20, 21]], n=2, max_tokens=3,
                                  temperature=0.8, seed=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    # echo
    r = client.completions.create(model=MODEL_NAME, prompt="Echo me", max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Echo me")


def test_greedy_stream_equals_non_stream_completions(client):
    kw = dict(model=MODEL_NAME, prompt="The capital of France is", max_tokens=12, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is chunks[-2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_greedy_stream_equals_non_stream_chat(client):
    kw = dict(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_framing(server):
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 4, "n": 2, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    finishes = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]  # exactly one finishing chunk per choice


def test_n_and_seed_reproducible(client):
    kw = dict(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=1.0, n=3, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    ta = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    tb = [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert ta == tb
    assert len(set(ta)) == 3
    assert a.usage.completion_tokens == 3 * 8


def test_stop_strings(client):
    kw = dict(model=MODEL_NAME, prompt="Once upon a time", temperature=0, max_tokens=16,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    words = full.split()
    stop = words[len(words) // 2]
    cut = full.index(stop)
    r = client.completions.create(stop=[stop, "@@never@@"], **kw)
    assert r.choices[0].text == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra.get("stop_reason") == stop
    # same through streaming
    s = client.completions.create(stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].text for c in s if c.choices) == full[:cut]


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for t in content:
        assert len(t.top_logprobs) == 3
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(x <= 0 for x in lps)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    r = client.completions.create(model=MODEL_NAME, prompt="Logprobs", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(d) >= 2 for d in lp.top_logprobs)
    # streamed logprobs carry the same tokens
    s = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, stream=True)
    streamed = [t.token for c in s if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_max_tokens_penalties_user(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=9, max_completion_tokens=3,
                                       temperature=0, presence_penalty=1.0, frequency_penalty=0.5, user="alice",
                                       extra_body={"ignore_eos": True, "repetition_penalty": 1.2, "top_k": 5,
                                                   "min_p": 0.01})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_min_tokens_holds_back_stop_tokens(server, client):
    """Every token but ten is a stop token: without min_tokens the first token stops the request; with
    min_tokens=3 the first three come from the ten, then a stop token ends it."""
    keep = list(range(1000, 1010))
    kw = dict(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=8, temperature=0, logprobs=1)
    stop = [t for t in range(49152) if t not in keep]
    r = client.completions.create(**kw, extra_body={"stop_token_ids": stop})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (1, "stop")
    r = client.completions.create(**kw, extra_body={"stop_token_ids": stop, "min_tokens": 3})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.model_extra["stop_reason"] not in keep
    assert r.usage.completion_tokens >= 4
    kept = {post(server, "/detokenize", {"tokens": [t]}).json()["prompt"] for t in keep}
    assert set(c.logprobs.tokens[:3]) <= kept, (c.logprobs.tokens, kept)


def test_continue_final_message_and_tokenize(server, client):
    msgs = [{"role": "user", "content": "Finish my sentence."}, {"role": "assistant", "content": "The sky is"}]
    tk = post(server, "/tokenize", {"messages": msgs, "continue_final_message": True,
                                    "add_generation_prompt": False, "return_token_strs": True}).json()
    text = post(server, "/detokenize", {"tokens": tk["tokens"]}).json()["prompt"]
    assert text.endswith("The sky is")
    assert tk["count"] == len(tk["tokens"]) and tk["max_model_len"] == 1024
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=3, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert r.usage.prompt_tokens == tk["count"]
    # both at once is refused, like vLLM
    bad = post(server, "/v1/chat/completions", {"messages": msgs, "continue_final_message": True,
                                                 "add_generation_prompt": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"
    # plain tokenize / detokenize round trip
    ids = post(server, "/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == "hello world"


# ---------------------------------------------------------------------------------------------- bad input
LONG = [7] * 1100
BAD = [
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'"a string"', 400, None),
    ("/v1/completions", b"not json", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [49152]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e999}', 400, "temperature"),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 30}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 64}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10 ** 6], "min_tokens": 2}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content.0"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 5000}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 1100}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": CHAT, "n": -1}, 400, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": -1}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}:{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_bad_input_messages_name_lengths(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5000}).json()["error"]["message"]
    assert "1024" in r and "5000" in r
    r = post(server, "/v1/completions", {"prompt": LONG}).json()["error"]["message"]
    assert "1024" in r and "1100" in r


def test_bad_input_through_openai_client_and_server_stays_healthy(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert httpx.get(server.url + "/nope").json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.completions.create(model=MODEL_NAME, prompt="still fine", max_tokens=2).choices


# ---------------------------------------------------------------------------------------------- metrics
REQUIRED_METRICS = [
    "strata:num_requests_running", "strata:num_requests_waiting", "strata:kv_cache_usage_perc",
    "strata:num_preemptions_total", "strata:prompt_tokens_total", "strata:generation_tokens_total",
    "strata:prefix_cache_queries_total", "strata:prefix_cache_hits_total",
    "strata:time_to_first_token_seconds_count", "strata:inter_token_latency_seconds_count",
    "strata:e2e_request_latency_seconds_count", "strata:request_queue_time_seconds_count",
    'strata:request_success_total{finished_reason="length"}',
]


def test_metrics_exact_counts(server, client):
    before = wait_idle(server)
    for name in REQUIRED_METRICS:
        assert name in before, name
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE strata:time_to_first_token_seconds histogram" in text
    assert 'strata:num_requests_running{model_name="tiny"}' in text
    prompts, max_tokens = [[100 + i for i in range(n)] for n in (5, 9, 13)], 4
    for p in prompts:
        client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True})
    s = client.completions.create(model=MODEL_NAME, prompt=list(range(200, 207)), max_tokens=6, stream=True,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert sum(1 for c in s if c.choices and c.choices[0].finish_reason) == 1
    after = wait_idle(server)
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    assert d["strata:prompt_tokens_total"] == 5 + 9 + 13 + 7
    assert d["strata:generation_tokens_total"] == 3 * 4 + 6
    assert d['strata:request_success_total{finished_reason="length"}'] == 4
    assert d['strata:request_success_total{finished_reason="abort"}'] == 0
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
              "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
              "request_prompt_tokens", "request_generation_tokens", "request_params_max_tokens",
              "request_params_n"):
        assert d[f"strata:{h}_count"] == 4, h
    assert d["strata:inter_token_latency_seconds_count"] == 3 * 3 + 5
    assert d["strata:request_prompt_tokens_sum"] == 34
    assert d["strata:request_generation_tokens_sum"] == 18
    assert d["strata:request_params_max_tokens_sum"] == 18
    assert d['strata:time_to_first_token_seconds_bucket{le="+Inf"}'] == 4
    assert after["strata:num_requests_running"] == 0 and after["strata:num_requests_waiting"] == 0
    # every prompt is looked up once; none holds a full block (16 tokens), so nothing can hit
    assert d["strata:prefix_cache_queries_total"] == 5 + 9 + 13 + 7
    assert d["strata:prefix_cache_hits_total"] == 0


def test_metrics_prefix_cache_hits(server, client):
    """The same 40-token prompt twice: 80 tokens looked up, the second time its two full blocks hit."""
    prompt = list(range(3000, 3040))
    before = wait_idle(server)
    for _ in range(2):
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    after = wait_idle(server)
    assert after["strata:prefix_cache_queries_total"] - before["strata:prefix_cache_queries_total"] == 80
    assert after["strata:prefix_cache_hits_total"] - before["strata:prefix_cache_hits_total"] == 32


# ---------------------------------------------------------------------------------------------- load
def test_200_concurrent_streams(server):
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(i):
        prompt = [300 + i] * (3 + i % 7)
        s = await aclient.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
        text, finishes, usage = "", 0, None
        async for c in s:
            if c.choices:
                text += c.choices[0].text
                finishes += c.choices[0].finish_reason is not None
            if c.usage:
                usage = c.usage
        return len(prompt), text, finishes, usage

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await aclient.close()

    t0 = time.monotonic()
    results = asyncio.run(main())
    assert len(results) == 200
    for n_prompt, text, finishes, usage in results:
        assert finishes == 1
        assert usage.prompt_tokens == n_prompt and usage.completion_tokens == 6
    print(f"200 concurrent streams: {time.monotonic() - t0:.1f} s")
    wait_idle(server)


def test_cancel_100_long_requests_frees_everything(server, client):
    before = wait_idle(server)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as c:
            async def one(i):
                body = {"model": MODEL_NAME, "prompt": [400 + i] * 8, "max_tokens": 1000, "stream": True,
                        "ignore_eos": True, "temperature": 0}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            return True  # first token arrived; leaving the block drops the connection
            return await asyncio.gather(*(one(i) for i in range(100)))

    assert all(asyncio.run(main()))
    # plus one non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1000,
                                                         "ignore_eos": True}, timeout=1.0)
    after = wait_idle(server, timeout=30)
    abort = 'strata:request_success_total{finished_reason="abort"}'
    assert after[abort] - before.get(abort, 0.0) == 101
    # nothing of the aborted requests runs on: the next request is the only one generating
    r = client.completions.create(model=MODEL_NAME, prompt="warm", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    last = wait_idle(server)
    assert last["strata:generation_tokens_total"] - after["strata:generation_tokens_total"] == 4
    assert last[abort] == after[abort]


# ---------------------------------------------------------------------------------------------- Batch API
def _batch_line(cid, body, url="/v1/chat/completions"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _wait_batch(client, bid, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(bid)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.2)


def test_batch_api_end_to_end(server, client):
    lines = [_batch_line(f"req-{i}", {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Post {i}"}],
                                      "max_tokens": 4, "temperature": 0}) for i in range(3)]
    lines.append(_batch_line("bad", {"model": MODEL_NAME, "messages": CHAT, "temperature": -1}))
    f = client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list().data]
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "test"})
    assert b.status in ("validating", "in_progress")
    b = _wait_batch(client, b.id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (4, 3, 1)
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["req-0", "req-1", "req-2"]
    direct = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Post 1"}],
                                            max_tokens=4, temperature=0).choices[0].message.content
    by_id = {o["custom_id"]: o for o in out}
    assert by_id["req-1"]["response"]["status_code"] == 200
    assert by_id["req-1"]["response"]["body"]["choices"][0]["message"]["content"] == direct
    errs = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
    assert len(errs) == 1 and errs[0]["custom_id"] == "bad"
    assert errs[0]["response"]["status_code"] == 400
    assert errs[0]["response"]["body"]["error"]["param"] == "temperature"
    assert b.id in [x.id for x in client.batches.list().data]
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_batch_api_completions_endpoint_and_bad_files(server, client):
    lines = [_batch_line(f"c{i}", {"model": MODEL_NAME, "prompt": f"Item {i}", "max_tokens": 3},
                         url="/v1/completions") for i in range(2)]
    f = client.files.create(file=("c.jsonl", "\n".join(lines).encode()), purpose="batch")
    b = _wait_batch(client, client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                                  completion_window="24h").id)
    assert b.status == "completed" and b.request_counts.completed == 2 and b.error_file_id is None
    # malformed input: duplicate custom_id and a wrong url -> the batch fails with line errors
    bad = [lines[0], lines[0], _batch_line("x", {"prompt": "y"}, url="/v1/embeddings"), "{not json"]
    f = client.files.create(file=("bad.jsonl", "\n".join(bad).encode()), purpose="batch")
    b = _wait_batch(client, client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                                  completion_window="24h").id)
    assert b.status == "failed"
    codes = sorted(e.code for e in b.errors.data)
    assert codes == ["duplicate_custom_id", "invalid_json_line", "mismatched_endpoint"]
    # API-level errors
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    r = httpx.post(server.url + "/v1/files", content=b"plain", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_batch_cancel_frees_engine(server, client):
    lines = [_batch_line(f"long-{i}", {"model": MODEL_NAME, "prompt": [500 + i] * 4, "max_tokens": 1000,
                                       "ignore_eos": True}, url="/v1/completions") for i in range(10)]
    f = client.files.create(file=("long.jsonl", "\n".join(lines).encode()), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while metrics(server.url)["strata:num_requests_running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.batches.cancel(b.id)
    b = _wait_batch(client, b.id)
    assert b.status == "cancelled" and b.cancelled_at
    wait_idle(server)


# ---------------------------------------------------------------------------------------------- bench
def test_bench_serve(server, tmp_path):
    from strata.serve import bench
    out = tmp_path / "bench.json"
    rc = bench.main(["--base-url", server.url + "/v1", "--num-prompts", "12", "--request-rate", "30",
                     "--random-input-len", "16", "--random-output-len", "6", "--output-json", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 12 and s["failed"] == 0 and s["total_output_tokens"] == 72
    assert s["total_input_tokens"] == 12 * 16
    for k in ("p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "p99_tpot_ms", "p99_itl_ms", "output_throughput",
              "request_throughput"):
        assert s[k] is not None and s[k] > 0, k
    rc = bench.main(["--base-url", server.url, "--endpoint", "/v1/chat/completions", "--num-prompts", "6",
                     "--max-concurrency", "3", "--random-input-len", "8", "--random-output-len", "4",
                     "--output-json", str(out)])
    s = json.loads(out.read_text())
    assert rc == 0 and s["completed"] == 6 and s["total_output_tokens"] == 24 and s["max_concurrency"] == 3
