"""The shared-memory control channel: order, slot reuse, too-big messages, readers in other processes."""
import multiprocessing as mp

import pytest

from strata.parallel.shm_channel import ChannelClosed, ShmBroadcast


def _reader(name, readers, index, n, q):
    ch = ShmBroadcast.attach(name, readers, index, slots=3, slot_bytes=256)
    got = []
    for _ in range(n):
        obj, ok = ch.recv(timeout_s=30)
        got.append(obj if ok else "TOO_BIG")
    ch.close()
    q.put((index, got))


def test_two_reader_processes_see_every_message_in_order():
    w = ShmBroadcast.create(readers=2, slots=3, slot_bytes=256)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n = 25  # wraps the 3 slots several times: the writer must wait for the slower reader
    procs = [ctx.Process(target=_reader, args=(w.name, 2, i, n, q)) for i in range(2)]
    for p in procs:
        p.start()
    try:
        msgs = [("step", i, list(range(i % 7))) for i in range(n)]
        msgs[5] = ("big", "x" * 1000)  # does not fit a 256-byte slot: the readers get the marker
        sent_ok = [w.send(m, timeout_s=30) for m in msgs]
        results = dict(q.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
        w.close()
    assert sent_ok == [i != 5 for i in range(n)]
    expect = [m if i != 5 else "TOO_BIG" for i, m in enumerate(msgs)]
    assert results[0] == expect and results[1] == expect


def test_writer_stops_when_told_while_readers_lag():
    w = ShmBroadcast.create(readers=1, slots=2, slot_bytes=64)
    try:
        assert w.send(1) and w.send(2)  # both slots used, nobody reads
        with pytest.raises(ChannelClosed):
            w.send(3, stop=lambda: True)
        with pytest.raises(TimeoutError):
            w.send(3, timeout_s=0.05)
    finally:
        w.close()


def test_reader_times_out_without_messages():
    w = ShmBroadcast.create(readers=1, slots=2, slot_bytes=64)
    r = ShmBroadcast.attach(w.name, 1, 0, slots=2, slot_bytes=64)
    try:
        with pytest.raises(TimeoutError):
            r.recv(timeout_s=0.05)
        w.send({"a": 1})
        assert r.recv(timeout_s=5) == ({"a": 1}, True)
    finally:
        r.close()
        w.close()
