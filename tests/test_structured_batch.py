"""`strata batch` with structured outputs through the installed `strata` entry point, on a tiny random Llama with
SmolLM2's tokenizer (random weights follow the schema only because of the mask): --json-schema rows cut by
--max-tokens are error rows with the reason, and --retry-errors with a larger --max-tokens redoes them;
--choice and --regex; OpenAI batch rows with their own response_format."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import jsonschema
import pytest

from strata.batch.structured import output_error
from strata.core.sampling_params import StructuredOutputsParams as SO
from tests.test_batch_e2e import engine_flags, tiny_model  # noqa: F401  (a fixture)

STRATA = shutil.which("strata")
pytestmark = pytest.mark.skipif(STRATA is None, reason="the strata entry point is not installed")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"], "additionalProperties": False}


def batch(*argv):
    r = subprocess.run([STRATA, "batch", *argv], capture_output=True, text=True, timeout=600)
    return r


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_json_schema_cut_rows_are_errors_then_retried(tiny_model, tmp_path):  # noqa: F811
    inp, out, schema = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "schema.json"
    inp.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(4)))
    schema.write_text(json.dumps(SCHEMA))
    common = ["--input", str(inp), "--text-field", "text", "--output", str(out), "--json-schema", str(schema),
              "--temperature", "0", *engine_flags(tiny_model)]
    r = batch(*common, "--max-tokens", "3")  # too short for any object
    got = rows(out)
    assert len(got) == 4, r.stderr[-2000:]
    for row in got:
        assert row["error"]["type"] == "invalid_output" and "cut by max_tokens" in row["error"]["message"], row
        assert row["finish_reason"] == "length"
    r = batch(*common, "--max-tokens", "400", "--retry-errors")
    got = rows(out)
    assert len(got) == 4 and all(row["error"] is None for row in got), r.stderr[-2000:]
    for row in got:
        jsonschema.validate(json.loads(row["text"]), SCHEMA)


def test_choice_regex_and_openai_response_format(tiny_model, tmp_path):  # noqa: F811
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "choice.jsonl"
    r = batch("--input", str(inp), "--text-field", "text", "--output", str(out), "--choice", "yes,no,maybe",
              "--max-tokens", "8", *engine_flags(tiny_model))
    assert [row["text"] in ("yes", "no", "maybe") for row in rows(out)] == [True] * 3, r.stderr[-2000:]
    out = tmp_path / "regex.jsonl"
    batch("--input", str(inp), "--text-field", "text", "--output", str(out), "--regex", "[A-Z]{2}-[0-9]{3}",
          "--max-tokens", "16", *engine_flags(tiny_model))
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{3}", row["text"]) for row in rows(out))

    reqs = tmp_path / "reqs.jsonl"
    bodies = [{"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
               "max_tokens": 400},
              {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
               "max_tokens": 3},
              {"response_format": {"type": "json_object"}, "max_tokens": 2},
              {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": 7}}}}]
    reqs.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **b}})
                            + "\n" for i, b in enumerate(bodies)))
    out = tmp_path / "oai.jsonl"
    r = batch("--input", str(reqs), "--output", str(out), *engine_flags(tiny_model))
    by = {row["custom_id"]: row for row in rows(out)}
    assert set(by) == {"c0", "c1", "c2", "c3"}, r.stderr[-2000:]
    msg = by["c0"]["response"]["body"]["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(msg), SCHEMA)
    assert by["c0"]["error"] is None
    assert by["c1"]["error"]["code"] == "invalid_output" and by["c2"]["error"]["code"] == "invalid_output"
    assert by["c3"]["response"]["status_code"] == 400
    # the schema is a dict (response_format takes it); the grammar engine refuses it when the row is queued
    assert by["c3"]["response"]["body"]["error"]["param"] == "structured_outputs.json"
    assert "JSON schema" in by["c3"]["response"]["body"]["error"]["message"]


def test_output_error_reasons():
    so = SO(json=SCHEMA)
    assert output_error(so, '{"name":"a","n":3,"ok":true}', "stop") is None
    assert "cut by max_tokens" in output_error(so, '{"name":"a","n"', "length")
    assert "does not match the JSON schema" in output_error(so, '{"name":"a","n":30,"ok":true}', "stop")
    assert output_error(SO(regex="[0-9]+"), "123", "stop") is None
    assert output_error(SO(regex="[0-9]+"), "12a", "stop")
    assert output_error(SO(choice=["a", "b"]), "c", "stop")
    assert output_error(SO(json_object=True), "[1]", "stop")
    assert output_error(SO(grammar='root ::= "x"'), "x", "length")
