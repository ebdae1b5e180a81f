"""A small multipart/form-data parser for POST /v1/files (the body is already bounded and in memory)."""
from __future__ import annotations

from dataclasses import dataclass

from strata.core.sampling_params import ParameterError


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8")


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


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    ctype, params = _params(content_type or "")
    if ctype != "multipart/form-data" or not params.get("boundary"):
        raise ParameterError(None, "expected a multipart/form-data body with a boundary")  # type: ignore[arg-type]
    delim = b"--" + params["boundary"].encode("latin-1")
    pieces = body.split(delim)
    if len(pieces) < 3:
        raise ParameterError(None, "malformed multipart body")  # type: ignore[arg-type]
    out: dict[str, Part] = {}
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # closing delimiter
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            raise ParameterError(None, "malformed multipart part (no header end)")  # type: ignore[arg-type]
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        disp, dparams = _params(headers.get("content-disposition", ""))
        if disp != "form-data" or "name" not in dparams:
            continue
        out[dparams["name"]] = Part(dparams["name"], dparams.get("filename"), headers.get("content-type"), data)
    return out
