"""Checks `strata serve` makes before it loads the model, so that a taken port or a state directory in use
fails in well under a second, not after the load. Nothing here imports torch.

- `bind_socket`: binds the listening socket now (uvicorn listens on it later); a taken port is an error
  naming the address.
- `StateDir`: the Batch API's state directory, created if missing, checked writable, and locked with
  `fcntl.flock` for the life of the process, so that two servers never run the same batches.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket


class PreflightError(Exception):
    """A problem found before the model loads; the message names it."""


def default_state_dir(port: int) -> str:
    """`$XDG_STATE_HOME/strata/serve/<hostname>-<port>` (XDG_STATE_HOME defaults to ~/.local/state).

    Keyed by host name and port: a restart on the same port finds its batches again, while servers on other
    ports (or other nodes sharing a home directory) each get their own directory."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "strata", "serve", f"{socket.gethostname()}-{port}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (connections are refused until uvicorn listens)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PreflightError(f"port {port} on {host} is already in use (pick another with --port)") from None
        raise PreflightError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class StateDir:
    """The state directory, locked by this process until `release()` (or exit)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PreflightError(f"--state-dir {self.path} is not usable: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f" (pid {holder})" if holder else ""
                raise PreflightError(f"--state-dir {self.path} is locked by another strata serve{who}; "
                                     "give this server its own --state-dir") from None
            raise PreflightError(f"--state-dir {self.path}: cannot lock it: {e.strerror or e}") from None
        self._fd = fd
        try:  # the holder's pid, for the message another server prints; and proof the directory is writable
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            probe = os.path.join(self.path, f".probe-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            self.release()
            raise PreflightError(f"--state-dir {self.path} is not writable: {e.strerror or e}") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
