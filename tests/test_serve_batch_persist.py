"""The Batch API survives a server that dies: a real `strata serve` is SIGKILLed while a batch is half done,
a new one on the same --state-dir finishes it, and the output holds every custom_id exactly once (the lines
done before the kill are not run again). Also: a second server on a state directory in use is refused at
once, and a large upload streams to disk (a chunked one over --max-file-bytes is a 413)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from test_serve_utils import MODEL_NAME, ServerProcess, free_port, write_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N_LINES = 24


def _line(i: int) -> str:
    body = {"model": MODEL_NAME, "prompt": [300 + i] * 4, "max_tokens": 48, "ignore_eos": True, "temperature": 0}
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _results(state_dir, bid) -> list[dict]:
    path = os.path.join(state_dir, "batches", f"{bid}.results.jsonl")
    with open(path) as f:
        return [json.loads(x) for x in f if x.endswith("\n")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("persist") / "model")


def _check_streamed_upload(srv, client, state_dir):
    """A 32 MiB upload (limit 40 MiB) arrives whole; a chunked one over the limit is a 413 and leaves nothing."""
    line = (_line(0) + "\n").encode()
    data = line * ((32 << 20) // len(line))
    f = client.files.create(file=("big.jsonl", data), purpose="batch")
    assert f.bytes == len(data)
    with open(os.path.join(state_dir, "files", f.id + ".data"), "rb") as fh:
        assert fh.read() == data

    def body():  # no Content-Length: counted while it streams
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
        for _ in range(41):
            yield b"x" * (1 << 20)
    r = httpx.post(srv.url + "/v1/files", content=body(), timeout=60,
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert [x for x in os.listdir(os.path.join(state_dir, "files")) if x.endswith(".tmp")] == []
    assert httpx.get(srv.url + "/health").status_code == 200


def test_batch_survives_sigkill_and_resumes(model_dir, tmp_path):
    state_dir = str(tmp_path / "state")
    args = ("--state-dir", state_dir, "--batch-concurrency", "2", "--max-num-seqs", "2",
            "--max-file-bytes", str(40 << 20))
    srv = ServerProcess(model_dir, *args, log_path=str(tmp_path / "server1.log")).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        f = client.files.create(file=("in.jsonl", "\n".join(_line(i) for i in range(N_LINES)).encode()),
                                purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        # a second server on the same state directory is refused before it loads anything
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "strata.cli", "serve", model_dir, "--port", str(free_port()),
                            "--state-dir", state_dir], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and time.monotonic() - t0 < 10
        assert state_dir in r.stderr and "locked" in r.stderr, r.stderr
        # kill the server for real once some, not all, lines are done
        _wait(lambda: 2 <= client.batches.retrieve(b.id).request_counts.completed, 120, "the first results")
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(30)
    finally:
        srv.stop()
    before = _results(state_dir, b.id)
    assert 2 <= len(before) < N_LINES, f"{len(before)} lines done at the kill: the batch was not mid-flight"
    with open(os.path.join(state_dir, "batches", f"{b.id}.results.jsonl"), "a") as fh:
        fh.write('{"id": "batch_req_torn", "custom_id": "req-')  # as if killed in the middle of a write

    srv = ServerProcess(model_dir, *args, log_path=str(tmp_path / "server2.log")).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.files.retrieve(f.id).bytes > 0
        first = client.batches.retrieve(b.id)
        assert first.request_counts.completed >= len(before), first
        done = _wait(lambda: (x := client.batches.retrieve(b.id)).status in ("completed", "failed") and x,
                     180, "the resumed batch")
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == \
            (N_LINES, N_LINES, 0)
        assert done.error_file_id is None
        out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(N_LINES))  # once each
        assert all(o["response"]["body"]["usage"]["completion_tokens"] == 48 for o in out)
        # the lines finished before the kill were kept, not run again
        by_id = {o["custom_id"]: o["id"] for o in out}
        assert all(by_id[r["custom_id"]] == r["id"] for r in before)
        assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
        _check_streamed_upload(srv, client, state_dir)
    finally:
        srv.stop()
