"""benchmarks/plan_vs_measured.py: reading run records, comparing, refitting. The records here are synthetic
(they test the tooling, not the model); the real comparison runs on benchmarks/results/."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from strata.plan.calibrate import compare, fit, load_runs, loss, parse_record
from strata.plan.constants import Constants
from strata.plan.errors import PlanError

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "plan_vs_measured.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_no_results_says_so(tmp_path):
    r = _run("--results", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "No recorded GPU runs to compare: 0 JSON file(s)" in r.stdout and "--fields" in r.stdout
    r = _run("--fields")
    assert r.returncode == 0 and "output_tok_s" in r.stdout and "tpot_ms" in r.stdout


def test_record_parsing_and_skips(tmp_path):
    rec = {"device": "NVIDIA H200", "model": "qwen3-4b", "workload": "seed64", "figures": {"output_tok_s": 9000}}
    run = parse_record(rec, "x")
    assert (run.gpu, run.layout.label, run.workload.prompt_len, run.workload.concurrency) == \
        ("h200", "TP1 PP1 DP1", 436, 64)
    with pytest.raises(PlanError, match="missing model"):
        parse_record({"device": "h200", "workload": "seed64", "tpot_ms": 3}, "x")
    with pytest.raises(PlanError, match="not a GPU"):
        parse_record({**rec, "device": "cpu"}, "x")
    with pytest.raises(PlanError, match="prompt_len and output_len"):
        parse_record({**rec, "workload": "random"}, "x")
    (tmp_path / "a.json").write_text(json.dumps([rec, {"device": "cpu", "model": "m", "workload": "w"}]))
    (tmp_path / "b.json").write_text("{oops")
    runs, skipped, n = load_runs(str(tmp_path))
    assert n == 2 and len(runs) == 1 and len(skipped) == 2


def test_compare_fit_and_use_fitted_constants(tmp_path):
    recs = [
        {"device": "NVIDIA H200", "model": "qwen3-4b", "workload": "seed64", "output_tok_s": 9000, "tpot_ms": 7.0},
        {"device": "NVIDIA H200", "arch": "llama-3-70b", "workload": "random", "prompt_len": 1024,
         "output_len": 128, "concurrency": 1, "tp": 2, "tpot_ms": 22.0},
    ]
    for i, r in enumerate(recs):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    runs, skipped, _ = load_runs(str(tmp_path))
    assert len(runs) == 2 and not skipped
    comps = compare(runs, Constants())
    assert all(c.problem is None and c.error for c in comps)
    fitted, freed = fit(runs, rounds=1, grid=11)
    assert len(freed) == 3 and loss(compare(runs, fitted)) < loss(comps)
    out = tmp_path / "fitted.json"
    r = _run("--results", str(tmp_path), "--fit", "--write-constants", str(out))
    assert r.returncode == 0, r.stderr
    assert "figures within 25%" in r.stdout and out.exists()
    assert Constants.from_json(str(out)) != Constants()
    # The model itself can call a recorded layout infeasible; that is reported, not hidden.
    bad = parse_record({"device": "NVIDIA H100 80GB HBM3", "model": "llama-3-70b", "workload": "seed64",
                        "tpot_ms": 30}, "y")
    assert "infeasible" in compare([bad], Constants())[0].problem


def test_benchmark_record_formats_are_read(tmp_path):
    """The GPU benchmarks' own records (bench latency, bench throughput, serving sweeps) become flat runs."""
    lat = {"benchmark": "latency", "device": "NVIDIA H200", "model": {"arg": "qwen3-4b", "arch": "qwen3-4b"},
           "engine": {"max_num_seqs": 256, "tensor_parallel_size": 1}, "input_len": 1024, "output_len": 128,
           "results": {"1": {"tpot_ms": 3.5, "ttft_ms_mean": 21.7, "output_tok_s": 271},
                       "8": {"tpot_ms": 4.2, "ttft_ms_mean": 117.5, "output_tok_s": 1562}}}
    thr = {"benchmark": "throughput", "device": "NVIDIA H200", "model": {"arch": "qwen3-4b"},
           "command": "strata bench throughput --dataset seed64", "engine": {"max_num_seqs": 256},
           "workload": {"name": "file", "num_requests": 64, "mean_prompt_len": 435.9, "mean_output_len": 100.0},
           "strata": {"output_tok_s": 6645, "ttft_s": {"mean": 0.26}, "e2e_latency_s": {"mean": 0.95}}}
    serve = {"model": "Qwen3-4B architecture, dummy bf16 weights", "workload": "random 1024 prompt tokens / 128 "
             "output tokens", "runs": {"r_1": {"request_rate": 1.0, "completed": 40, "total_input_tokens": 40960,
                                               "total_output_tokens": 5120, "request_throughput": 1.27,
                                               "mean_e2el_ms": 569, "output_throughput": 163,
                                               "mean_tpot_ms": 4.19, "mean_ttft_ms": 35.9}}}
    cut = {**lat, "model": {"arch": "llama-3-8b", "hf_overrides": '{"num_attention_heads": 16}'}}  # not llama-3-8b
    for name, rec in (("lat", lat), ("thr", thr), ("serve", serve), ("cut", cut),
                      ("k", {"benchmark": "kernels", "device": "NVIDIA H200"})):
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    runs, skipped, n = load_runs(str(tmp_path))
    by = {r.workload_name: r for r in runs}
    assert n == 5 and len(runs) == 4 and len(skipped) == 2
    assert any("hf-overrides" in s for s in skipped) and any("kernel" in s for s in skipped)
    assert by["latency-b8"].workload.concurrency == 8 and "ttft_ms" in by["latency-b8"].not_compared
    assert by["latency-b1"].measured == {"output_tok_s": 271, "tpot_ms": 3.5, "ttft_ms": 21.7}
    assert (by["seed64"].workload.prompt_len, by["seed64"].workload.concurrency) == (436, 64)
    assert by["seed64"].measured["tpot_ms"] == pytest.approx(1e3 * (0.95 - 0.26) / 99)
    s = by["serve-1rps"]
    assert (s.model, s.workload.prompt_len, s.workload.output_len, s.workload.concurrency) == ("qwen3-4b", 1024,
                                                                                               128, 1)
    assert "output_tok_s" in s.not_compared  # arrival-limited
