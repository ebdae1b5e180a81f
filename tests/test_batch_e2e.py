"""`strata batch` end to end on the real engine: the default job on the embedded SmolLM2, and a tiny random
Llama (`--load-format dummy`, SmolLM2's tokenizer) for formats, SIGKILL + resume, two ranks as two processes,
`--data-parallel-size 2` on CPU, and a real Slurm (Debian's slurm-wlm, started by tests/slurm/start.sh)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from strata.batch.output import row_key

HERE = os.path.dirname(os.path.abspath(__file__))
SLURM_DIR = os.path.join(HERE, "slurm")
TINY_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": True}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A config-only Llama directory (random weights via --load-format dummy) with SmolLM2's tokenizer files."""
    from strata.engine.tokenizer import Tokenizer
    from strata.models.embedded import default_model_path
    d = tmp_path_factory.mktemp("tiny-llama")
    Tokenizer.from_gguf(default_model_path()).hf.save_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(TINY_CFG))
    return str(d)


def engine_flags(model):
    return ["--model", model, "--load-format", "dummy", "--kv-cache-memory", str(16 << 20), "--num-threads", "1"]


def strata(*argv, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "strata.cli", *argv], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, **kw)


def rows_of(path):
    with open(path, "rb") as f:
        data = f.read()
    assert not data or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.splitlines()]


def write_posts(path, n, bad=True):
    lines = [json.dumps({"pid": f"p{i}", "body": f"Post {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 4)})
             for i in range(n)]
    if bad:
        lines[3] = "{this is not json"
        lines[5] = json.dumps({"pid": "p5"})  # missing field
    path.write_text("\n".join(lines) + "\n")
    return [f"p{i}" for i in range(n)]


# ---------------------------------------------------------------- the default job, real weights

def test_default_job_embedded_model(tmp_path):
    """`strata batch` with no input: the seed64 selection summarised by the embedded SmolLM2 (1 row here)."""
    # Shorter than the real job (512-token prompts, 100 tokens) to stay fast on 2 CPU cores.
    r = strata("batch", "--limit", "1", "--max-input-tokens", "128", "--max-tokens", "6", "--num-threads", "2",
               cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = rows_of(tmp_path / "out" / "summaries.jsonl")  # the default output, not in the working directory
    assert len(rows) == 1
    for row in rows:
        assert row["error"] is None and isinstance(row["id"], str) and row["text"].strip()
        assert row["finish_reason"] in ("stop", "length") and 0 < row["output_tokens"] <= 6
        assert row["truncated"] and row["prompt_tokens"] == 128 and 150 < row["prompt_tokens_untruncated"]
    assert rows[0]["id"] == "IWkMGRK_0"  # the first post of the seed64 selection
    assert "1 rows ok" in r.stderr


# ---------------------------------------------------------------- formats through the real engine (in-process)

@pytest.fixture(scope="module")
def engine(tiny_model):
    from strata.config.engine import EngineArgs
    from strata.engine.llm_engine import LLMEngine
    return LLMEngine.from_engine_args(EngineArgs(model=tiny_model, load_format="dummy", kv_cache_memory=16 << 20,
                                                 max_model_len=256))


def run_inproc(engine, *argv):
    from strata.batch.cli import run_batch
    from strata.cli import build_parser
    args = build_parser("batch").parse_args(["batch", *argv, "--progress", "none"])
    return run_batch(args, engine=engine)


def test_formats_with_bad_rows_real_engine(engine, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    ids = write_posts(tmp_path / "in.jsonl", 12)
    out = tmp_path / "out.jsonl"
    flags = ["--id-field", "pid", "--text-field", "body", "--system-prompt", "Summarise.", "--max-tokens", "4"]
    assert run_inproc(engine, "--input", str(tmp_path / "in.jsonl"), "--output", str(out), *flags) == 1
    rows = rows_of(out)
    assert Counter(row_key(r) for r in rows) == Counter([*(i for i in ids if i not in ("p3", "p5")), "p5", "#row3"])
    errs = {row_key(r): r["error"]["type"] for r in rows if r["error"]}
    assert errs == {"#row3": "invalid_json", "p5": "missing_field"}
    assert all(r["output_tokens"] >= 1 and r["prompt_tokens"] > 10 for r in rows if not r["error"])
    assert not engine.has_unfinished_requests()

    # Parquet, truncation recorded, too-long-for-the-context rows become error rows
    table = pa.Table.from_pylist([{"pid": "short", "body": "hello there"},
                                  {"pid": "long", "body": "word " * 400},
                                  {"pid": "huge", "body": "word " * 400}])
    pq.write_table(table, tmp_path / "in.parquet")
    out2 = tmp_path / "out2.jsonl"
    assert run_inproc(engine, "--input", str(tmp_path / "in.parquet"), "--output", str(out2), "--id-field", "pid",
                      "--text-field", "body", "--max-tokens", "4", "--max-input-tokens", "64", "--limit", "2") == 0
    got = {r["id"]: r for r in rows_of(out2)}
    assert got["long"]["truncated"] and got["long"]["prompt_tokens"] == 64 and got["long"]["prompt_tokens_untruncated"] > 300
    assert not got["short"]["truncated"]
    out3 = tmp_path / "out3.jsonl"
    assert run_inproc(engine, "--input", str(tmp_path / "in.parquet"), "--output", str(out3), "--id-field", "pid",
                      "--text-field", "body", "--max-tokens", "4") == 1
    got = {r["id"]: r for r in rows_of(out3)}
    assert got["huge"]["error"]["type"] in ("prompt_too_long", "invalid_parameter") and got["short"]["error"] is None

    # OpenAI batch format
    req = tmp_path / "requests.jsonl"
    req.write_text("\n".join(json.dumps(x) for x in [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "Once upon", "max_tokens": 2, "temperature": 0.7, "seed": 1}},
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100000}},
    ]) + "\n")
    res = tmp_path / "results.jsonl"
    assert run_inproc(engine, "--input", str(req), "--output", str(res)) == 1
    got = {r["custom_id"]: r for r in rows_of(res)}
    assert got["a"]["response"]["status_code"] == 200
    assert got["a"]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert got["b"]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert got["c"]["response"]["status_code"] == 400 and got["c"]["response"]["body"]["error"]["param"] == "max_tokens"


