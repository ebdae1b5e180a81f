"""One run per output: two real `strata batch` processes on one output, SIGKILL of the holder, --wait-for-lock,
and `strata batch merge` while a rank still writes its file. A tiny random Llama (`--load-format dummy`,
SmolLM2's tokenizer) keeps the engine fast; each process is the installed entry point."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from strata.batch.lock import OutputLock, OutputLocked, lock_path
from strata.batch.output import row_key

TINY_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A config-only Llama folder (random weights via --load-format dummy); the engine then uses the embedded
    SmolLM2 tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(TINY_CFG))
    return str(d)


def batch_argv(model, inp, out, *more):
    return ["strata", "batch", "--input", str(inp), "--output", str(out), "--id-field", "pid", "--text-field", "body",
            "--max-tokens", "200", "--ignore-eos", "--progress", "none", "--model", model,
            "--load-format", "dummy", "--kv-cache-memory", str(16 << 20), "--num-threads", "1", *more]


def write_posts(path, n):
    path.write_text("".join(json.dumps({"pid": f"p{i}", "body": f"Post {i}: the quick brown fox. " * 3}) + "\n"
                            for i in range(n)))
    return [f"p{i}" for i in range(n)]


def rows_of(path):
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.splitlines()]


def wait_for(cond, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_runs_on_one_output_then_sigkill_and_rerun(tiny_model, tmp_path):
    ids = write_posts(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out.jsonl"
    argv = batch_argv(tiny_model, tmp_path / "in.jsonl", out)
    # The first run does one row at a time (200 steps each), so it is still at it while the others start.
    first = subprocess.Popen([*argv, "--max-in-flight", "1"], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 180, "the first run's rows", first)

        # A second run on the same output stops at once, naming the holder, before it loads anything heavy.
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-X", "importtime", "-m", "strata.cli", *argv[1:]],
                                capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
        assert second.returncode == 2, second.stderr[-2000:]
        err = [line for line in second.stderr.splitlines() if not line.startswith("import time:")]
        msg = "\n".join(err)
        assert f"pid {first.pid} on host {socket.gethostname()}" in msg and str(out) in msg, msg
        assert "--wait-for-lock" in msg
        imported = {line.rsplit("|", 1)[-1].strip() for line in second.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "torch" not in imported and "transformers" not in imported
        assert first.poll() is None  # the holder runs on, untouched
        print(f"locked output answered in {took:.2f} s")

        # A third run waits for the lock; the holder is killed (SIGKILL: the kernel drops its lock) and the
        # waiter does the rest.
        log = tmp_path / "third.log"
        with open(log, "w") as f:
            third = subprocess.Popen([*argv, "--wait-for-lock"], stderr=f)
        wait_for(lambda: "waiting for the lock" in log.read_text(), 60, "the third run to wait", third)
        assert third.poll() is None
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert third.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
    counts = Counter(row_key(r) for r in rows_of(out))
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}
    assert not os.path.exists(lock_path(str(out)))  # a released lock's file is removed

    # The lock file a killed run leaves behind blocks no one: a rerun finds nothing left to do.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from strata.batch.lock import OutputLock; "
                               "OutputLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert os.path.exists(lock_path(str(out)))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nothing left to do" in r.stderr
    assert len(rows_of(out)) == len(ids)


def test_merge_waits_for_ranks_and_each_rank_file_is_locked(tiny_model, tmp_path):
    ids = write_posts(tmp_path / "in.jsonl", 24)
    out = tmp_path / "res.jsonl"
    rank0 = tmp_path / "res.rank0.jsonl"
    argv = batch_argv(tiny_model, tmp_path / "in.jsonl", out)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    p0 = subprocess.Popen([*argv, "--max-in-flight", "1"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: rank0.exists() and rank0.stat().st_size > 0, 180, "rank 0's rows", p0)
        # the same rank twice: refused; merging while rank 0 writes: refused, nothing merged or removed
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"pid {p0.pid}" in r.stderr, r.stderr[-2000:]
        r = subprocess.run(["strata", "batch", "merge", "--output", str(out), "--remove-inputs"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"pid {p0.pid}" in r.stderr and "res.rank0.jsonl" in r.stderr, r.stderr
        assert rank0.exists() and not out.exists()
        assert p0.poll() is None
        # merge --wait-for-lock waits for the rank to finish, then merges its whole file
        merge = subprocess.Popen(["strata", "batch", "merge", "--output", str(out), "--remove-inputs",
                                  "--wait-for-lock"], stderr=subprocess.PIPE, text=True)
        assert p0.wait(timeout=300) == 0
        _, err = merge.communicate(timeout=60)
        assert merge.returncode == 0, err
    finally:
        if p0.poll() is None:
            p0.kill()
    got = Counter(row_key(r) for r in rows_of(out))
    assert sorted(got) == sorted(ids[0::2]) and set(got.values()) == {1}
    assert not rank0.exists()


def test_lock_in_process(tmp_path):
    """The lock itself: exclusive, names its holder, taken over after release, even across a removed file."""
    out = str(tmp_path / "sub" / "o.jsonl")
    a = OutputLock(out).acquire()
    with pytest.raises(OutputLocked) as e:
        OutputLock(out).acquire()  # another open file description: flock excludes it, as another process
    assert e.value.holder["pid"] == os.getpid() and e.value.holder["host"] == socket.gethostname()
    a.release()
    assert not os.path.exists(lock_path(out))
    with OutputLock(out), pytest.raises(OutputLocked):
        OutputLock(out).acquire()
    with OutputLock(out):
        pass
