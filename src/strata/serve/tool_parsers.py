"""Tool calls out of generated text, whole or streamed: one small class per output format.

A parser's `parse(text)` returns `(content, calls)`: the text meant for the user (None when there is none)
and the `ToolCall`s. `streamer()` returns an object whose `feed(text_delta)` and `finish()` return the
`Delta` to send (a content string and OpenAI `delta.tool_calls` entries). Streaming and non-streaming give
the same calls: the arguments string of a call is the raw JSON text of its arguments object as the model
wrote it, sent in fragments as it grows.

- `hermes` (Hermes, Qwen 2.5/3): `text <tool_call>{"name": ..., "arguments": {...}}</tool_call>...`
- `llama3_json` (Llama 3.1/3.2/3.3): the whole output is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`, several calls separated by `;`)
- `RequiredCallsParser` (tool_choice "required": the grammar forces `[{"name": ..., "arguments": {...}}, ...]`)
  and `NamedCallParser` (a named function: the grammar forces its arguments object) read grammar-constrained
  output; they are not chosen by --tool-call-parser.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from strata.serve.tool_scan import CallScanner, ScannedCall


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def __add__(self, other: "Delta") -> "Delta":
        return Delta(self.content + other.content, self.tool_calls + other.tool_calls)


def _valid_calls(scanned: list[ScannedCall]) -> list[ToolCall] | None:
    """ToolCalls, or None when one of them is incomplete or malformed."""
    out = []
    for c in scanned:
        if not c.closed or not isinstance(c.name, str) or not c.name:
            return None
        args = c.final_arguments()
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except ValueError:
            return None
        out.append(ToolCall(c.name, args))
    return out


class CallDeltas:
    """Turns the growing state of scanned calls into OpenAI `delta.tool_calls` entries: the first entry of a
    call carries its index, id, type and name (arguments ""); later ones the new argument text."""

    def __init__(self, first_index: int = 0):
        self.first_index = first_index
        self.sent_header: list[str] = []   # ids of the calls whose header went out
        self.sent_args: list[int] = []     # characters of arguments sent per call

    def diff(self, calls: list[ScannedCall], final: bool = False) -> list[dict]:
        out = []
        for i, c in enumerate(calls):
            if c.name is None:
                break  # later calls wait for this one's name (indices go out in order)
            idx = self.first_index + i
            if i == len(self.sent_header):
                self.sent_header.append(new_call_id())
                self.sent_args.append(0)
                out.append({"index": idx, "id": self.sent_header[i], "type": "function",
                            "function": {"name": c.name, "arguments": ""}})
            args = c.final_arguments() if (c.closed or final) else c.streamable_arguments()
            if len(args) > self.sent_args[i]:
                frag = args[self.sent_args[i]:]
                self.sent_args[i] = len(args)
                if out and out[-1]["index"] == idx and not out[-1]["function"]["arguments"]:
                    out[-1]["function"]["arguments"] = frag
                else:
                    out.append({"index": idx, "function": {"arguments": frag}})
        return out

    @property
    def count(self) -> int:
        return len(self.sent_header)


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# ---------------------------------------------------------------------------------------------- hermes
class HermesToolParser:
    """`<tool_call>{json}</tool_call>` blocks (Hermes 2 Pro, Qwen 2.5/3). Content is the text before the first
    block; text after the calls is dropped. If a block does not parse, the whole text is content."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        first = text.find(self.start)
        if first < 0:
            return text, []
        scanned: list[ScannedCall] = []
        pos = first
        while pos >= 0:
            body_start = pos + len(self.start)
            stop = text.find(self.end, body_start)
            scanner = CallScanner(depth=0)
            scanner.feed(text[body_start:] if stop < 0 else text[body_start:stop])
            scanned.extend(scanner.calls)
            if stop < 0:
                break
            pos = text.find(self.start, stop + len(self.end))
        calls = _valid_calls(scanned)
        if not calls:
            return text, []
        content = text[:first]
        return (content if content.strip() else None), calls

    def streamer(self) -> "_HermesStream":
        return _HermesStream(self)


