"""`strata chat` through the installed entry point, stdin a pipe, on a tiny random Llama (real engine, SmolLM2's
tokenizer and chat template): the conversation is kept from turn to turn, /reset forgets it, and the streamed
text is the reply; a system prompt is used."""
from __future__ import annotations

import json
import subprocess

from test_serve_utils import write_tiny_model

ENGINE = ["--load-format", "dummy", "--kv-cache-memory", str(16 << 20), "--num-threads", "1", "--max-tokens", "4"]


def chat(model: str, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["strata", "chat", "--model", model, *ENGINE, *flags], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_chat_keeps_the_conversation_and_streams(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    r = chat(model, "hello\n\nhello\n/reset\nhello\n/exit\nnever read\n", "--json")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(turns) == 3, r.stdout   # the empty line is skipped, nothing after /exit is read
    first, second, after_reset = (t["usage"] for t in turns)
    assert all(t["role"] == "assistant" and t["finish_reason"] == "length" for t in turns)
    # the second prompt holds the first exchange; after /reset the prompt is the first one again
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]
    assert after_reset == first and turns[2]["content"] == turns[0]["content"]

    streamed = chat(model, "hello\nhello\n")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == turns[0]["content"] + "\n" + turns[1]["content"] + "\n"

    # a system prompt of its own replaces the template's default one
    system = json.loads(chat(model, "", "--json", "--quick", "hello", "--system-prompt", "Be brief. " * 40).stdout)
    assert system["usage"]["prompt_tokens"] > first["prompt_tokens"] + 40


def test_chat_bad_sampling_flag_is_named(tmp_path):
    r = chat(write_tiny_model(tmp_path / "model"), "hello\n", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr and not r.stdout
