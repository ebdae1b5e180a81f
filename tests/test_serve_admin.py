"""Server guards and lifecycle, real `strata serve` processes: API keys, CORS, body limit (413), admission
limit (429 + Retry-After), registration with a router (register / heartbeat / deregister), and SIGTERM
draining (in-flight requests finish, new ones get 503, the one past the timeout gets an SSE error event,
exit status 0) on a server of its own."""
from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from test_serve_utils import MODEL_NAME, ServerProcess, free_port, metrics, sse_events, write_tiny_model

KEYS = ("key-one", "key-two")


class FakeRouter:
    """Records what replicas send; answers 401 without the right key."""

    def __init__(self, key: str):
        self.calls: list[tuple[str, dict, str]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                auth = self.headers.get("authorization", "")
                outer.calls.append((self.path, body, auth))
                ok = auth == f"Bearer {key}"
                self.send_response(200 if ok else 401)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def paths(self):
        return [c[0] for c in self.calls]

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def router():
    r = FakeRouter("router-secret")
    yield r
    r.close()


def start_server(d, router, shutdown_timeout: float = 3.0) -> ServerProcess:
    return ServerProcess(write_tiny_model(d / "model"), "--api-key", KEYS[0], "--api-key", KEYS[1],
                         "--allowed-origins", "http://app.example", "--max-request-bytes", "4000",
                         "--max-queued-requests", "2", "--max-num-seqs", "2",
                         "--shutdown-timeout", f"{shutdown_timeout:.3f}", "--register-with", router.url,
                         "--region", "eu-west", "--router-key", "router-secret", "--heartbeat-interval", "0.3",
                         log_path=str(d / "server.log")).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory, router):
    srv = start_server(tmp_path_factory.mktemp("serve_admin"), router)
    yield srv
    srv.stop()


def auth(k=KEYS[0]):
    return {"Authorization": f"Bearer {k}"}


BODY = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}


def test_api_keys(server):
    u = server.url
    assert httpx.post(u + "/v1/completions", json=BODY).status_code == 401
    r = httpx.post(u + "/v1/completions", json=BODY, headers=auth("wrong"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(u + "/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401
    assert httpx.post(u + "/tokenize", json={"prompt": "x"}).status_code == 401
    for k in KEYS:
        assert httpx.post(u + "/v1/completions", json=BODY, headers=auth(k)).status_code == 200
    # open endpoints
    assert httpx.get(u + "/health").status_code == 200
    assert httpx.get(u + "/metrics").status_code == 200
    # the official client with a key
    c = openai.OpenAI(base_url=u + "/v1", api_key=KEYS[1], max_retries=0)
    assert c.models.list().data[0].id == MODEL_NAME
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=u + "/v1", api_key="nope", max_retries=0).models.list()


def test_cors(server):
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.options(server.url + "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "http://evil.example"
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://app.example", **auth()})
    assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_body_limit_413(server):
    big = {**BODY, "prompt": "x" * 5000}
    r = httpx.post(server.url + "/v1/completions", json=big, headers=auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(server.url + "/v1/completions", content=chunks(),
                   headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(server.url + "/v1/completions", json=BODY, headers=auth()).status_code == 200


def test_queue_limit_429(server):
    """max_num_seqs=2 run, max_queued_requests=2 wait; the next request gets 429 with Retry-After."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "go"}], "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    opened = []
    try:
        with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as c:
            for _ in range(4):
                cm = c.stream("POST", "/v1/chat/completions", json=body)
                r = cm.__enter__()
                assert r.status_code == 200
                lines = r.iter_lines()
                next(lines)  # accepted by the engine (the role chunk)
                opened.append((cm, lines))  # keep the iterator: dropping it closes the connection
            deadline = time.monotonic() + 20
            while metrics(server.url)["strata:num_requests_waiting"] < 2:
                assert time.monotonic() < deadline, (metrics(server.url), server.log())
                time.sleep(0.05)
            full = 'strata:request_rejected_total{reason="queue_full"}'
            rejected = metrics(server.url).get(full, 0.0)
            r = c.post("/v1/completions", json=BODY)
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert metrics(server.url)[full] == rejected + 1
    finally:
        for cm, _ in opened:
            cm.__exit__(None, None, None)
    deadline = time.monotonic() + 30
    while True:
        m = metrics(server.url)
        if m["strata:num_requests_running"] == 0 and m["strata:num_requests_waiting"] == 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.post(server.url + "/v1/completions", json=BODY, headers=auth()).status_code == 200


def test_registered_with_router(server, router):
    deadline = time.monotonic() + 10
    while router.paths().count("/heartbeat") < 2:
        assert time.monotonic() < deadline, router.calls
        time.sleep(0.1)
    path, body, key = router.calls[0]
    assert path == "/register" and key == "Bearer router-secret"
    assert body == {"url": server.url, "region": "eu-west", "model": MODEL_NAME}
    hb = [c for c in router.calls if c[0] == "/heartbeat"][-1][1]
    assert hb["url"] == server.url and "num_requests_running" in hb


def test_sigterm_drains_then_exits_0(server, router, tmp_path):
    """A server of its own, whose drain timeout is this machine's pace: twice the time of a 30-token
    stream (at least 0.5 s), so the short request (3 tokens) finishes within it and the long one (1000)
    cannot."""
    t0 = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", headers=auth(), timeout=60,
                      json={"model": MODEL_NAME, "prompt": "pace", "max_tokens": 30, "ignore_eos": True,
                            "stream": True}) as r:
        assert len([e for e in sse_events(r.iter_lines()) if e != "[DONE]"]) == 30
    srv = start_server(tmp_path, router, shutdown_timeout=max(0.5, 2 * (time.monotonic() - t0)))
    short = {"model": MODEL_NAME, "prompt": "short", "max_tokens": 3, "ignore_eos": True, "stream": True}
    long = {"model": MODEL_NAME, "prompt": "long", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    results = {}

    started = {"long": threading.Event(), "short": threading.Event()}

    def run(name, body):
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                started[name].set()
            results[name] = (r.status_code, sse_events(lines))

    threads = {n: threading.Thread(target=run, args=(n, b)) for n, b in (("long", long), ("short", short))}
    for n in ("long", "short"):  # the long one is generating before the short one starts
        threads[n].start()
        assert started[n].wait(20)
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + "/health").status_code != 503:
        assert time.monotonic() < deadline, "/health still 200 after SIGTERM"
        time.sleep(0.01)
    r = httpx.post(srv.url + "/v1/completions", json={**BODY}, headers=auth())
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
    assert r.headers.get("retry-after")
    for t in threads.values():
        t.join(30)
    assert srv.proc.wait(30) == 0
    status, events = results["short"]
    assert status == 200 and events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "length"
    status, events = results["long"]
    assert status == 200 and events[-1] == "[DONE]"
    assert "error" in events[-2] and events[-2]["error"]["code"] == "server_shutting_down"
    assert len(events) < 1000
    dereg = [c for c in router.calls if c[0] == "/deregister"]
    assert len(dereg) == 1 and dereg[0][1]["url"] == srv.url and dereg[0][2] == "Bearer router-secret"
