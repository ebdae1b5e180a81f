"""The Batch API's state on disk: uploaded and output files (`FileStore`), each batch's results file
(`Results`, appended and fsync'd as requests finish, a torn last line cut off on reopening), and the atomic
writes both use. The layout is described in serve/batch_api.py."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid

from strata.serve.errors import APIError

logger = logging.getLogger("strata.serve.batch")


def _now() -> int:
    return int(time.time())


def _write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` all at once (write a temporary file, fsync it, rename it over)."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------- files
class Upload:
    """An upload being streamed to a temporary file next to the final one."""

    def __init__(self, store: "FileStore"):
        self.id = store.new_id()
        self.tmp = os.path.join(store.dir, f".upload-{self.id}.tmp")
        self.f = open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        _remove(self.tmp)


def _load_records(directory: str, what: str) -> dict[str, dict]:
    """The JSON records (`<id>.json`) of a state directory by id; leftovers of writes cut short by a crash
    (`*.tmp`) are removed, unreadable records skipped with a warning."""
    records: dict[str, dict] = {}
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.endswith(".tmp"):
            _remove(path)
        elif name.endswith(".json"):
            try:
                with open(path) as f:
                    rec = json.load(f)
                records[rec["id"]] = rec
            except (OSError, ValueError, KeyError):
                logger.warning("ignoring unreadable %s record %s", what, path)
    return records


class FileStore:
    def __init__(self, root: str):
        self.dir = os.path.join(root, "files")
        os.makedirs(self.dir, exist_ok=True)
        self._meta: dict[str, dict] = _load_records(self.dir, "file")
        for name in os.listdir(self.dir):  # data whose record was never written (a crash in between)
            if name.endswith(".data") and name[:-5] not in self._meta:
                _remove(os.path.join(self.dir, name))

    def path(self, fid: str) -> str:
        return os.path.join(self.dir, fid + ".data")

    def new_id(self) -> str:
        return "file-" + uuid.uuid4().hex

    def begin_upload(self) -> Upload:
        return Upload(self)

    def commit_upload(self, up: Upload, filename: str, purpose: str) -> dict:
        """Blocking (run it in a thread): make the upload durable, then record it."""
        up.f.flush()
        os.fsync(up.f.fileno())
        up.f.close()
        os.replace(up.tmp, self.path(up.id))
        return self.record(up.id, filename, purpose)

    def write(self, fid: str, filename: str, purpose: str, data_path: str) -> dict:
        """Blocking: a file made by the server (a batch's output), moved into place and recorded."""
        os.replace(data_path, self.path(fid))
        return self.record(fid, filename, purpose)

    def record(self, fid: str, filename: str, purpose: str) -> dict:
        old = self._meta.get(fid)
        meta = {"id": fid, "object": "file", "bytes": os.path.getsize(self.path(fid)),
                "created_at": old["created_at"] if old else _now(), "filename": filename, "purpose": purpose,
                "status": "processed", "status_details": None}
        _write_atomic(os.path.join(self.dir, fid + ".json"), json.dumps(meta).encode())
        self._meta[fid] = meta
        return meta

    def get(self, fid: str) -> dict:
        meta = self._meta.get(fid)
        if meta is None:
            raise APIError(404, f"No such file: {fid}", param="file_id", code="file_not_found")
        return meta

    def list(self, purpose: str | None = None) -> list[dict]:
        return [m for m in sorted(self._meta.values(), key=lambda m: m["created_at"])
                if purpose is None or m["purpose"] == purpose]

    def delete(self, fid: str) -> dict:
        self.get(fid)
        del self._meta[fid]
        _remove(os.path.join(self.dir, fid + ".json"))  # the record first: data without one is swept at start
        _remove(self.path(fid))
        return {"id": fid, "object": "file", "deleted": True}


# ---------------------------------------------------------------------------------------------- input lines


class Results:
    """A batch's results file: one JSON line per finished request, appended and flushed as it finishes (a
    process kill loses nothing), fsync'd by one background sync at a time (group commit)."""

    def __init__(self, path: str):
        self.path = path
        self.f = None
        self._sync: asyncio.Task | None = None
        self._again = False

    def load(self) -> tuple[set[str], int, int]:
        """Blocking: scan() the results so far, then open the file for appending."""
        found = self.scan()
        self.f = open(self.path, "a", encoding="utf-8")
        return found

    def scan(self) -> tuple[set[str], int, int]:
        """Blocking: (custom_ids with a result, completed, failed). A line torn by a crash is cut off."""
        ids, ok, failed, good = set(), 0, 0, 0
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw) if raw.endswith(b"\n") else None
                    except ValueError:
                        rec = None
                    if rec is None:
                        break
                    good += len(raw)
                    if rec["custom_id"] not in ids:
                        ids.add(rec["custom_id"])
                        ok, failed = (ok + 1, failed) if rec["error"] is None else (ok, failed + 1)
            if good < os.path.getsize(self.path):
                os.truncate(self.path, good)
        return ids, ok, failed

    def append(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        if self._sync is None or self._sync.done():
            self._sync = asyncio.get_running_loop().create_task(self._fsync())
        else:
            self._again = True  # the running sync may have started before this write: one more round

    async def _fsync(self) -> None:
        while True:
            self._again = False
            await asyncio.to_thread(os.fsync, self.f.fileno())
            if not self._again:
                return

    async def close(self) -> None:
        if self.f is None:
            return
        if self._sync is not None:
            await asyncio.gather(self._sync, return_exceptions=True)
        await asyncio.to_thread(os.fsync, self.f.fileno())
        self.f.close()
        self.f = None


# ---------------------------------------------------------------------------------------------- batches
