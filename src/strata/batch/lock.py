"""Exclusive locks on output files, so that two runs never write one output (every row would be done twice).

The lock is a kernel lock (`fcntl.flock`) on a sidecar file `<output>.lock`, held for the life of the job:
the kernel drops it when the process ends, however it ends (SIGKILL included), so a dead run never blocks
the next one. After taking it, the holder writes its pid, host and start time into the file so that a
run that finds it taken can say who holds it. A released lock's file is removed; one left by a killed run
is simply taken over (a taker checks that the file it locked is still the one at the path, so removing
it races with no one).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time

from strata.core.errors import StrataError

log = logging.getLogger("strata.batch")


class OutputLocked(StrataError):
    """Another process holds the lock of an output file."""

    def __init__(self, path: str, holder: dict | None):
        self.path = path
        self.holder = holder or {}
        super().__init__(f"{path} is being written by another run ({describe(self.holder)}); wait for it to "
                         f"finish or stop it, or pass --wait-for-lock to wait")


def lock_path(path: str) -> str:
    return path + ".lock"


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "holder unknown: it has only just started"
    s = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if holder.get("started"):
        s += ", since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
    if holder.get("command"):
        s += f": {holder['command']}"
    return s


def read_holder(path: str) -> dict:
    """What the holder of `path`'s lock wrote about itself ({} if nothing yet)."""
    try:
        with open(lock_path(path), "rb") as f:
            data = json.loads(f.read() or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class OutputLock:
    """`with OutputLock(path):` holds `path`'s lock. `wait=False` raises OutputLocked at once if it is taken."""

    def __init__(self, path: str, *, wait: bool = False):
        self.path = path
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        lp = lock_path(self.path)
        os.makedirs(os.path.dirname(os.path.abspath(lp)), exist_ok=True)
        waited = False
        while True:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = self._holder_after_write()
                    if not self.wait:
                        raise OutputLocked(self.path, holder) from None
                    if not waited:
                        log.info("batch: waiting for the lock of %s (%s)", self.path, describe(holder))
                        waited = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as e:  # a file system without flock (Lustre mounted noflock...)
                    log.warning("batch: cannot lock %s (%s); going on without the lock: do not start a second "
                                "run on this output", self.path, e)
                    os.close(fd)
                    return self
                # The previous holder may have removed the file between our open and our lock: then we
                # hold a lock on a file no one else will ever look at; take the one at the path instead.
                try:
                    same = os.stat(lp).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def _holder_after_write(self, timeout: float = 0.5) -> dict:
        """The holder's record; a holder that has just taken the lock writes it a moment later."""
        deadline = time.monotonic() + timeout
        while True:
            holder = read_holder(self.path)
            if holder.get("pid") or time.monotonic() >= deadline:
                return holder
            time.sleep(0.02)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(lock_path(self.path))  # while still holding it: see acquire
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class LockSet:
    """Several output locks taken together (an output and its rank files); released in reverse order."""

    def __init__(self, paths, *, wait: bool = False):
        self.paths = list(dict.fromkeys(os.path.abspath(p) for p in paths))
        self.wait = wait
        self._held: list[OutputLock] = []

    def __enter__(self) -> "LockSet":
        try:
            for p in sorted(self.paths):  # one order for everyone: two waiters cannot deadlock
                self._held.append(OutputLock(p, wait=self.wait).acquire())
        except BaseException:
            self.release()
            raise
        return self

    def add(self, path: str) -> None:
        self._held.append(OutputLock(os.path.abspath(path), wait=self.wait).acquire())

    def release(self) -> None:
        while self._held:
            self._held.pop().release()

    def __exit__(self, *exc) -> None:
        self.release()