class _HermesStream:
    def __init__(self, parser: HermesToolParser):
        self.p = parser
        self.pending = ""          # text not yet handled (may hold the start of a tag)
        self.in_call = False
        self.seen_call = False
        self.scanned: list[ScannedCall] = []  # calls of finished blocks
        self.scanner: CallScanner | None = None
        self.deltas = CallDeltas()

    def _calls(self) -> list[ScannedCall]:
        return self.scanned + (self.scanner.calls if self.scanner else [])

    def feed(self, text: str) -> Delta:
        self.pending += text
        content = ""
        while self.pending:
            if not self.in_call:
                i = self.pending.find(self.p.start)
                if i < 0:
                    keep = _held_prefix(self.pending, self.p.start)
                    if not self.seen_call:
                        content += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    break
                if not self.seen_call:
                    content += self.pending[:i]
                self.pending = self.pending[i + len(self.p.start):]
                self.in_call = self.seen_call = True
                self.scanner = CallScanner(depth=0)
            else:
                i = self.pending.find(self.p.end)
                if i < 0:
                    keep = _held_prefix(self.pending, self.p.end)
                    self.scanner.feed(self.pending[:len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                    break
                self.scanner.feed(self.pending[:i])
                self.scanned.extend(self.scanner.calls)
                self.scanner = None
                self.pending = self.pending[i + len(self.p.end):]
                self.in_call = False
        return Delta(content, self.deltas.diff(self._calls()))

    def finish(self) -> Delta:
        content = ""
        if self.in_call and self.scanner is not None:
            self.scanner.feed(self.pending)
        elif not self.seen_call:
            content = self.pending
        self.pending = ""
        return Delta(content, self.deltas.diff(self._calls(), final=True))

    @property
    def num_calls(self) -> int:
        return self.deltas.count


# ---------------------------------------------------------------------------------------------- llama 3
class Llama3JsonToolParser:
    """Llama 3.1+ JSON tool calls: the output is `{"name": ..., "parameters": {...}}` (or "arguments"),
    optionally after `<|python_tag|>`, several separated by `;`. Output that does not start so is content."""

    name = "llama3_json"
    tag = "<|python_tag|>"

    def _body(self, text: str) -> str | None:
        s = text.lstrip()
        if s.startswith(self.tag):
            return s[len(self.tag):]
        return s if s.startswith("{") else None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if body is None:
            return text, []
        scanner = CallScanner(depth=0)
        scanner.feed(body)
        calls = _valid_calls(scanner.calls)
        if not calls or not scanner.only_calls:
            return text, []
        return None, calls

    def streamer(self) -> "_Llama3Stream":
        return _Llama3Stream(self)


class _Llama3Stream:
    def __init__(self, parser: Llama3JsonToolParser):
        self.p = parser
        self.mode: str | None = None   # None: undecided, "content" or "calls"
        self.pending = ""
        self.scanner = CallScanner(depth=0)
        self.deltas = CallDeltas()

    def feed(self, text: str) -> Delta:
        if self.mode == "content":
            return Delta(text)
        if self.mode == "calls":
            self.scanner.feed(text)
            return Delta("", self.deltas.diff(self.scanner.calls))
        self.pending += text
        s = self.pending.lstrip()
        if not s or (s.startswith("<") and self.p.tag.startswith(s)):
            return Delta()  # undecided yet
        body = self.p._body(self.pending)
        self.pending, held = "", self.pending
        if body is None:
            self.mode = "content"
            return Delta(held)
        self.mode = "calls"
        return self.feed(body)

    def finish(self) -> Delta:
        if self.mode is None:
            held, self.pending = self.pending, ""
            return Delta(held)
        if self.mode == "calls":
            return Delta("", self.deltas.diff(self.scanner.calls, final=True))
        return Delta()

    @property
    def num_calls(self) -> int:
        return self.deltas.count


# ---------------------------------------------------------------------------------------------- constrained
class RequiredCallsParser:
    """tool_choice "required": the grammar forces a JSON array of {"name", "arguments"} objects."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        scanner = CallScanner(depth=1)
        scanner.feed(text)
        calls = _valid_calls(scanner.calls)
        return (None, calls) if calls else (text, [])

    def streamer(self) -> "_ScanStream":
        return _ScanStream(CallScanner(depth=1))


class _ScanStream:
    def __init__(self, scanner: CallScanner):
        self.scanner = scanner
        self.deltas = CallDeltas()

    def feed(self, text: str) -> Delta:
        self.scanner.feed(text)
        return Delta("", self.deltas.diff(self.scanner.calls))

    def finish(self) -> Delta:
        return Delta("", self.deltas.diff(self.scanner.calls, final=True))

    @property
    def num_calls(self) -> int:
        return self.deltas.count


class NamedCallParser:
    """tool_choice naming a function: the grammar forces that function's arguments object."""

    def __init__(self, function_name: str):
        self.function_name = function_name

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        args = text.strip()
        try:
            ok = isinstance(json.loads(args), dict)
        except ValueError:
            ok = False
        return (None, [ToolCall(self.function_name, args)]) if ok else (text, [])

    def streamer(self) -> "_NamedStream":
        return _NamedStream(self.function_name)


class _NamedStream:
    def __init__(self, name: str):
        self.name = name
        self.id = new_call_id()
        self.started = False   # the header went out
        self.begun = False     # the first non-space character of the arguments went out
        self.ws = ""           # whitespace held back: none is sent before or after the object

    def feed(self, text: str) -> Delta:
        calls = []
        if not self.started:
            self.started = True
            calls.append({"index": 0, "id": self.id, "type": "function",
                          "function": {"name": self.name, "arguments": ""}})
        if not self.begun:
            text = text.lstrip()
        text = self.ws + text
        body = text.rstrip()
        self.ws = text[len(body):]
        if body:
            self.begun = True
            if calls:
                calls[0]["function"]["arguments"] = body
            else:
                calls.append({"index": 0, "function": {"arguments": body}})
        return Delta("", calls)

    def finish(self) -> Delta:
        return Delta()

    @property
    def num_calls(self) -> int:
        return 1 if self.started else 0


TOOL_PARSERS: dict[str, type] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def get_tool_parser(name: str):
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r} (known: {', '.join(sorted(TOOL_PARSERS))})") from None
