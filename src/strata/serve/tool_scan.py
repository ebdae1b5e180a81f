"""Finding tool-call objects in JSON text that arrives in pieces (for the tool parsers).

A call object is `{"name": "...", "arguments": {...}}` ("parameters" is read as "arguments", Llama 3's
spelling). The scanner follows JSON's nesting (strings, escapes, brackets) just far enough to know, after
each piece, each call's name (once its string is complete) and where its arguments value starts and ends,
so the arguments can be streamed as raw text while they are written. It validates nothing: the parsers
check the finished calls with `json.loads`. Generation itself is constrained by the grammar engine, not by
this code.
"""
from __future__ import annotations

import json

_ARG_KEYS = ("arguments", "parameters")


class ScannedCall:
    def __init__(self, scanner: "CallScanner"):
        self._s = scanner
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.args_kind = ""        # first character of the arguments value: "{", '"', ...
        self.closed = False

    def _raw_args(self) -> str:
        end = self.args_end if self.args_end is not None else len(self._s.buf)
        return self._s.buf[self.args_start:end]

    def streamable_arguments(self) -> str:
        """The arguments text written so far, when it is an object (it only grows); else ''."""
        if self.args_start is None or self.args_kind != "{":
            return ""
        return self._raw_args()

    def final_arguments(self) -> str:
        """The arguments as the call's JSON text: the object's raw text, a JSON string's content (some models
        write the arguments as an encoded string), '{}' when there are none."""
        if self.args_start is None:
            return "{}"
        raw = self._raw_args()
        if self.args_kind == '"':
            try:
                value = json.loads(raw)
            except ValueError:
                return raw
            return value if isinstance(value, str) else raw
        return raw


class CallScanner:
    """`depth` is where call objects sit: 0 for top-level objects (several may follow each other, separated by
    whitespace, `;` or `,`), 1 for the elements of a top-level array."""

    def __init__(self, depth: int = 0):
        self.call_depth = depth
        self.call_level = depth + 1    # len(stack) directly inside a call object
        self.buf = ""
        self.calls: list[ScannedCall] = []
        self.only_calls = True         # nothing but calls, brackets, separators and whitespace outside calls
        self._stack: list[str] = []
        self._in_str = self._esc = False
        self._cur: ScannedCall | None = None
        self._phase = "key"            # inside a call: key, keystr, colon, value, valstr, scalar, after
        self._key_start = self._val_start = 0
        self._key = ""
        self._role = ""                # the value being read: "name", "args" or ""

    def feed(self, text: str) -> None:
        start = len(self.buf)
        self.buf += text
        for i in range(start, len(self.buf)):
            self._char(i, self.buf[i])

    # ------------------------------------------------------------------------------------------ scanning
    def _char(self, i: int, ch: str) -> None:
        inside_call = self._cur is not None and len(self._stack) == self.call_level
        if self._in_str:
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._in_str = False
                if inside_call:
                    self._string_closed(i)
            return
        if inside_call:
            self._in_call(i, ch)
            return
        level = len(self._stack)
        if ch == '"':
            self._in_str = True
            if level <= self.call_depth:
                self.only_calls = False
        elif ch in "{[":
            if ch == "{" and level == self.call_depth:
                self._open_call()
            self._stack.append(ch)
        elif ch in "}]":
            if self._stack:
                self._stack.pop()
            if self._cur is not None and len(self._stack) == self.call_level:
                self._value_end(i + 1)   # a container value of the call ended
        elif level <= self.call_depth and not ch.isspace() and ch not in ";,":
            self.only_calls = False

    def _open_call(self) -> None:
        self._cur = ScannedCall(self)
        self.calls.append(self._cur)
        self._phase = "key"

    def _close_call(self) -> None:
        self._stack.pop()
        self._cur.closed = True
        self._cur = None

    def _in_call(self, i: int, ch: str) -> None:
        phase = self._phase
        if phase == "scalar":
            if ch in ",}" or ch.isspace():
                self._value_end(i)
                phase = "after"
            else:
                return
        if phase in ("key", "after"):
            if ch == '"' and phase == "key":
                self._in_str, self._key_start, self._phase = True, i, "keystr"
            elif ch == ",":
                self._phase = "key"
            elif ch == "}":
                self._close_call()
        elif phase == "colon":
            if ch == ":":
                self._phase = "value"
        elif phase == "value" and not ch.isspace():
            self._val_start = i
            self._role = ("name" if self._key == "name" else
                          "args" if self._key in _ARG_KEYS and self._cur.args_start is None else "")
            if self._role == "args":
                self._cur.args_start, self._cur.args_kind = i, ch
            if ch == '"':
                self._in_str, self._phase = True, "valstr"
            elif ch in "{[":
                self._stack.append(ch)
                self._phase = "container"
            else:
                self._phase = "scalar"

    def _string_closed(self, i: int) -> None:
        if self._phase == "keystr":
            try:
                self._key = json.loads(self.buf[self._key_start:i + 1])
            except ValueError:
                self._key = ""
            self._phase = "colon"
        elif self._phase == "valstr":
            self._value_end(i + 1)

    def _value_end(self, end: int) -> None:
        if self._role == "name" and self._cur.name is None:
            try:
                name = json.loads(self.buf[self._val_start:end])
            except ValueError:
                name = None
            self._cur.name = name if isinstance(name, str) else None
        elif self._role == "args":
            self._cur.args_end = end
        self._role = ""
        self._phase = "after"
