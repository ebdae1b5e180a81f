"""The batch data layer without a model: readers, prompts, output rows, resume, sharding, merge, Slurm
script. The job runner takes its engine as an argument; here it is `EchoEngine`, a few lines that answer
instantly, so that these tests stay fast. tests/test_batch_e2e.py runs the same paths on the real engine."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from strata.batch import output as bout
from strata.batch.jobs import JobBuilder, JobOptions, render_template
from strata.batch.readers import (Record, iter_json_array, open_reader, read_csv, read_jsonl, read_sharegpt,
                                  sharegpt_path)
from strata.batch.runner import Counters, select_items
from strata.batch.sharding import detect_rank, find_rank_files, rank_output_path
from strata.core.errors import PromptTooLongError
from strata.core.outputs import CompletionOutput, RequestOutput

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


# ---------------------------------------------------------------- an instant engine for the data layer

class CharTokenizer:
    """One token per character (+ BOS 1); a ChatML-style chat template."""
    chat_template = "chatml"
    eos_token_ids = [2]

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + (ord(c) % 4000) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 3) for i in ids if i >= 3)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        s = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        if add_generation_prompt:
            s += "<|assistant|>\n"
        return self.encode(s, False) if tokenize else s


class EchoEngine:
    """Finishes up to `per_step` requests per step; the output text names the prompt length.
    A prompt containing "ENGINEFAIL" finishes with an engine error."""

    def __init__(self, max_model_len=4096, per_step=16, delay=0.0):
        self.tokenizer = CharTokenizer()
        self.model_name = "echo"
        self.max_model_len = max_model_len
        self.per_step, self.delay = per_step, delay
        self.queue: dict[str, tuple] = {}
        self.aborted: list[str] = []
        self.max_seen_in_flight = 0
        self._E = self.tokenizer.encode("E", False)[0]

    @property
    def config(self):
        return type("C", (), {"max_model_len": self.max_model_len, "max_num_seqs": 8})()

    def add_request(self, rid, prompt, params):
        if len(prompt) >= self.max_model_len:
            raise PromptTooLongError(len(prompt), self.max_model_len)
        self.queue[rid] = (prompt, params)
        self.max_seen_in_flight = max(self.max_seen_in_flight, len(self.queue))

    def abort_request(self, ids):
        for r in [ids] if isinstance(ids, str) else ids:
            if self.queue.pop(r, None) is not None:
                self.aborted.append(r)

    def has_unfinished_requests(self):
        return bool(self.queue) or bool(self.aborted)

    def step(self):
        if self.delay:
            time.sleep(self.delay)
        outs = []
        for r in self.aborted:
            outs.append(RequestOutput(r, None, [], [CompletionOutput(0, finish_reason="abort")], finished=True))
        self.aborted = []
        for rid in list(self.queue)[: self.per_step]:
            prompt, params = self.queue.pop(rid)
            n = min(params.max_tokens or 4, 4)
            if self._E in prompt and "ENGINEFAIL" in self.tokenizer.decode(prompt):
                outs.append(RequestOutput(rid, None, prompt, [CompletionOutput(0, finish_reason="error")],
                                          finished=True, error="boom"))
                continue
            outs.append(RequestOutput(rid, None, prompt, [CompletionOutput(
                0, text=f"echo {len(prompt)}", token_ids=[7] * n, finish_reason="length")], finished=True))
        return outs


def batch_args(*argv):
    from strata.cli import build_parser
    return build_parser("batch").parse_args(["batch", *argv])


def run(argv, engine=None, **kw):
    from strata.batch.cli import run_batch
    return run_batch(batch_args(*argv, "--progress", "none"), engine=engine or EchoEngine(**kw))


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def key_counts(path):
    from collections import Counter
    return Counter(bout.row_key(r) for r in read_rows(path))


# ---------------------------------------------------------------- readers

def test_readers_stream_and_mark_bad_rows(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{bad\n[1, 2]\n{"a": 2}\n')
    recs = [r.load() for r in read_jsonl(str(p))]
    assert [r.row for r in recs] == [0, 1, 2, 3]
    assert recs[0].data == {"a": 1} and recs[3].data == {"a": 2}
    assert recs[1].error.type == "invalid_json" and recs[2].error.type == "invalid_row"

    c = tmp_path / "a.csv"
    c.write_text('id,text\n1,"hello, world"\n2\n3,"multi\nline"\n')
    recs = list(read_csv(str(c)))
    assert recs[0].data == {"id": "1", "text": "hello, world"}
    assert recs[1].error.type == "invalid_row"
    assert recs[2].data["text"] == "multi\nline"

    j = tmp_path / "cut.json"
    j.write_text('[{"x": 1}, {"x": 2},\n {"x": 3, "y": "unfinish')
    assert list(iter_json_array(str(j), chunk_chars=7)) == [{"x": 1}, {"x": 2}]
    j.write_text('[{"x": 1}, 2.5, {"x": [1, 2, 3]}]')
    assert list(iter_json_array(str(j), chunk_chars=3)) == [{"x": 1}, 2.5, {"x": [1, 2, 3]}]


def test_sharegpt_reader_head():
    recs = []
    for r in read_sharegpt(sharegpt_path()):
        recs.append(r)
        if len(recs) == 5:
            break
    assert recs[0].data["id"] and isinstance(recs[0].data["text"], str)
    assert recs[0].data["first_from"] in ("human", "gpt")
    assert [r.row for r in recs] == list(range(5))


# ---------------------------------------------------------------- prompts

def test_template_and_truncation():
    assert render_template("T: {meta.title} {{x}} {n}", {"meta": {"title": "hi"}, "n": 3}) == "T: hi {x} 3"
    tok = CharTokenizer()
    rec = lambda d: Record(0, data=d)  # noqa: E731
    # content truncation keeps the template around the text whole
    b = JobBuilder(JobOptions(system_prompt="S", max_input_tokens=80), tok)
    job = b.build(rec({"text": "x" * 100}), "0", 0)
    full = tok.encode(tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "x" * 100}]), False)
    assert len(job.prompt_ids) == 80 and job.truncated and job.untruncated_tokens == len(full)
    assert tok.decode(job.prompt_ids).endswith("x<|end|>\n<|assistant|>\n")
    # right: the seed notebook's cut of the templated ids
    b = JobBuilder(JobOptions(system_prompt="S", max_input_tokens=80, truncation_side="right"), tok)
    assert b.build(rec({"text": "x" * 100}), "0", 0).prompt_ids == full[:80]
    b = JobBuilder(JobOptions(system_prompt="S", max_input_tokens=20), tok)  # no room for any text
    assert b.build(rec({"text": "x" * 100}), "0", 0).error.type == "prompt_too_long"
    # error instead of truncation
    b = JobBuilder(JobOptions(max_input_tokens=40, on_too_long="error"), tok)
    item = b.build(rec({"text": "x" * 100}), "0", 0)
    assert item.error.type == "prompt_too_long"
    # short prompts are untouched and equal to rendering the template
    b = JobBuilder(JobOptions(system_prompt="S", max_input_tokens=400), tok)
    job = b.build(rec({"text": " pad\n"}), "0", 0)
    assert not job.truncated and tok.decode(job.prompt_ids) == tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": " pad\n"}])


# ---------------------------------------------------------------- formats, round trip with bad rows

GOOD = [{"id": f"g{i}", "body": f"post {i} " * (i + 1), "lang": "en"} for i in range(12)]


def _write_input(tmp_path, fmt):
    if fmt == "jsonl":
        p = tmp_path / "in.jsonl"
        lines = [json.dumps(r) for r in GOOD]
        lines.insert(3, "{not json")  # invalid JSON line
        lines.insert(5, json.dumps({"id": "missing", "lang": "en"}))  # missing field
        lines.insert(7, json.dumps({"id": "nontext", "body": {"x": 1}}))  # non-text value
        lines.insert(9, json.dumps({"id": "long", "body": "y" * 5000}))  # too long, truncation off
        lines.insert(10, json.dumps({"id": "fail", "body": "ENGINEFAIL"}))  # engine error
        p.write_text("\n".join(lines) + "\n")
        return p, {"missing", "nontext", "long", "fail"}, 1  # 1 row without an id (invalid JSON)
    if fmt == "csv":
        import csv
        p = tmp_path / "in.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "body", "lang"])
            for i, r in enumerate(GOOD):
                w.writerow([r["id"], r["body"], r["lang"]])
                if i == 2:
                    w.writerow(["short"])  # wrong number of fields
                if i == 4:
                    w.writerow(["empty", "", "en"])  # empty text
                if i == 6:
                    w.writerow(["long", "y" * 5000, "en"])
        return p, {"empty", "long"}, 1
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [*GOOD, {"id": "nul", "body": None, "lang": "en"}, {"id": "long", "body": "y" * 5000, "lang": "en"}]
    p = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=4)
    return p, {"nul", "long"}, 0


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_formats_round_trip_with_bad_rows(tmp_path, fmt):
    inp, bad_ids, no_id = _write_input(tmp_path, fmt)
    out = tmp_path / "out.jsonl"
    argv = ["--input", str(inp), "--output", str(out), "--id-field", "id", "--text-field", "body",
            "--max-tokens", "3", "--include-fields", "lang"]
    rc = run(argv, max_model_len=1000)
    assert rc == 1  # some rows failed
    rows = read_rows(out)
    ok = {r["id"] for r in rows if r["error"] is None}
    assert ok == {r["id"] for r in GOOD}
    errs = {r["id"]: r["error"] for r in rows if r["error"] is not None and r["id"] is not None}
    assert set(errs) == bad_ids
    assert all(e["type"] and e["message"] for e in errs.values())
    assert sum(1 for r in rows if r["error"] is not None and r["id"] is None) == no_id
    assert all(r["fields"] == {"lang": "en"} for r in rows if r["id"] in ok)
    assert all(r["output_tokens"] == 3 and r["finish_reason"] == "length" for r in rows if r["id"] in ok)
    n = len(rows)
    # a rerun resumes: nothing is added; it still reports the failed rows
    assert run(argv, max_model_len=1000) == 1
    assert len(read_rows(out)) == n
    # --retry-errors redoes only the error rows (still failing: same count); every key once
    assert run([*argv, "--retry-errors"], max_model_len=1000) == 1
    assert max(key_counts(out).values()) == 1 and len(read_rows(out)) == n
    # with a longer context the "long" row succeeds on retry
    run([*argv, "--retry-errors"], max_model_len=10000)
    assert "long" in {r["id"] for r in read_rows(out) if r["error"] is None}


def test_openai_batch_format(tmp_path):
    inp = tmp_path / "requests.jsonl"
    lines = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "system", "content": "Be short."},
                                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                  "max_tokens": 2}},
        {"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once", "max_tokens": 3}},
        {"custom_id": "cmpl-ids", "method": "POST", "url": "/v1/completions", "body": {"prompt": [5, 6, 7]}},
        {"custom_id": "bad-temp", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "x"}], "temperature": -1}},
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {}},
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "no custom id"}},
    ]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    out = tmp_path / "results.jsonl"
    assert run(["--input", str(inp), "--output", str(out)]) == 1
    rows = {r["custom_id"] if r["custom_id"] is not None else f"#row{r['row']}": r for r in read_rows(out)}
    assert len(rows) == 8
    chat = rows["chat-1"]
    assert chat["id"].startswith("batch_req_") and chat["error"] is None
    assert chat["response"]["status_code"] == 200 and chat["response"]["request_id"]
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 2
    assert rows["cmpl-1"]["response"]["body"]["choices"][0]["text"].startswith("echo")
    assert rows["cmpl-ids"]["response"]["body"]["usage"]["prompt_tokens"] == 3
    for k, param in (("bad-temp", "temperature"), ("bad-url", "url"), ("no-messages", "messages")):
        r = rows[k]["response"]
        assert r["status_code"] == 400 and r["body"]["error"]["type"] == "invalid_request_error", k
        assert r["body"]["error"]["param"] == param
    assert rows["#row6"]["response"] is None and rows["#row6"]["error"]["code"] == "missing_id"
    assert rows["#row7"]["error"]["code"] == "invalid_json"
    # resume keys on custom_id: nothing is repeated
    run(["--input", str(inp), "--output", str(out)])
    assert len(read_rows(out)) == 8


def test_fail_fast_on_a_misconfigured_job(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"body": f"t{i}"}) + "\n" for i in range(300)))
    out = tmp_path / "out.jsonl"
    assert run(["--input", str(inp), "--output", str(out)]) == 2  # no "text" field anywhere
    assert not out.exists() or out.read_text() == ""
    assert run(["--input", str(inp), "--output", str(out), "--text-field", "body"]) == 0
    assert len(read_rows(out)) == 300
    # a small input whose rows all fail the same way stops too, and the corrected rerun does its rows
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"body": f"t{i}"}) + "\n" for i in range(5)))
    assert run(["--input", str(small), "--output", str(tmp_path / "s.jsonl")]) == 2
    assert not (tmp_path / "s.jsonl").exists() or (tmp_path / "s.jsonl").read_text() == ""
    assert run(["--input", str(small), "--output", str(tmp_path / "s.jsonl"), "--text-field", "body"]) == 0
    assert len(read_rows(tmp_path / "s.jsonl")) == 5


# ---------------------------------------------------------------- resume

def test_resume_drops_torn_line_and_skips_done(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(50)))
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        for i in range(10):
            f.write(json.dumps({"id": i, "row": i, "text": "old", "error": None}) + "\n")
        f.write('{"id": 10, "row": 10, "te')  # torn by a kill
    assert run(["--input", str(inp), "--output", str(out)]) == 0
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == list(range(50))
    assert [r["text"] for r in rows[:10]] == ["old"] * 10


def lines_in(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_rows(p: subprocess.Popen, path, rows: int, timeout: float = 120.0) -> bool:
    """Until `path` holds `rows` complete lines (True) or the process `p` has exited (False)."""
    deadline = time.monotonic() + timeout
    while lines_in(path) < rows:
        if p.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"{path}: {lines_in(path)} of {rows} rows after {timeout} s"
        time.sleep(0.01)
    return True


def test_sigkill_at_random_moments_every_id_once(tmp_path):
    """A writer process killed with SIGKILL mid-run, repeatedly: the output never holds a torn line after a
    resume and every id ends up exactly once (the real-engine variant is in test_batch_e2e.py)."""
    n = 3000
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"k": f"id{i}", "text": "x" * (i % 50 + 1)}) + "\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    script = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{HERE!r}, {SRC!r}]
        from test_batch_data import EchoEngine, batch_args
        from strata.batch.cli import run_batch
        args = batch_args("--input", {str(inp)!r}, "--output", {str(out)!r}, "--id-field", "k", "--progress", "none")
        sys.exit(run_batch(args, engine=EchoEngine(per_step=4, delay=0.004)))
    """)
    rng = random.Random(1234)
    kills = 0
    for _ in range(8):
        start = lines_in(out)
        p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
        # kill once this run has written a random number of rows (at most 400: three runs cannot finish 3000)
        if not wait_rows(p, out, start + rng.randint(1, 400)):
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 3
    rc = subprocess.run([sys.executable, "-c", script], stderr=subprocess.DEVNULL, timeout=120).returncode
    assert rc == 0
    data = out.read_bytes()
    assert data.endswith(b"\n")
    counts = key_counts(out)
    assert len(counts) == n and set(counts.values()) == {1}


