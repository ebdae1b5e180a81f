"""Output files: append-only JSONL, one line per input row, resumable and mergeable.

Invariants:
- A row is written with one `os.write` of `json + "\\n"` to a file opened with O_APPEND, so the newline
  is always the last byte that reaches the file. A process killed mid-write (SIGKILL) can therefore only
  leave a *torn last line*: bytes after the last newline. `repair_tail` cuts them off before anything is
  appended, so every complete line in the file is a whole row.
- Every output row has a key (`row_key`): the OpenAI `custom_id`, else the plain `id`, else `#row<N>` for
  rows whose id could not be read. Resume skips input rows whose key is already in the output; merge
  appends only rows whose key is not yet in the target. Each key therefore appears exactly once.
- Keys are held as 64-bit hashes in a sorted numpy array (`KeySet`): 8 bytes per finished row, so resuming
  or merging a 10-million-row output needs about 80 MB, not gigabytes of Python strings.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np


def row_key(obj: dict) -> str | None:
    """The resume/merge key of an output row (see module docstring); None for a line that is not a row."""
    if not isinstance(obj, dict):
        return None
    if "custom_id" in obj:  # OpenAI batch output line ("id" there is our batch_req_ id, not the key)
        cid = obj.get("custom_id")
        if cid is not None:
            return str(cid)
    elif obj.get("id") is not None:
        return str(obj["id"])
    row = obj.get("row")
    return f"#row{row}" if isinstance(row, int) else None


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class KeySet:
    """Set of keys stored as 64-bit hashes: a sorted numpy array plus a small set of recent additions."""

    _FOLD = 1 << 20

    def __init__(self) -> None:
        self._sorted = np.zeros(0, dtype=np.uint64)
        self._recent: set[int] = set()

    def add(self, key: str) -> None:
        self._recent.add(key_hash(key))
        if len(self._recent) >= self._FOLD:
            self._fold()

    def _fold(self) -> None:
        if self._recent:
            new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, new)
            self._recent.clear()

    def __contains__(self, key: str) -> bool:
        h = key_hash(key)
        if h in self._recent:
            return True
        a = self._sorted
        if not len(a):
            return False
        i = int(np.searchsorted(a, np.uint64(h)))
        return i < len(a) and int(a[i]) == h

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)


def repair_tail(path: str) -> int:
    """Cut a torn last line (bytes after the last newline) off `path`. Returns the number of bytes cut."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        pos = size
        chunk = 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def iter_lines(path: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete) for each line; the last one may be incomplete (torn)."""
    with open(path, "rb") as f:
        n = 0
        for line in f:
            complete = line.endswith(b"\n")
            yield n, line.rstrip(b"\r\n") if complete else line, complete
            n += 1


@dataclass
class ScanResult:
    keys: KeySet = field(default_factory=KeySet)
    rows: int = 0
    errors: int = 0  # rows that are error rows
    bad_lines: int = 0  # complete lines that are not JSON rows (ignored)
    torn: bool = False  # the file ends in a torn line


def is_error_row(obj: dict) -> bool:
    if obj.get("error") is not None:
        return True
    resp = obj.get("response")
    return isinstance(resp, dict) and resp.get("status_code", 200) != 200


def iter_rows(path: str):
    """(kind, key, obj, line) for each line of an output file: kind "row" for a keyed JSON row, "bad" for a
    complete line that is not one (key/obj None), and a final "torn" when the file ends mid-line."""
    for _, line, complete in iter_lines(path):
        if not complete:
            yield "torn", None, None, line
            return
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            yield "bad", None, None, line
            continue
        key = row_key(obj)
        yield ("bad", None, None, line) if key is None else ("row", key, obj, line)


def scan_output(path: str, into: ScanResult | None = None) -> ScanResult:
    """Keys of the rows already in `path` (missing file: none). A torn last line is not counted."""
    res = into or ScanResult()
    if not os.path.exists(path):
        return res
    for kind, key, obj, _ in iter_rows(path):
        if kind == "torn":
            res.torn = True
            continue
        if kind == "bad":
            res.bad_lines += 1
            continue
        res.keys.add(key)
        res.rows += 1
        if is_error_row(obj):
            res.errors += 1
    return res


def drop_error_rows(path: str) -> int:
    """Rewrite `path` without its error rows (so that they are retried); atomic via rename. Returns rows dropped."""
    if not os.path.exists(path):
        return 0
    repair_tail(path)
    tmp = path + ".retry.tmp"
    dropped = 0
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for line in src:
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and is_error_row(obj):
                dropped += 1
                continue
            dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    return dropped


class RowWriter:
    """Appends rows to a JSONL file, one `os.write` per row, so each finished row is on disk (in the page
    cache) as soon as it is written and a kill loses no finished row."""

    def __init__(self, path: str, *, overwrite: bool = False):
        self.path = path
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        if overwrite:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        else:
            repair_tail(path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self._fd: int | None = os.open(path, flags, 0o644)
        self.rows = 0

    def write(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8", "surrogatepass")
        self.write_line(data)

    def write_line(self, data: bytes) -> None:
        assert self._fd is not None, "writer is closed"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.rows += 1

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class MergeResult:
    appended: int = 0
    duplicates: int = 0
    torn: int = 0
    bad_lines: int = 0
    missing: list[str] = field(default_factory=list)
    errors: int = 0  # error rows among those appended


def merge_outputs(inputs: Iterable[str], output: str, *, allow_missing: bool = False,
                  remove_inputs: bool = False) -> MergeResult:
    """Append the rows of `inputs` (e.g. per-rank files) to `output`, skipping keys already there and torn
    last lines. Idempotent: merging again, or after an interrupted merge, adds nothing twice."""
    inputs = [p for p in inputs if os.path.abspath(p) != os.path.abspath(output)]
    res = MergeResult()
    for p in inputs:
        if not os.path.exists(p):
            if not allow_missing:
                raise FileNotFoundError(f"merge input {p} does not exist (use --allow-missing to skip it)")
            res.missing.append(p)
    present = scan_output(output).keys
    with RowWriter(output) as w:
        for p in inputs:
            if not os.path.exists(p):
                continue
            for kind, key, obj, line in iter_rows(p):
                if kind == "torn":
                    res.torn += 1
                    continue
                if kind == "bad":
                    res.bad_lines += 1
                    continue
                if key in present:
                    res.duplicates += 1
                    continue
                present.add(key)
                w.write_line(line + b"\n")
                res.appended += 1
                if is_error_row(obj):
                    res.errors += 1
    if remove_inputs:
        for p in inputs:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
    return res
