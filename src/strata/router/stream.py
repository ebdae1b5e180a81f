"""Server-sent-event parsing and the stitching that lets one client stream outlive a replica.

`StreamState` watches the OpenAI chunks of a streamed request as they pass through the router: it keeps
the text and token count already sent to the client, rewrites later segments so the client sees one id,
and builds the request that continues the generation on another replica:

* `/v1/completions`: the prompt plus the text already streamed (or, when the replica reports token ids,
  the prompt's token ids plus the generated ids, which continues exactly);
* `/v1/chat/completions`: the conversation plus the partial assistant message, with
  `"continue_final_message": true, "add_generation_prompt": false` (vLLM's convention).

`max_tokens` (and `max_completion_tokens`, `min_tokens`) shrink by the tokens already produced.
"""
from __future__ import annotations

from collections import deque
from typing import Any

try:  # orjson is faster; plain json works the same
    import orjson as _orjson

    def loads(b: bytes | str) -> Any:
        return _orjson.loads(b)

    def dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj)
except ImportError:  # pragma: no cover
    import json as _json

    def loads(b: bytes | str) -> Any:
        return _json.loads(b)

    def dumps(obj: Any) -> bytes:
        return _json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

DONE = b"[DONE]"


class SSEParser:
    """Incremental parser: feed raw bytes, get the `data:` payloads of complete events."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.buf + chunk if self.buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
            if buf.endswith(b"\r"):          # a \r\n split across chunks
                self.buf = buf
                return []
        out: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            block = buf[start:end]
            start = end + 2
            if block.startswith(b"data:") and b"\n" not in block:     # the common case
                out.append(block[6:] if block[5:6] == b" " else block[5:])
                continue
            data = []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
            if data:
                out.append(b"\n".join(data))
        self.buf = buf[start:]
        return out


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class UpstreamError(Exception):
    """The replica failed (connection, stall, early end, or an error event in the stream)."""


class Upstream:
    """Events of one streaming response from a replica."""

    __slots__ = ("resp", "parser", "pending")

    def __init__(self, resp):
        self.resp = resp
        self.parser = SSEParser()
        self.pending: deque[bytes] = deque()

    async def next(self) -> bytes | None:
        """Next payload, or None at the end of the response."""
        while not self.pending:
            chunk = await self.resp.content.readany()
            if not chunk:
                return None
            self.pending.extend(self.parser.feed(chunk))
        return self.pending.popleft()

    def close(self) -> None:
        try:
            self.resp.close()
        except Exception:  # pragma: no cover
            pass


class StreamState:
    """What one streamed request has sent so far, across replicas."""

    def __init__(self, kind: str | None, body: dict):
        self.kind = kind                     # "completions" | "chat" | None (opaque passthrough)
        self.body = body
        self.id: str | None = None
        self.created: int | None = None
        self.model: str | None = None
        self.text = ""
        self.tokens = 0                      # completion tokens produced so far (index 0)
        self.token_ids: list[int] | None = [] # generated ids, while every chunk carried them
        self.prompt_token_ids: list[int] | None = None
        self.finish_reason: str | None = None
        self.segment = 0                     # 0: first replica; k: after k failovers
        self.segment_tokens_before = 0
        self.segment_started = False
        self.failovers = 0
        self.chunks = 0
        self.why_not = None                  # why failover is impossible, if it is
        if kind is None:
            self.why_not = "endpoint has no resumable stream"
        elif (body.get("n") or 1) != 1:
            self.why_not = "n > 1"
        elif kind == "completions" and body.get("echo"):
            self.why_not = "echo"
        elif kind == "completions" and not isinstance(body.get("prompt"), str) and not _is_token_list(body.get("prompt")):
            self.why_not = "batched prompts"
        elif (body.get("best_of") or 1) > 1 or (body.get("use_beam_search")):
            self.why_not = "best_of / beam search"
        so = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        self.client_usage = bool(so.get("include_usage"))
        self.client_continuous = bool(so.get("continuous_usage_stats"))
        # ask the replica for per-chunk usage so that the token count (and so the budget of a continuation)
        # is exact even when one chunk carries several tokens; what the client did not ask for is removed
        self.inject_usage = self.why_not is None and not self.client_continuous

    def upstream_body(self, body: dict | None = None) -> dict:
        body = dict(self.body if body is None else body)
        if self.inject_usage:
            so = dict(body.get("stream_options") or {})
            so["include_usage"] = True
            so["continuous_usage_stats"] = True
            body["stream_options"] = so
        return body

    @property
    def can_failover(self) -> bool:
        return self.why_not is None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, payload: bytes) -> bytes | None:
        """One upstream payload -> bytes for the client (or None to drop it). Raises UpstreamError on an
        error event."""
        if self.kind is None:
            return sse(payload)
        try:
            obj = loads(payload)
        except ValueError:
            raise UpstreamError(f"replica sent malformed JSON in the stream: {payload[:120]!r}") from None
        if not isinstance(obj, dict):
            raise UpstreamError("replica sent a non-object chunk")
        if "error" in obj and not obj.get("choices"):
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            raise UpstreamError(f"replica reported an error mid-stream: {msg}")
        self.chunks += 1
        first_segment = self.segment == 0
        if first_segment and self.id is None:
            self.id, self.created, self.model = obj.get("id"), obj.get("created"), obj.get("model")
        if self.prompt_token_ids is None and isinstance(obj.get("prompt_token_ids"), list):
            self.prompt_token_ids = obj["prompt_token_ids"]
        choices = obj.get("choices") or []
        drop = False
        modified = False
        usage = obj.get("usage")
        if self.inject_usage and usage is not None:
            if not choices:
                if not self.client_usage:
                    return None            # the usage-only chunk the client did not ask for
            elif not self.client_continuous:
                obj.pop("usage")
                modified = True
        for ch in choices:
            if ch.get("index", 0) != 0:
                continue
            if self.kind == "chat":
                delta = ch.get("delta") or {}
                if delta.get("tool_calls"):
                    self.why_not = "tool calls"
                piece = delta.get("content") or ""
                if not first_segment and not piece and ch.get("finish_reason") is None and \
                        "role" in delta and not delta.get("tool_calls"):
                    drop = True          # the new replica's opening role chunk: the client has one already
            else:
                piece = ch.get("text") or ""
            ids = ch.get("token_ids")
            if isinstance(ids, list):
                self.tokens += len(ids)
                if self.token_ids is not None:
                    self.token_ids.extend(ids)
            elif piece:
                self.tokens += 1
                self.token_ids = None    # ids no longer complete
            self.text += piece
            if ch.get("finish_reason") is not None:
                self.finish_reason = ch["finish_reason"]
        if choices and isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.tokens = self.segment_tokens_before + usage["completion_tokens"]   # exact, from the replica
        if drop:
            return None
        if first_segment:
            return sse(dumps(obj)) if modified else sse(payload)
        # later segments: present them as the original stream
        if self.id is not None:
            obj["id"] = self.id
        if self.created is not None:
            obj["created"] = self.created
        if self.model is not None:
            obj["model"] = self.model
        obj.pop("prompt_token_ids", None)
        usage = obj.get("usage")
        if isinstance(usage, dict) and self.segment_tokens_before:
            k = self.segment_tokens_before
            if isinstance(usage.get("prompt_tokens"), int):
                usage["prompt_tokens"] = max(0, usage["prompt_tokens"] - k)
            if isinstance(usage.get("completion_tokens"), int):
                usage["completion_tokens"] += k
        return sse(dumps(obj))

    def _budget(self, body: dict, key: str) -> bool:
        """Shrink a token budget; False when it is used up."""
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            left = v - self.tokens
            if key == "min_tokens":
                body[key] = max(0, left)
                return True
            if left <= 0:
                return False
            body[key] = left
        return True

    def continuation(self) -> dict | None:
        """The request that continues this stream on another replica; None when the budget is spent."""
        body = dict(self.body)
        for key in ("max_tokens", "max_completion_tokens"):
            if not self._budget(body, key):
                return None
        self._budget(body, "min_tokens")
        if not self.text and not self.tokens:
            return dict(self.body)     # nothing generated yet: the original request, as it was
        if self.kind == "completions":
            prompt = self.body.get("prompt")
            if self.token_ids is not None and len(self.token_ids) == self.tokens:
                if _is_token_list(prompt):
                    body["prompt"] = list(prompt) + self.token_ids
                elif self.prompt_token_ids is not None:
                    body["prompt"] = list(self.prompt_token_ids) + self.token_ids
                else:
                    body["prompt"] = prompt + self.text
            else:
                if not isinstance(prompt, str):
                    return _fail("cannot continue a token-id prompt without the generated token ids")
                body["prompt"] = prompt + self.text
            body["echo"] = False
        else:
            msgs = list(self.body.get("messages") or [])
            msgs.append({"role": "assistant", "content": self.text})
            body["messages"] = msgs
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return body

    def begin_segment(self) -> None:
        self.segment += 1
        self.failovers += 1
        self.segment_tokens_before = self.tokens

    def final_chunk(self, reason: str = "length") -> bytes:
        """A closing chunk the router writes itself (token budget spent exactly at the failure)."""
        if self.kind == "chat":
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return sse(dumps({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                          "choices": [choice]}))


def _is_token_list(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def _fail(msg: str):
    raise UpstreamError(msg)


def error_event(message: str, code: int = 502, type_: str = "router_error") -> bytes:
    return sse(dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}))