def test_batched_tokenisation_equals_per_row(engine):
    """The prefetch thread tokenises rows in batches (GIL released); the ids equal the per-row path's."""
    from strata.batch.jobs import JobBuilder, JobOptions
    from strata.batch.readers import Record
    texts = ["short post", "  leading spaces\nand lines\n", "word " * 300, "émoji 🙂 and ünïcode " * 20, "x"]
    for opts in (JobOptions(system_prompt="Summarise.", max_input_tokens=64), JobOptions()):
        b = JobBuilder(opts, engine.tokenizer)
        assert b._encode_batch is not None
        recs = [Record(i, data={"text": t}) for i, t in enumerate(texts)]
        b.prepare(recs)
        assert all("prompt_ids" in r.cache for r in recs)
        batched = [b.build(r, str(r.row), r.row) for r in recs]
        plain = [JobBuilder(opts, engine.tokenizer).build(Record(i, data={"text": t}), str(i), i)
                 for i, t in enumerate(texts)]
        assert [j.prompt_ids for j in batched] == [j.prompt_ids for j in plain]
        assert [j.truncated for j in batched] == [j.truncated for j in plain]


# ---------------------------------------------------------------- SIGKILL and resume, real engine

def test_sigkill_then_resume_real_engine(tiny_model, tmp_path):
    ids = write_posts(tmp_path / "in.jsonl", 60, bad=False)
    out = tmp_path / "out.jsonl"
    argv = ["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--id-field", "pid",
            "--text-field", "body", "--max-tokens", "16", "--max-in-flight", "2", "--progress", "none",
            *engine_flags(tiny_model)]
    rng = random.Random(7)
    kills = 0
    for _ in range(1):  # many random kills: test_batch_data.py; here one, on the real engine
        p = subprocess.Popen([sys.executable, "-m", "strata.cli", *argv], stderr=subprocess.DEVNULL)
        start = out.stat().st_size if out.exists() else 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:  # wait until rows are being written
            if out.exists() and out.stat().st_size > start:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 1
    done_before = len(rows_of(out)) if out.read_bytes().endswith(b"\n") else None
    r = subprocess.run([sys.executable, "-m", "strata.cli", *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = Counter(row_key(x) for x in rows_of(out))
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}
    assert done_before is None or done_before < len(ids)


# ---------------------------------------------------------------- ranks

def test_two_ranks_as_two_processes(tiny_model, tmp_path):
    ids = write_posts(tmp_path / "in.jsonl", 30)
    out = tmp_path / "res.jsonl"
    argv = ["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--id-field", "pid",
            "--text-field", "body", "--max-tokens", "3", "--progress", "none", *engine_flags(tiny_model)]
    procs = [subprocess.Popen([sys.executable, "-m", "strata.cli", *argv], env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode in (0, 1), err[-3000:]
    assert 1 in [p.returncode for p in procs]  # the rank with the bad rows says so
    shards = [{row_key(x) for x in rows_of(tmp_path / f"res.rank{r}.jsonl")} for r in range(2)]
    assert not (shards[0] & shards[1])
    expect = {*(i for i in ids if i != "p3"), "#row3"}
    assert shards[0] | shards[1] == expect
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    r = strata("batch", "merge", "--output", str(out), "--remove-inputs")
    assert r.returncode == 0, r.stderr
    assert Counter(row_key(x) for x in rows_of(out)) == Counter(expect)
    assert not list(tmp_path.glob("res.rank*"))


def test_data_parallel_two_cpu_workers(tiny_model, tmp_path):
    ids = write_posts(tmp_path / "in.jsonl", 24, bad=False)
    out = tmp_path / "dp.jsonl"
    r = strata("batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--id-field", "pid",
               "--text-field", "body", "--max-tokens", "3", "--data-parallel-size", "2", "--device", "cpu",
               "--progress", "log", *engine_flags(tiny_model)[:-2], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr and "rank 1/2" in r.stderr
    assert Counter(row_key(x) for x in rows_of(out)) == Counter(ids)
    assert not list(tmp_path.glob("dp.rank*"))


# ---------------------------------------------------------------- a real Slurm

@pytest.fixture(scope="session")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (tests/slurm/setup.sh installs Debian's slurm-wlm + munge)")
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "start.sh")], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"Slurm could not start: {(r.stderr or r.stdout).strip()[-500:]}")
    conf = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    yield {"SLURM_CONF": conf}
    subprocess.run(["sh", os.path.join(SLURM_DIR, "stop.sh")], timeout=60)


def sbatch_and_wait(script, cwd, env, timeout=400):
    """Submit and poll the job's state (`sbatch --wait` polls only every ~10 s)."""
    env = {**os.environ, **env}
    r = subprocess.run(["sbatch", "--parsable", "--chdir", str(cwd), str(script)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
        fields = dict(kv.split("=", 1) for kv in q.stdout.split() if "=" in kv)
        state = fields.get("JobState", "")
        if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
            return state, fields.get("ExitCode")
        time.sleep(0.3)
    subprocess.run(["scancel", job], env=env)
    return "TIMEOUT(test)", None


def test_slurm_sbatch_two_tasks(slurm, tiny_model, tmp_path):
    ids = write_posts(tmp_path / "in.jsonl", 20, bad=False)
    out = tmp_path / "slurm-out.jsonl"
    script = tmp_path / "job.sbatch"
    r = strata("slurm", "batch", "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "00:10:00",
               "--log", str(tmp_path / "job-%j.log"), "--script-output", str(script),
               "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--id-field", "pid", "--text-field", "body",
               "--max-tokens", "3", *engine_flags(tiny_model), env=slurm)
    assert r.returncode == 0, r.stderr
    state, exit_code = sbatch_and_wait(script, tmp_path, slurm)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.log"))
    assert state == "COMPLETED" and exit_code == "0:0", f"{state} {exit_code}\n{logs[-4000:]}"
    assert "rank 0/2" in logs and "rank 1/2" in logs, logs[-4000:]
    assert Counter(row_key(x) for x in rows_of(out)) == Counter(ids)
    assert not list(tmp_path.glob("slurm-out.rank*"))
