"""A misconfigured job stops before the model loads and records nothing; row errors stay rows; a finished
output is answered before the model loads. Real `strata batch` processes (the installed entry point, or
`python -X importtime -m strata.cli` to see what a run imported); a tiny random Llama (`--load-format dummy`,
SmolLM2's tokenizer) where a model runs, and the embedded SmolLM2 for the default job."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

TINY_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": True}
HEAVY = {"torch", "transformers"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(TINY_CFG))
    return str(d)


def engine_flags(model):
    return ["--model", model, "--load-format", "dummy", "--kv-cache-memory", str(16 << 20), "--num-threads", "1",
            "--max-tokens", "3", "--progress", "none"]


def batch(*argv, importtime=False, **kw):
    """Runs `strata batch ARGV`; returns (completed process, seconds, top-level modules imported or None)."""
    cmd = ([sys.executable, "-X", "importtime", "-m", "strata.cli"] if importtime else ["strata"]) + ["batch", *argv]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    took = time.monotonic() - t0
    if not importtime:
        return r, took, None
    lines = r.stderr.splitlines()
    mods = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    r.stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
    return r, took, mods


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, objs_or_lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in objs_or_lines))


def test_wrong_field_stops_before_the_model_and_the_corrected_rerun_does_every_row(tiny_model, tmp_path):
    inp, out = tmp_path / "posts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"pid": f"p{i}", "body": f"post number {i}"} for i in range(21)])
    common = ["--input", str(inp), "--output", str(out), *engine_flags(tiny_model)]

    r, took, mods = batch(*common, "--id-field", "pid", "--text-field", "bdy", importtime=True)
    assert r.returncode == 2, r.stderr
    assert "all of the first 21 rows to do failed the same way: field 'bdy' is missing" in r.stderr
    assert "the first row has the fields: pid, body" in r.stderr and "--text-field" in r.stderr
    assert not (HEAVY & mods), HEAVY & mods  # answered before the model (or torch) loaded
    assert not out.exists() or out.read_text() == ""
    print(f"misconfigured job answered in {took:.2f} s")

    r, _, mods = batch(*common, "--id-field", "id", "--text-field", "body", importtime=True)
    assert r.returncode == 2 and "id field 'id' is missing" in r.stderr and "check --id-field" in r.stderr, r.stderr
    assert not (HEAVY & mods)
    r, _, _ = batch(*common, "--id-field", "pid", "--prompt-template", "{title}: {body}")
    assert r.returncode == 2 and "field 'title' (in --prompt-template) is missing" in r.stderr, r.stderr
    assert not out.exists() or out.read_text() == ""

    r, _, _ = batch(*common, "--id-field", "pid", "--text-field", "body")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = rows_of(out)
    assert sorted(x["id"] for x in rows) == sorted(f"p{i}" for i in range(21))
    assert all(x["error"] is None and x["output_tokens"] == 3 for x in rows)

    # Finished: the same command says so before the model loads, and exits 0.
    r, took, mods = batch(*common, "--id-field", "pid", "--text-field", "body", importtime=True)
    assert r.returncode == 0, r.stderr
    assert "nothing left to do: the 21 rows of this job are in" in r.stderr
    assert not (HEAVY & mods), HEAVY & mods
    assert len(rows_of(out)) == 21
    print(f"finished output answered in {took:.2f} s")


def test_row_errors_stay_error_rows(tiny_model, tmp_path):
    """Bad JSON lines, and rows missing the field among rows that have it, are the rows' own errors."""
    inp, out = tmp_path / "posts.jsonl", tmp_path / "out.jsonl"
    lines = ["{not json", "[1, 2]", {"pid": "p2"}, {"pid": "p3", "body": 7}]
    lines += [{"pid": f"p{i}", "body": f"post {i}"} for i in range(4, 10)]
    write_jsonl(inp, lines)
    r, _, _ = batch("--input", str(inp), "--output", str(out), "--id-field", "pid", "--text-field", "body",
                    *engine_flags(tiny_model))
    assert r.returncode == 1, r.stderr[-2000:]
    errors = {(x["id"] if x["id"] is not None else f"#row{x['row']}"): x["error"]["type"]
              for x in rows_of(out) if x["error"]}
    assert errors == {"#row0": "invalid_json", "#row1": "invalid_row", "p2": "missing_field", "p3": "non_text_field"}
    assert sum(x["error"] is None for x in rows_of(out)) == 6

    # a file of nothing but bad lines: row errors too, written (the rerun does not redo them)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, ["{oops", "nope", "[]"])
    r, _, _ = batch("--input", str(bad), "--output", str(tmp_path / "bad.out.jsonl"), *engine_flags(tiny_model))
    assert r.returncode == 1, r.stderr[-2000:]
    assert [x["error"]["type"] for x in rows_of(tmp_path / "bad.out.jsonl")] == ["invalid_json"] * 2 + ["invalid_row"]


def test_misconfigured_stdin_job_stops_once_the_rows_are_read(tiny_model, tmp_path):
    """stdin cannot be read twice, so there is no check before the model: the job loop stops instead, after
    the last row, and writes none of them."""
    out = tmp_path / "out.jsonl"
    data = "".join(json.dumps({"body": f"post {i}"}) + "\n" for i in range(7))
    r, _, _ = batch("--input", "-", "--output", str(out), *engine_flags(tiny_model), input=data)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "all of the first 7 rows to do failed the same way: field 'text' is missing" in r.stderr
    assert not out.exists() or out.read_text() == ""
    r, _, _ = batch("--input", "-", "--output", str(out), "--text-field", "body", *engine_flags(tiny_model),
                    input=data)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(x["id"] for x in rows_of(out)) == list(range(7))


def test_default_job_finished_output_answers_before_the_model(tmp_path):
    """The default job selects rows by token counts: the check loads the tokenizer alone (no transformers, no
    torch), and selects exactly the rows the engine's tokenizer selects."""
    from strata.batch.cli import apply_defaults, job_options
    from strata.batch.jobs import JobBuilder
    from strata.batch.readers import open_reader
    from strata.batch.runner import select_records
    from strata.cli import build_parser
    from strata.engine.tokenizer import Tokenizer
    from strata.models.embedded import default_model_path

    args = apply_defaults(build_parser("batch").parse_args(["batch", "--limit", "4"]))
    assert args.output.startswith("out/")
    builder = JobBuilder(job_options(args, "plain"), Tokenizer.from_gguf(default_model_path()))
    ids = [key for _, key, _ in select_records(open_reader("sharegpt", "sharegpt"), builder, limit=4)]
    assert len(ids) == 4 and ids[0] == "IWkMGRK_0"

    out = tmp_path / "out" / "summaries.jsonl"
    out.parent.mkdir()
    write_jsonl(out, [{"id": k, "row": 0, "text": "done before", "error": None} for k in ids])
    r, took, mods = batch("--limit", "4", importtime=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nothing left to do: the 4 rows of this job are in" in r.stderr
    assert not (HEAVY & mods), HEAVY & mods
    print(f"default job, finished output: answered in {took:.2f} s")
    # the output is where the README says, not in the working directory
    assert not (tmp_path / "summaries.jsonl").exists()
