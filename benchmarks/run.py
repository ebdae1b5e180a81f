"""One driver for strata's benchmark campaigns: named suites, each a list of the Python benchmark programs in
this directory (or `strata bench`) with their arguments, run one after the other with a time limit each,
writing under one output directory.

    python benchmarks/run.py list                          # the suites, the machine each wants, its steps
    python benchmarks/run.py SUITE [--out DIR] [--steps a,b] [--set KEY=VALUE] [--smoke] [--dry-run]
    python benchmarks/run.py carry                         # rebuild .carry/tok, .carry/workloads (CPU machine)
    python benchmarks/run.py make-tree old REV             # .carry/trees/old/src = src/ at commit REV

On the device machine (it copies the working tree; carry .carry/tok and .carry/workloads, plus .carry/batch for
the batch suites and .carry/trees/old for `regress`):

    python3 benchmarks/run.py engine --out $OUT            # seed64, sharegpt1000, batch-1/8/64 latency
    python3 benchmarks/run.py regress --out $OUT           # issue 19: old vs new tree, same call, A/B rounds

Every step runs as its own process with PYTHONPATH=src (this tree; --set src=DIR for another) and PYTHONUNBUFFERED=1; its output goes to
DIR/<suite>.log, its last lines to the terminal, and DIR/<suite>-steps.json records each step's command,
exit status and time (the device returns at most 8 files from $OUT, so the suites write few). Placeholders in
the steps ({out}, {tok}, {wl}, {batch}, {old}, {new}, {py}, {src}) are set with --set, e.g. --set tok=/data/tok.
--smoke runs a suite's CPU variant where it has one (engine, regress, structured): the same path in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEFAULTS = {
    "out": "out/bench",
    "tok": ".carry/tok",
    "wl": ".carry/workloads",
    "batch": ".carry/batch",
    "old": ".carry/trees/old/src",
    "new": "src",
    "py": sys.executable,
    "src": "src",  # the tree every step imports strata from (PYTHONPATH); regress sets its own per tree
}

REF = "--model qwen3-4b --load-format dummy --tokenizer {tok} --max-model-len 4096"
MOE = "--model qwen3-30b-a3b --load-format dummy --tokenizer {tok} --max-model-len 4096"
SMOKE_ENGINE = ("--model smollm2-135m --load-format dummy --device cpu --dtype float32 --max-model-len 1024 "
                "--hf-overrides {{\"num_hidden_layers\":2}} --kv-cache-memory 67108864 --num-threads 1 --tokenizer {tok}")


@dataclass
class Step:
    name: str
    cmd: str  # split on whitespace after placeholder expansion (no quoting: keep arguments free of spaces)
    timeout: int = 300
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # files that must exist (placeholders allowed)
    tail: int = 14  # lines of its output echoed to the terminal


@dataclass
class Suite:
    machine: str
    about: str
    steps: list[Step]
    smoke: list[Step] | None = None
    env: dict[str, str] = field(default_factory=dict)


TOK = "{tok}/tokenizer.json"
WL = ("{wl}/seed64.json", "{wl}/sharegpt1000.json")
HANG = {"STRATA_HANG_DUMP_S": "120"}

SUITES: dict[str, Suite] = {
    # ------------------------------------------------------------------ one GPU
    "engine": Suite("nvidia-h200", "the protocol's runs on the reference model, transformers baseline in the same "
                    "process: seed64 wall time, sharegpt1000 output tok/s, batch 1/8/64 time per token (~6 min)", [
        Step("seed64", "{py} -m strata.cli bench throughput " + REF + " --dataset seed64 --workload-file "
             "{wl}/seed64.json --baseline transformers --baseline-timeout 60 --output-json {out}/seed64.json",
             150, needs=(TOK, *WL)),
        Step("sharegpt1000", "{py} -m strata.cli bench throughput " + REF + " --dataset sharegpt1000 --workload-file "
             "{wl}/sharegpt1000.json --baseline transformers --baseline-modes cb --baseline-timeout 90 "
             "--output-json {out}/sharegpt1000.json", 200, needs=(TOK, *WL)),
        Step("latency", "{py} -m strata.cli bench latency " + REF + " --input-len 1024 --output-len 128 "
             "--batch-sizes 1,8,64 --output-json {out}/latency.json", 120, needs=(TOK,)),
    ], smoke=[
        Step("seed64", "{py} -m strata.cli bench throughput " + SMOKE_ENGINE + " --dataset seed64 --workload-file "
             "{wl}/seed64.json --num-prompts 4 --output-len 8 --warmup-requests 2 --output-json {out}/seed64.json",
             300, needs=(TOK, *WL)),
        Step("latency", "{py} -m strata.cli bench latency " + SMOKE_ENGINE + " --input-len 64 --output-len 8 "
             "--batch-sizes 1 --num-iters 2 --output-json {out}/latency.json", 300, needs=(TOK,)),
    ]),
    "regress": Suite("nvidia-h200", "issue 19's same-call check: tree {old} against tree {new} (make it with "
                     "`run.py make-tree old REV`), seed64 + sharegpt1000 + batch-1 latency, 3 alternating rounds of "
                     "one fresh process per tree, best of and spread, one JSON (~5 min)", [
        Step("ab_trees", "{py} benchmarks/ab_trees.py --tree old={old} --tree new={new} --tokenizer {tok} "
             "--workloads {wl} --rounds 3 --budget-s 520 --out {out}/regress.json", 590,
             needs=(TOK, *WL, "{old}/strata/__init__.py", "{new}/strata/__init__.py"), tail=12),
    ], smoke=[
        Step("ab_trees", "{py} benchmarks/ab_trees.py --smoke --tree old={old} --tree new={new} --rounds 1 "
             "--seed64-repeats 1 --out {out}/regress.json", 600, needs=("{old}/strata/__init__.py", "{new}/strata/__init__.py"),
             tail=12),
    ]),
    "gpu-smoke": Suite("nvidia-h200", "greedy parity CPU / CUDA eager / CUDA graphs on a tiny model, then first "
                       "figures of the reference model with per-step timers (gpu_smoke.py)", [
        Step("gpu_smoke", "{py} benchmarks/gpu_smoke.py --tokenizer {tok} --workloads {wl} --out {out}", 200,
             needs=(TOK, *WL)),
    ]),
    "profile": Suite("nvidia-h200", "where batch-1 decode and prefill-heavy mixed steps spend their time "
                     "(profile_gpu.py: torch.profiler tables, Triton compilations during serving)", [
        Step("profile", "{py} benchmarks/profile_gpu.py --tokenizer {tok} --workloads {wl} --out {out}/prof "
             "--skip sharegpt,seed64", 150, needs=(TOK, *WL)),
    ]),
    "fp8-gemm": Suite("nvidia-h200", "FP8 dense GEMMs (issue 21) at Qwen3-4B / Llama-3-8B linear shapes, M 1..4096: "
                      "cuBLAS bf16, the W8A16 kernel's tile sweep (prints W8A16_CONFIGS), W8A8 via _scaled_mm and "
                      "Triton, block scales, the small-M kernel on bf16 weights; GB/s vs copy, error vs the twin "
                      "(fp8_gemm.py, under 4 min)", [
        Step("fp8_gemm", "{py} benchmarks/fp8_gemm.py --out {out}/fp8_gemm.json", 280, tail=110),
    ], smoke=[
        Step("fp8_gemm", "{py} benchmarks/fp8_gemm.py --smoke --out {out}/fp8_gemm-smoke.json", 300, tail=20),
    ]),
    "async": Suite("nvidia-h200", "overlapped against synchronous steps in one engine: greedy parity, latency, "
                   "seed64, sharegpt1000 (async_gpu.py)", [
        Step("async_gpu", "{py} benchmarks/async_gpu.py --tokenizer {tok} --workloads {wl} --out-json "
             "{out}/async.json", 400, needs=(TOK, *WL)),
    ]),
    "structured": Suite("nvidia-h200", "structured outputs (issue 20): first compile, sharegpt1000 unconstrained "
                        "against every request under a 6-field JSON schema, batch-1 time per token with and without "
                        "it, 50-field compile cost (structured_gpu.py; carry xgrammar, see its docstring)", [
        Step("structured", "{py} benchmarks/structured_gpu.py --tokenizer {tok} --workloads {wl} "
             "--out {out}/structured.json", 500, needs=(TOK, *WL), tail=20),
    ], smoke=[
        Step("structured", "{py} benchmarks/structured_gpu.py --smoke --out {out}/structured-smoke.json", 300,
             tail=20),
    ]),
    "kernels": Suite("nvidia-h200", "every Triton kernel against the copy and GEMM ceilings measured in the same "
                     "run, decode-attention config sweep, parity with the torch twins (kernels.py --quick)", [
        Step("kernels", "{py} benchmarks/kernels.py --quick --out {out}/kernels.json", 200, tail=25),
    ]),
    "fp8-kv": Suite("nvidia-h200", "FP8 KV cache (issue 21): the Triton cache write, decode and prefill kernels on "
                    "an fp8 cache against the twins on CUDA, decode-attention time fp8 vs bf16 cache at 1k / 6k "
                    "context in a CUDA graph, a tiny engine with fp8 KV and CUDA graphs (fp8_kv_gpu.py, ~1 min)", [
        Step("fp8_kv_gpu", "{py} benchmarks/fp8_kv_gpu.py --tokenizer {tok} --out {out}/fp8_kv_gpu.json", 150,
             tail=20),
    ]),
    "prefix-hash": Suite("nvidia-h200", "SHA-256 prefix-cache keys against Python hash() patched in, sharegpt1000, "
                         "3 alternating rounds in one engine (prefix_hash_cost.py)", [
        Step("prefix_hash_cost", "{py} benchmarks/prefix_hash_cost.py --model qwen3-4b --tokenizer {tok} "
             "--workload-file {wl}/sharegpt1000.json --rounds 3 --out {out}/prefix_hash_cost.json", 500,
             needs=(TOK, *WL), tail=30),
    ]),
    "batch": Suite("nvidia-h200", "strata batch against the engine alone on 10,000 ShareGPT posts "
                   "(batch_throughput.py run; carry .carry/batch)", [
        Step("batch_sharegpt10k", "{py} benchmarks/batch_throughput.py run --posts {batch}/sharegpt10k.jsonl "
             "--model qwen3-4b --tokenizer {tok} --out-json {out}/batch-sharegpt10k.json", 250,
             needs=(TOK, "{batch}/sharegpt10k.jsonl")),
    ]),
    "moe": Suite("nvidia-h200", "Qwen3-30B-A3B (random bf16 weights) on the defaults: batch 1/16/64 latency "
                 "(1024 in, 64 out) and 256 random requests of 512 in / 128 out", [
        Step("moe_latency", "{py} -m strata.cli bench latency " + MOE + " --input-len 1024 --output-len 64 "
             "--batch-sizes 1,16,64 --num-iters 3 --num-iters-warmup 1 --output-json {out}/moe_latency.json", 150,
             needs=(TOK,)),
        Step("moe_throughput", "{py} -m strata.cli bench throughput " + MOE + " --dataset random --num-prompts 256 "
             "--input-len 512 --output-len 128 --output-json {out}/moe_throughput.json", 120, needs=(TOK,)),
    ], env=HANG),
    "moe-kernels": Suite("nvidia-h200", "the fused-MoE kernels at Qwen3-30B-A3B's shapes, graph-timed: decode "
                         "kernels against the sorted grouped GEMM, then the decode kernels' tile sweep "
                         "(moe_kernel.py --decode-ab, --decode-sweep)", [
        Step("decode_ab", "{py} benchmarks/moe_kernel.py --decode-ab --out {out}/moe_decode_ab.json", 200, tail=20),
        Step("decode_sweep", "{py} benchmarks/moe_kernel.py --decode-sweep --out {out}/moe_decode_sweep.json", 330),
    ], env=HANG),
    "moe-gemm-sweep": Suite("nvidia-h200", "the sorted fused-MoE GEMM's tile sweep per (tokens, TP width) "
                            "(moe_kernel.py)", [
        Step("moe_kernel", "{py} benchmarks/moe_kernel.py --out {out}/moe_kernel.json", 500, tail=25),
    ], env=HANG),
    "moe-tune": Suite("nvidia-h200", "tune the sorted grouped GEMM's tiles (table under {out}/cfg), then 256 "
                      "random 512/128 requests with that table against the heuristic tiles", [
        Step("tune", "{py} benchmarks/moe_kernel.py --tune {out}/cfg --out {out}/moe_tune.json", 280),
        Step("throughput_heuristic", "{py} -m strata.cli bench throughput " + MOE + " --dataset random "
             "--num-prompts 256 --input-len 512 --output-len 128 --output-json {out}/moe_throughput_heuristic.json",
             150, env={"STRATA_MOE_CONFIG_DIR": "/tmp/no-moe-configs"}, needs=(TOK,)),
        Step("throughput_tuned", "{py} -m strata.cli bench throughput " + MOE + " --dataset random "
             "--num-prompts 256 --input-len 512 --output-len 128 --output-json {out}/moe_throughput_tuned.json",
             150, env={"STRATA_MOE_CONFIG_DIR": "{out}/cfg"}, needs=(TOK,)),
    ], env=HANG),
    "llama8b-rank": Suite("nvidia-h200", "Llama-3-8B batch-1 time per token whole and cut to one TP=2 rank's "
                          "widths (16 q / 4 KV heads, MLP 7168, vocab 64128; no all-reduce)", [
        Step("whole", "{py} -m strata.cli bench latency --model llama-3-8b --load-format dummy --tokenizer {tok} "
             "--max-model-len 4096 --input-len 1024 --output-len 128 --batch-sizes 1 --num-iters 5 "
             "--num-iters-warmup 1 --output-json {out}/llama8b_tp1.json", 150, needs=(TOK,)),
        Step("tp2_rank", "{py} -m strata.cli bench latency --model llama-3-8b --load-format dummy --tokenizer {tok} "
             "--max-model-len 4096 --input-len 1024 --output-len 128 --batch-sizes 1 --num-iters 5 "
             "--num-iters-warmup 1 --hf-overrides {{\"num_attention_heads\":16,\"num_key_value_heads\":4,"
             "\"head_dim\":128,\"intermediate_size\":7168,\"vocab_size\":64128}} "
             "--output-json {out}/llama8b_tp2half.json", 150, needs=(TOK,)),
    ], env=HANG),
    # ------------------------------------------------------------------ two GPUs
    "parallel": Suite("nvidia-h200-x2", "DP=2 on sharegpt1000 and Llama-3-8B TP latency with overlapped steps, "
                      "TP latency without, strata batch DP=2 against 1 (parallel_gpu.py, batch_throughput.py dp)", [
        Step("async", "{py} benchmarks/parallel_gpu.py --out {out}/async --async-steps --cases sharegpt_dp,latency8b "
             "--workloads {wl}", 260, needs=(TOK, *WL)),
        Step("sync_latency8b", "{py} benchmarks/parallel_gpu.py --out {out} --cases latency8b --workloads {wl}", 110,
             needs=(TOK, *WL)),
        Step("batch_dp2", "{py} benchmarks/batch_throughput.py dp --posts {batch}/sharegpt4k.jsonl --dp 2 "
             "--model qwen3-4b --tokenizer {tok} --out-json {out}/batch-dp2.json", 200,
             needs=(TOK, "{batch}/sharegpt4k.jsonl")),
    ], env=HANG),
    "tp2": Suite("nvidia-h200-x2", "Llama-3-8B batch-1 latency, TP=1 and TP=2, through `strata bench latency`", [
        Step("tp1", "{py} -m strata.cli bench latency --model llama-3-8b --load-format dummy --tokenizer {tok} "
             "--batch-sizes 1 --output-json {out}/llama3-8b-tp1-latency.json", 150, needs=(TOK,)),
        Step("tp2", "{py} -m strata.cli bench latency --model llama-3-8b --load-format dummy --tokenizer {tok} "
             "--batch-sizes 1 --tensor-parallel-size 2 --output-json {out}/llama3-8b-tp2-latency.json", 200,
             needs=(TOK,)),
    ], env=HANG),
    "parallel-moe": Suite("nvidia-h200-x2", "Qwen3-30B-A3B: one GPU, TP=2 with TP-sharded experts, TP=2 with "
                          "expert parallelism (parallel_gpu.py --cases moe)", [
        Step("moe", "{py} benchmarks/parallel_gpu.py --out {out} --cases moe --workloads {wl}", 540,
             needs=(TOK, *WL)),
    ], env=HANG),
    "tpprof": Suite("nvidia-h200-x2", "batch-1 profiles of Llama-3-8B at TP=1 / TP=2 and of the MoE on one GPU; "
                    "pipeline stages with CUDA graphs against eager (parallel_gpu4.py --cases ppgraphs)", [
        Step("tp1", "{py} benchmarks/profile_gpu.py --tokenizer {tok} --workloads {wl} --model llama-3-8b "
             "--tensor-parallel-size 1 --async-scheduling --skip sharegpt,seed64,mixed --out {out}/tp1", 150,
             needs=(TOK,)),
        Step("tp2", "{py} benchmarks/profile_gpu.py --tokenizer {tok} --workloads {wl} --model llama-3-8b "
             "--tensor-parallel-size 2 --async-scheduling --skip sharegpt,seed64,mixed --out {out}/tp2", 150,
             needs=(TOK,)),
        Step("moe", "{py} benchmarks/profile_gpu.py --tokenizer {tok} --workloads {wl} --model qwen3-30b-a3b "
             "--async-scheduling --skip sharegpt,seed64,mixed --out {out}/moe", 150, needs=(TOK,)),
        Step("ppgraphs", "{py} benchmarks/parallel_gpu4.py --out {out}/ppg --workloads {wl} --async-steps "
             "--cases ppgraphs", 260, needs=(TOK, *WL)),
    ], env=HANG),
    # ------------------------------------------------------------------ four GPUs
    "x4-70b": Suite("nvidia-h200-x4", "Llama-3-70B TP=4 and TP=2 x PP=2; greedy parity of the four-GPU layouts "
                    "(parallel_gpu4.py --cases big70b4, parity4)", [
        Step("topo", "nvidia-smi topo -m", 30),
        Step("big70b4", "{py} benchmarks/parallel_gpu4.py --out {out}/a1 --workloads {wl} --async-steps "
             "--cases big70b4", 400, needs=(TOK, *WL)),
        Step("parity4", "{py} benchmarks/parallel_gpu4.py --out {out}/a2 --workloads {wl} --async-steps "
             "--cases parity4", 170, needs=(TOK,)),
    ], env=HANG),
    "x4-moe": Suite("nvidia-h200-x4", "Qwen3-30B-A3B: one GPU, TP=2, TP=2+EP, TP=4, TP=4+EP (parallel_gpu4.py "
                    "--cases moe4)", [
        Step("moe4", "{py} benchmarks/parallel_gpu4.py --out {out} --workloads {wl} --async-steps --cases moe4", 560,
             needs=(TOK,)),
    ], env=HANG),
    "x4-dp": Suite("nvidia-h200-x4", "reference model DP=4 on sharegpt1000, strata batch DP=4 on 10,000 posts", [
        Step("dp4", "{py} benchmarks/parallel_gpu4.py --out {out}/c1 --workloads {wl} --async-steps --cases dp4", 200,
             needs=(TOK, *WL)),
        Step("batch_dp4", "{py} benchmarks/batch_throughput.py dp --posts {batch}/sharegpt10k.jsonl --dp 4 "
             "--model qwen3-4b --tokenizer {tok} --out-json {out}/batch-dp4.json", 330,
             needs=(TOK, "{batch}/sharegpt10k.jsonl")),
    ], env=HANG),
    "x4-pp": Suite("nvidia-h200-x4", "pipeline stages with CUDA graphs (the default) against eager stages: "
                   "Llama-3-70B TP=2 x PP=2 (on 2 GPUs the same step measures Llama-3-8B PP=2)", [
        Step("ppgraphs", "{py} benchmarks/parallel_gpu4.py --out {out} --workloads {wl} --async-steps "
             "--cases ppgraphs", 560, needs=(TOK, *WL)),
    ], env=HANG),
    # ------------------------------------------------------------------ CPU
    "cpu": Suite("cpu", "side by side on this CPU: strata against transformers and against vLLM CPU "
                 "(--set vllm=/path/to/vllm-venv/bin/python), the main job's footprint, the batch job's quality, "
                 "FP8 accuracy against the unquantised model", [
        Step("vs_transformers", "{py} benchmarks/cpu_vs_transformers.py --out {out}/cpu-vs-transformers.json", 1200),
        Step("vs_vllm", "{py} benchmarks/cpu_vs_vllm.py --vllm-python {vllm} --out {out}/cpu-vs-vllm.json", 3000),
        Step("main_job_footprint", "{py} benchmarks/main_job_footprint.py --out {out}/main-job-footprint.json", 900),
        Step("batch_quality", "{py} benchmarks/batch_quality.py run --out-dir {out}/batch-quality "
             "--json {out}/batch-quality.json", 1800),
        Step("fp8_accuracy", "{py} benchmarks/fp8_accuracy.py --max-tokens 8 --json {out}/fp8-accuracy.json", 1500),
    ]),
    "host": Suite("cpu", "the parts that need no model: router overhead, the executor's control channel, TP step "
                  "overhead on a tiny model, the global-serving simulation, the planner against recorded runs", [
        Step("router_overhead", "{py} benchmarks/router_overhead.py --json {out}/router-overhead.json", 600),
        Step("ctrl_channel", "{py} benchmarks/ctrl_channel.py", 300),
        Step("tp_step_overhead", "{py} benchmarks/tp_step_overhead.py --out-json {out}/tp-step-overhead.json", 600),
        Step("global_serving", "{py} benchmarks/global_serving.py --json {out}/global-serving.json", 900),
        Step("plan_vs_measured", "{py} benchmarks/plan_vs_measured.py", 120, tail=40),
    ]),
}


def expand(text: str, values: dict[str, str]) -> str:
    return text.format(**values)


def list_suites() -> None:
    for name, s in SUITES.items():
        print(f"{name:15} [{s.machine}] {s.about}")
        for st in s.steps:
            print(f"    {st.name:20} {st.timeout:>4} s  {st.cmd.replace('{{', '{').replace('}}', '}')}")
        if s.smoke:
            print(f"    (--smoke: {', '.join(st.name for st in s.smoke)} on the CPU)")


def git_commit() -> str | None:
    if os.environ.get("TREE_COMMIT"):
        return os.environ["TREE_COMMIT"]
    try:
        r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        d = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "benchmarks"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + ("+dirty" if d else "") if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def gpu_info() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


def run_suite(name: str, out: str, values: dict[str, str], only: list[str] | None, smoke: bool,
              dry_run: bool) -> int:
    suite = SUITES[name]
    steps = suite.smoke if smoke else suite.steps
    if smoke and steps is None:
        print(f"suite {name} has no --smoke variant", file=sys.stderr)
        return 2
    if only:
        unknown = set(only) - {s.name for s in steps}
        if unknown:
            print(f"unknown step(s) {', '.join(sorted(unknown))} of {name}: "
                  f"{', '.join(s.name for s in steps)}", file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in only]
    values = {**values, "out": out}
    needed = {expand(p, values) for st in steps for p in st.needs}
    missing = sorted(p for p in needed if not os.path.exists(os.path.join(ROOT, p)))
    if missing:
        print("missing: " + ", ".join(missing) + "\n(.carry/tok and .carry/workloads: `python benchmarks/run.py "
              "carry`; .carry/trees/old: `python benchmarks/run.py make-tree old REV`; .carry/batch: "
              "benchmarks/batch_throughput.py make-posts)", file=sys.stderr)
        if not dry_run:
            return 2
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, values["src"])] +
                                         ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
           **suite.env}
    if not dry_run:
        os.makedirs(out, exist_ok=True)
    record = {"suite": name, "machine": suite.machine, "smoke": smoke, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "tree_commit": git_commit(), "gpu": gpu_info(), "python": sys.version.split()[0], "steps": []}
    log_path = os.path.join(out, f"{name}.log")
    rc_all = 0
    for st in steps:
        argv = [expand(a, values) for a in st.cmd.split()]
        step_env = {**env, **{k: expand(v, values) for k, v in st.env.items()}}
        shown = " ".join(f"{k}={expand(v, values)}" for k, v in st.env.items())
        print(f"== {name}/{st.name} (limit {st.timeout} s): {shown + ' ' if shown else ''}{' '.join(argv)}",
              flush=True)
        if dry_run:
            continue
        t = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n===== {st.name}: {' '.join(argv)}\n")
            log.flush()
            start = log.tell()
            try:
                rc = subprocess.run(argv, cwd=ROOT, env=step_env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=st.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
            except FileNotFoundError as e:
                log.write(f"{e}\n")
                rc = 127
        wall = time.perf_counter() - t
        with open(log_path) as log:
            log.seek(start)
            lines = [ln.rstrip() for ln in log.read().splitlines() if ln.strip()]
        for ln in lines[-st.tail:]:
            print("   " + ln[:400])
        print(f"   -> exit {rc} after {wall:.0f} s", flush=True)
        record["steps"].append({"name": st.name, "argv": argv, "env": {k: expand(v, values) for k, v in st.env.items()},
                                "rc": rc, "wall_s": round(wall, 2)})
        rc_all = rc_all or rc
        with open(os.path.join(out, f"{name}-steps.json"), "w") as f:
            json.dump(record, f, indent=1)
    return 1 if rc_all else 0


def make_carry(values: dict[str, str]) -> int:
    """.carry/tok (the embedded SmolLM2's tokenizer as an HF directory) and .carry/workloads (the protocol's
    workload files from ../shared/workloads, else built by `strata bench make-workload`)."""
    tok = os.path.join(ROOT, values["tok"])
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        code = ("import sys; from strata.engine.tokenizer import Tokenizer; "
                "from strata.models.embedded import default_model_path; "
                "Tokenizer.from_gguf(default_model_path()).hf.save_pretrained(sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, tok], check=True,
                       env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    wl = os.path.join(ROOT, values["wl"])
    os.makedirs(wl, exist_ok=True)
    shared = os.path.join(ROOT, "..", "shared", "workloads")
    for name in ("seed64", "sharegpt1000"):
        dst = os.path.join(wl, name + ".json")
        if os.path.isfile(dst):
            continue
        src = os.path.join(shared, name + ".json")
        if os.path.isfile(src):
            shutil.copyfile(src, dst)
        else:
            subprocess.run([sys.executable, "-m", "strata.cli", "bench", "make-workload", name, "--out", dst],
                           check=True, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    print(f"{tok}\n{wl}: {', '.join(sorted(os.listdir(wl)))}\n(.carry/batch: benchmarks/batch_throughput.py "
          "make-posts sharegpt10k --out .carry/batch/sharegpt10k.jsonl; head -4000 of it to sharegpt4k.jsonl)")
    return 0


def make_tree(name: str, rev: str, base: str) -> int:
    """<base>/<name>/src = src/ at commit `rev` (git archive), <base>/<name>/COMMIT = its hash: a second tree to
    carry to the device machine for `regress` (the device copies only the working tree)."""
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    dest = os.path.join(ROOT, base, name)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", ROOT, "archive", sha, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    with open(os.path.join(dest, "COMMIT"), "w") as f:
        f.write(sha + "\n")
    print(f"{os.path.relpath(dest, ROOT)}/src = src/ at {sha}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", help="a suite name, or list | carry | make-tree")
    ap.add_argument("args", nargs="*", help="make-tree: NAME REV")
    ap.add_argument("--out", default=None, help="output directory (default out/bench/<suite>; on the device $OUT)")
    ap.add_argument("--steps", default=None, help="comma-separated step names (default: all of the suite)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"placeholder value ({', '.join(k for k in DEFAULTS if k != 'out')}, vllm)")
    ap.add_argument("--smoke", action="store_true", help="the suite's CPU variant (engine, regress, structured)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--trees-dir", default=".carry/trees", help="make-tree: where the trees go")
    a = ap.parse_args(argv)
    values = dict(DEFAULTS, vllm=os.environ.get("STRATA_VLLM_PYTHON", "python3"))
    for kv in a.set:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--set {kv!r}: want KEY=VALUE")
        values[k] = v
    if a.suite == "list":
        list_suites()
        return 0
    if a.suite == "carry":
        return make_carry(values)
    if a.suite == "make-tree":
        if len(a.args) != 2:
            ap.error("make-tree NAME REV")
        return make_tree(a.args[0], a.args[1], a.trees_dir)
    if a.suite not in SUITES:
        ap.error(f"unknown suite {a.suite!r}: {', '.join(SUITES)} (or list, carry, make-tree)")
    out = a.out or os.path.join(DEFAULTS["out"], a.suite + ("-smoke" if a.smoke else ""))
    only = [s.strip() for s in a.steps.split(",") if s.strip()] if a.steps else None
    return run_suite(a.suite, os.path.abspath(out), values, only, a.smoke, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
