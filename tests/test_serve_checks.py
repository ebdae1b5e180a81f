"""Checks `strata serve` makes before loading the model (a taken port, a state directory that is locked or
unusable, --enable-auto-tool-choice without --tool-call-parser: a non-zero exit within 2 s, naming the problem),
and tool requests the server cannot honour refused with a 400 naming the parameter (tool_choice "auto", the
default with tools, without --enable-auto-tool-choice; a tool_choice without tools or naming an unknown
function; the deprecated functions/function_call). Tool calling itself: test_serve_structured.py."""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time

import openai
import pytest

from test_serve_utils import MODEL_NAME, ServerProcess, free_port, write_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STRATA = [shutil.which("strata")] if shutil.which("strata") else [sys.executable, "-m", "strata.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("checks") / "model")


def _serve_fails_fast(model_dir, *args) -> str:
    t0 = time.monotonic()
    r = subprocess.run([*STRATA, "serve", model_dir, *args], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode != 0, r.stderr
    assert took < 2.0, f"took {took:.1f} s: {r.stderr[-500:]}"
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_port_in_use_fails_fast(model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _serve_fails_fast(model_dir, "--port", str(port), "--state-dir", str(tmp_path / "state"))
    assert f"port {port}" in err and "in use" in err, err


def test_state_dir_locked_or_unusable_fails_fast(model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with open(locked / "lock", "w") as holder:  # what a running server holds
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = _serve_fails_fast(model_dir, "--port", str(free_port()), "--state-dir", str(locked))
    assert str(locked) in err and "locked" in err, err

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    err = _serve_fails_fast(model_dir, "--port", str(free_port()), "--state-dir", str(not_a_dir))
    assert str(not_a_dir) in err and "not usable" in err, err

    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        err = _serve_fails_fast(model_dir, "--port", str(free_port()), "--state-dir", str(ro / "state"))
        assert str(ro / "state") in err, err


def test_auto_tool_choice_without_parser_fails_fast(model_dir, tmp_path):
    err = _serve_fails_fast(model_dir, "--port", str(free_port()), "--state-dir", str(tmp_path / "state"),
                            "--enable-auto-tool-choice")
    assert "--tool-call-parser" in err, err


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("checks_server")
    srv = ServerProcess(model_dir, "--state-dir", str(d / "state"), log_path=str(d / "server.log")).start()
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    srv.stop()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
MSGS = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("extra, param", [
    ({"tools": TOOLS}, "tool_choice"),                       # "auto" by default: needs --enable-auto-tool-choice
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [TOOLS[0]["function"]]}, "functions"),
])
def test_tool_requests_refused_naming_the_param(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=2, **extra)
    assert e.value.body["param"] == param, e.value.body


def test_tools_with_tool_choice_none_accepted(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=2, tools=TOOLS,
                                       tool_choice="none")
    assert r.choices[0].message.tool_calls in (None, [])
    assert r.usage.completion_tokens >= 1
