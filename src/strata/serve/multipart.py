"""An incremental multipart/form-data parser for POST /v1/files: the body is fed as it arrives and a file
part goes straight to a writable sink (a file on disk), so an upload is never held whole in memory.

    parser = MultipartParser(content_type, file_sink)   # file_sink(part) -> object with .write(bytes), or None
    parser.feed(chunk); ...; parser.close()
    parser.parts                                         # {name: Part}; a file part's bytes went to its sink
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from strata.core.sampling_params import ParameterError

MAX_HEADER_BYTES = 16 * 1024   # one part's headers
MAX_FIELD_BYTES = 1024 * 1024  # a non-file field (e.g. `purpose`), kept in memory


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes = b""  # a field's value; empty for a file part (its bytes went to the sink)
    size: int = 0

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ParameterError(self.name, f"form field {self.name!r} is not UTF-8") from None


def _error(msg: str) -> ParameterError:
    return ParameterError(None, msg)  # type: ignore[arg-type]


def _params(header_value: str) -> tuple[str, dict[str, str]]:
    """'form-data; name="file"; filename="a.jsonl"' -> ("form-data", {"name": "file", "filename": "a.jsonl"})"""
    items = []
    cur, quoted, esc = [], False, False
    for ch in header_value:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\" and quoted:
            esc = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur).strip())
    main, params = items[0].lower(), {}
    for it in items[1:]:
        if "=" in it:
            k, v = it.split("=", 1)
            params[k.strip().lower()] = v.strip()
    return main, params


class MultipartParser:
    def __init__(self, content_type: str, file_sink: Callable[[Part], object | None]):
        ctype, params = _params(content_type or "")
        if ctype != "multipart/form-data" or not params.get("boundary"):
            raise _error("expected a multipart/form-data body with a boundary")
        self._delim = b"--" + params["boundary"].encode("latin-1")
        self._file_sink = file_sink
        self._buf = bytearray()
        self._state = "preamble"   # -> after_delim -> headers -> body -> after_delim ... -> end
        self._part: Part | None = None
        self._out = None           # the current file part's sink (None: a field, or a part nobody wants)
        self._field = bytearray()
        self.parts: dict[str, Part] = {}

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while self._step():
            pass

    def close(self) -> None:
        if self._state != "end":
            raise _error("malformed multipart body: it ends before the closing boundary")

    # ---- one step of the state machine; False when it needs more bytes
    def _step(self) -> bool:
        buf, delim = self._buf, self._delim
        if self._state == "preamble":
            i = buf.find(delim)
            if i < 0:
                del buf[:max(0, len(buf) - len(delim))]  # keep what could be the start of the boundary
                return False
            del buf[:i + len(delim)]
            self._state = "after_delim"
            return True
        if self._state == "after_delim":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "end"
            elif buf[:2] == b"\r\n":
                self._state = "headers"
            else:
                raise _error("malformed multipart body: bad boundary line")
            del buf[:2]
            return True
        if self._state == "headers":
            if buf[:2] == b"\r\n":
                head, end = b"", 2
            else:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise _error("malformed multipart part: headers too long")
                    return False
                head, end = bytes(buf[:i]), i + 4
            del buf[:end]
            self._start_part(head)
            self._state = "body"
            return True
        if self._state == "body":
            i = buf.find(b"\r\n" + delim)
            if i < 0:
                keep = len(delim) + 2  # the tail could be the start of the next boundary
                if len(buf) > keep:
                    self._emit(bytes(buf[:len(buf) - keep]))
                    del buf[:len(buf) - keep]
                return False
            self._emit(bytes(buf[:i]))
            del buf[:i + 2 + len(delim)]
            self._end_part()
            self._state = "after_delim"
            return True
        buf.clear()  # end: the epilogue is ignored
        return False

    def _start_part(self, head: bytes) -> None:
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        disp, dparams = _params(headers.get("content-disposition", ""))
        self._part = self._out = None
        self._field.clear()
        if disp != "form-data" or "name" not in dparams:
            return  # not a form field: skipped
        name = dparams["name"]
        if name in self.parts:
            raise ParameterError(name, f"the form has more than one {name!r} part")
        self._part = Part(name, dparams.get("filename"), headers.get("content-type"))
        if self._part.filename is not None:
            self._out = self._file_sink(self._part)

    def _emit(self, data: bytes) -> None:
        part = self._part
        if part is None or not data:
            return
        part.size += len(data)
        if part.filename is not None:
            if self._out is not None:
                self._out.write(data)
            return
        if part.size > MAX_FIELD_BYTES:
            raise ParameterError(part.name, f"form field {part.name!r} is larger than {MAX_FIELD_BYTES} bytes")
        self._field += data

    def _end_part(self) -> None:
        if self._part is not None:
            if self._part.filename is None:
                self._part.data = bytes(self._field)
            self.parts[self._part.name] = self._part
        self._part = self._out = None
