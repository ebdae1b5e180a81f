"""Helpers for the server tests (no tests here): a tiny random model, a real `strata serve` process on
loopback, and a Prometheus text parser."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

# Llama architecture with SmolLM2's vocabulary (the embedded tokenizer is used for a bare config
# directory) and tiny layers, random weights: fast on CPU, real engine, real tokenizer.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2,
}
MODEL_NAME = "tiny"


def write_tiny_model(path) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TINY_CONFIG, f)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str, *extra: str, port: int | None = None, log_path: str | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "strata.serve.cli", model_dir, "--load-format", "dummy",
                    "--kv-cache-memory", str(64 << 20), "--served-model-name", MODEL_NAME, "--port",
                    str(self.port), "--disable-access-log", "--log-level", "warning", *extra]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server did not become healthy in {timeout} s: {self.log()}")

    def log(self) -> str:
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path) as f:
                return f.read()[-4000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value} with the model_name label dropped, e.g. 'strata:request_success_total{finished_reason="length"}'."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        labels = ",".join(x for x in (labels or "").strip("{}").split(",") if x and not x.startswith("model_name="))
        out[f"{name}{{{labels}}}" if labels else name] = float(value)
    return out


def metrics(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    return parse_metrics(r.text)


def sse_events(lines) -> list:
    """Data payloads of an SSE stream: parsed JSON objects, and the string '[DONE]'."""
    out = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