def test_sigterm_stops_cleanly_and_resumes(tmp_path):
    """SIGTERM (a Slurm time limit) ends the run after the current step with status 143; in-flight rows are
    not written and the rerun completes the job."""
    n = 400
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    script = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{HERE!r}, {SRC!r}]
        from test_batch_data import EchoEngine, batch_args
        from strata.batch.cli import run_batch
        args = batch_args("--input", {str(inp)!r}, "--output", {str(out)!r}, "--progress", "none")
        sys.exit(run_batch(args, engine=EchoEngine(per_step=2, delay=0.01)))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    assert wait_rows(p, out, 1), p.communicate()[1]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "INTERRUPTED" in err
    partial = read_rows(out)
    assert 0 < len(partial) < n
    assert subprocess.run([sys.executable, "-c", script], stderr=subprocess.DEVNULL, timeout=60).returncode == 0
    assert sorted(r["id"] for r in read_rows(out)) == list(range(n))


def test_missing_input_fails_before_loading_a_model(tmp_path):
    from strata.cli import main
    assert main(["batch", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2


def test_constant_memory_on_large_input(tmp_path):
    """Peak RSS does not grow with the number of rows (bounded window + streaming reader + streaming writer)."""
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    line = json.dumps({"text": "lorem ipsum dolor sit amet " * 4}) + "\n"
    small.write_text(line * 5_000)
    with open(large, "w") as f:
        for _ in range(12):
            f.write(line * 5_000)  # 60k rows
    script = textwrap.dedent(f"""
        import resource, sys; sys.path[:0] = [{HERE!r}, {SRC!r}]
        from test_batch_data import EchoEngine, batch_args
        from strata.batch.cli import run_batch
        args = batch_args("--input", sys.argv[1], "--output", sys.argv[2], "--progress", "none",
                          "--max-in-flight", "256", "--max-tokens", "1")
        e = EchoEngine(per_step=256)
        rc = run_batch(args, engine=e)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, e.max_seen_in_flight)
    """)

    def peak(inp):
        r = subprocess.run([sys.executable, "-c", script, str(inp), str(inp) + ".out"], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        kb, inflight = map(int, r.stdout.split())
        return kb, inflight

    kb_small, f_small = peak(small)
    kb_large, f_large = peak(large)
    assert f_small <= 256 and f_large <= 256
    assert sum(1 for _ in open(str(large) + ".out")) == 60_000
    print("peak RSS kB:", kb_small, kb_large)
    assert kb_large - kb_small < 20_000, (kb_small, kb_large)  # < 20 MB more for 12x the rows


# ---------------------------------------------------------------- sharding and merge

def test_detect_rank_precedence():
    assert detect_rank(env={}) == (0, 1, "single")
    assert detect_rank(env={"RANK": "1", "WORLD_SIZE": "4", "SLURM_PROCID": "3", "SLURM_NTASKS": "8",
                            "SLURM_STEP_ID": "0"})[:2] == (1, 4)
    assert detect_rank(env={"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"})[:2] == (3, 8)
    # the batch script itself (no srun step) is not a rank
    assert detect_rank(env={"SLURM_PROCID": "0", "SLURM_NTASKS": "8"})[:2] == (0, 1)
    assert detect_rank(2, 3, env={"RANK": "0", "WORLD_SIZE": "1"})[:2] == (2, 3)
    with pytest.raises(ValueError):
        detect_rank(env={"RANK": "4", "WORLD_SIZE": "4"})
    assert rank_output_path("d/out.jsonl", 3, 4) == "d/out.rank3.jsonl"
    assert rank_output_path("out", 1, 2) == "out.rank1"
    assert rank_output_path("out.{rank}.jsonl", 1, 2) == "out.1.jsonl"
    assert rank_output_path("out.jsonl", 0, 1) == "out.jsonl"


def test_shards_are_disjoint_and_cover_the_input(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(101)))
    tok = CharTokenizer()
    seen = []
    for rank in range(3):
        b = JobBuilder(JobOptions(), tok)
        seen.append({j.key for j in select_items(open_reader(str(inp), "jsonl"), b, rank=rank, world_size=3,
                                                 counters=Counters())})
    assert sum(len(s) for s in seen) == 101 and set().union(*seen) == {str(i) for i in range(101)}
    # with a content filter and a limit, every rank agrees on the selection
    sel = []
    for rank in range(2):
        b = JobBuilder(JobOptions(min_text_tokens=3), tok)
        sel.append({j.key for j in select_items(open_reader(str(inp), "jsonl"), b, rank=rank, world_size=2,
                                                limit=50)})
    assert not (sel[0] & sel[1]) and len(sel[0] | sel[1]) == 50 and "5" not in sel[0] | sel[1]


def test_merge_is_exact_and_idempotent(tmp_path):
    out = tmp_path / "res.jsonl"
    r0, r1 = tmp_path / "res.rank0.jsonl", tmp_path / "res.rank1.jsonl"
    r0.write_text("".join(json.dumps({"id": i, "text": "a", "error": None}) + "\n" for i in range(0, 10, 2))
                  + '{"id": 10, "tex')  # torn
    r1.write_text("".join(json.dumps({"id": i, "text": "b", "error": None}) + "\n" for i in range(1, 10, 2))
                  + json.dumps({"id": 11, "text": None, "error": {"type": "x", "message": "y"}}) + "\n")
    out.write_text(json.dumps({"id": 3, "text": "already", "error": None}) + "\n")
    assert find_rank_files(str(out)) == [str(r0), str(r1)]
    res = bout.merge_outputs([str(r0), str(r1)], str(out))
    assert res.appended == 10 and res.duplicates == 1 and res.torn == 1 and res.errors == 1
    assert bout.merge_outputs([str(r0), str(r1)], str(out)).appended == 0
    counts = key_counts(out)
    assert sorted(counts) == sorted(str(i) for i in [*range(10), 11]) and set(counts.values()) == {1}
    # the CLI: no file list = every rank file of --output; inputs removed
    from strata.cli import main
    r1.write_text(json.dumps({"id": 12, "text": "c", "error": None}) + "\n")
    assert main(["batch", "merge", "--output", str(out), "--remove-inputs"]) == 0
    assert not r0.exists() and not r1.exists() and "12" in key_counts(out)
    assert main(["batch", "merge", str(tmp_path / "nope.jsonl"), "--output", str(out)]) == 2


def test_keyset_folds_into_sorted_array(monkeypatch):
    monkeypatch.setattr(bout.KeySet, "_FOLD", 16)
    ks = bout.KeySet()
    for i in range(100):
        ks.add(f"k{i}")
    assert len(ks) == 100 and all(f"k{i}" in ks for i in range(100)) and "k100" not in ks


# ---------------------------------------------------------------- CLI pieces

def test_default_job_is_the_seed64_selection():
    from strata.batch.cli import apply_defaults, job_options
    a = apply_defaults(batch_args())
    assert a.input == "sharegpt" and a.output == "out/summaries.jsonl" and a.limit == 64
    o = job_options(a, "plain")
    assert o.instruction == "In one short sentence, what is the text above about?" and o.system_prompt is None
    assert o.max_input_tokens == 512
    assert o.sampling == {"max_tokens": 100, "temperature": 0.0, "repetition_penalty": 1.1}
    assert o.filters == [("first_from", "human")] and (o.min_text_tokens, o.max_text_tokens) == (150, 2000)
    a = apply_defaults(batch_args("--input", "data/posts.parquet"))
    assert a.output == "posts.out.jsonl" and a.limit is None


def test_progress_log_lines():
    import io
    from strata.batch.progress import Progress
    s = io.StringIO()
    p = Progress(total=10, mode="log", interval=0.0, stream=s)
    p.update(4, 1, 2, 400, force=True)
    line = s.getvalue()
    assert "6/10 rows (60.0%)" in line and "1 errors" in line and "output tok/s" in line and "ETA" in line
    bar = io.StringIO()
    p = Progress(total=lambda: 10, mode="bar", stream=bar)
    p.update(4, 1, 2, 400, force=True)
    p.close()
    assert "6/10" in bar.getvalue() and "tok/s" in bar.getvalue()


def test_slurm_script(tmp_path):
    from strata.cli import main
    path = tmp_path / "job.sbatch"
    rc = main(["slurm", "batch", "--nodes", "2", "--gpus-per-node", "4", "--tensor-parallel-size", "2",
               "--time", "01:00:00", "--partition", "gpu", "--account", "proj", "--setup", "module load cuda",
               "--input", "posts.parquet", "--text-field", "body", "--system-prompt", "Summarize it; briefly.",
               "--max-tokens", "100", "--output", "out/sum.jsonl", "--script-output", str(path)])
    assert rc == 0
    s = path.read_text()
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:4", "#SBATCH --time=01:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "module load cuda", "srun "):
        assert want in s, want
    srun = next(line for line in s.splitlines() if line.startswith("srun "))
    assert "--data-parallel-size 2" in srun and "--tensor-parallel-size 2" in srun
    assert "'Summarize it; briefly.'" in srun and "--output out/sum.jsonl" in srun
    assert s.count("batch merge") == 2
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # GPUs must divide into tasks x TP
    assert main(["slurm", "batch", "--gpus-per-node", "3", "--tensor-parallel-size", "2"]) == 2
