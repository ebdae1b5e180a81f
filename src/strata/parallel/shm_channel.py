"""One writer, several readers: pickled messages through shared memory, for the control plane on one node.

The driver broadcasts every step's message to the other ranks. Over gloo that is two TCP collectives per step
(size, then payload); through shared memory it is a copy into a slot and a counter bump, and a reader that is
already waiting sees it within microseconds.

Layout of the segment: [written: int64][read by reader r: int64 x readers][slots x (length: int64, payload)].
Message k goes to slot k % slots. The writer waits until every reader has read message k - slots before it
reuses that slot; a reader waits until `written` passes its own count. x86-64 keeps stores in program order, so
a reader that sees the new `written` also sees the payload written before it.

Waiting: spin briefly, then yield, then sleep in growing steps up to 1 ms, so an idle engine's workers do not
burn a core. A message larger than a slot is sent as a marker (length -1); both sides then fall back to the
caller's slow path (a gloo broadcast).
"""
from __future__ import annotations

import pickle
import struct
import time
from multiprocessing import shared_memory
from typing import Callable

_Q = struct.Struct("<q")
TOO_BIG = -1


class ChannelClosed(RuntimeError):
    pass


SPIN_S = 50e-6  # busy-wait this long before sleeping: while the engine is busy the next message is that close


def _wait(ready: Callable[[], bool], stop: Callable[[], bool] | None, timeout_s: float | None, what: str) -> None:
    if ready():
        return
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < SPIN_S:
        if ready():
            return
    nap = 0.0
    while not ready():
        if stop is not None and stop():
            raise ChannelClosed(f"{what}: stopped")
        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{what}: nothing after {timeout_s:.0f} s")
        nap = min(1e-3, nap * 2 if nap else 1e-5)
        time.sleep(nap)


class ShmBroadcast:
    """`ShmBroadcast.create(readers)` on the writer, `ShmBroadcast.attach(name, readers, index)` on reader
    `index` (0-based). `send(obj) -> bool` (False: too big, use the slow path), `recv() -> (obj, ok)`."""

    def __init__(self, shm: shared_memory.SharedMemory, readers: int, slots: int, slot_bytes: int,
                 reader_index: int | None, owner: bool):
        self.shm, self.buf = shm, shm.buf
        self.readers, self.slots, self.slot_bytes = readers, slots, slot_bytes
        self.reader_index, self.owner = reader_index, owner
        self.base = 8 * (1 + readers)
        self.count = 0  # messages sent (writer) or received (reader)

    @classmethod
    def create(cls, readers: int, slots: int = 4, slot_bytes: int = 4 << 20) -> "ShmBroadcast":
        size = 8 * (1 + readers) + slots * (8 + slot_bytes)
        shm = shared_memory.SharedMemory(create=True, size=size)
        shm.buf[: 8 * (1 + readers)] = bytes(8 * (1 + readers))
        return cls(shm, readers, slots, slot_bytes, None, True)

    @classmethod
    def attach(cls, name: str, readers: int, index: int, slots: int = 4, slot_bytes: int = 4 << 20) -> "ShmBroadcast":
        # Readers are processes the writer spawned: they share its resource tracker, which forgets the segment
        # when the writer unlinks it (a reader that unregistered it here would make that unlink complain).
        shm = shared_memory.SharedMemory(name=name)
        return cls(shm, readers, slots, slot_bytes, index, False)

    @property
    def name(self) -> str:
        return self.shm.name

    def _get(self, off: int) -> int:
        return _Q.unpack_from(self.buf, off)[0]

    def _slot(self, k: int) -> int:
        return self.base + (k % self.slots) * (8 + self.slot_bytes)

    def send(self, obj, stop: Callable[[], bool] | None = None, timeout_s: float | None = None) -> bool:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        k = self.count
        if k >= self.slots:  # slot k % slots held message k - slots: every reader must be past it
            oldest = k - self.slots + 1
            _wait(lambda: min(self._get(8 + 8 * r) for r in range(self.readers)) >= oldest, stop, timeout_s,
                  "control channel: readers behind")
        off = self._slot(k)
        fits = len(data) <= self.slot_bytes
        if fits:
            self.buf[off + 8: off + 8 + len(data)] = data
        _Q.pack_into(self.buf, off, len(data) if fits else TOO_BIG)
        self.count = k + 1
        _Q.pack_into(self.buf, 0, self.count)  # publish last
        return fits

    def recv(self, stop: Callable[[], bool] | None = None, timeout_s: float | None = None):
        """Returns (obj, True), or (None, False) when the writer sent a too-big marker."""
        k = self.count
        _wait(lambda: self._get(0) > k, stop, timeout_s, "control channel: waiting for the driver")
        off = self._slot(k)
        n = self._get(off)
        obj = pickle.loads(bytes(self.buf[off + 8: off + 8 + n])) if n != TOO_BIG else None
        self.count = k + 1
        _Q.pack_into(self.buf, 8 + 8 * self.reader_index, self.count)
        return obj, n != TOO_BIG

    def close(self) -> None:
        try:
            self.buf = None
            self.shm.close()
            if self.owner:
                self.shm.unlink()
        except Exception:  # noqa: BLE001
            pass
