"""Compare the planner's estimates with recorded GPU runs, and refit its constants from them.

A run record is a JSON file in benchmarks/results/ (one file per GPU run; a file may also hold a list of runs,
or a {"runs": [...]} object). Fields read (RECORD_FIELDS documents them):

  device       "NVIDIA H200", "NVIDIA H100 80GB HBM3", ... or a plan GPU key ("h200")       required
  model        built-in name, HF id of a known model, or a config.json directory ("arch" also accepted) required
  workload     "seed64" | "sharegpt1000" | "random" | any name with prompt_len/output_len given     required
  tp, pp, dp, ep                        parallel degrees (default 1)
  prompt_len, output_len                mean tokens per request (default: the named workload's)
  concurrency                           requests in flight (default: the named workload's)
  max_num_seqs, gpu_mem_util, dtype, kv_dtype, gpus_per_node                                   optional
  output_tok_s, tpot_ms, ttft_ms        measured figures; at least one (top level or under "figures")
  date, commit, command, baseline       provenance (not used for the comparison)
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from dataclasses import dataclass, field

from strata.plan.arch import load_arch
from strata.plan.constants import Constants
from strata.plan.errors import PlanError
from strata.plan.estimate import Layout, Setup, Workload, check_fits, estimate, memory, stage_weights, \
    structural_problem
from strata.plan.hardware import get_gpu, gpu_from_device_name

RECORD_FIELDS = {
    "device": "GPU name as torch/nvidia-smi reports it, or a plan GPU key (required)",
    "model": "built-in architecture, HF id of a known model, or config.json directory; alias 'arch' (required)",
    "workload": "seed64 | sharegpt1000 | random | other name with prompt_len and output_len (required)",
    "tp": "tensor-parallel degree (default 1)", "pp": "pipeline-parallel degree (default 1)",
    "dp": "data-parallel degree (default 1)", "ep": "expert-parallel degree (default 1)",
    "prompt_len": "mean prompt tokens per request (default: the named workload's)",
    "output_len": "mean output tokens per request (default: the named workload's)",
    "concurrency": "requests in flight (default: the named workload's)",
    "max_num_seqs": "engine cap on sequences per replica (default 256)",
    "gpu_mem_util": "fraction of GPU memory the engine used (default 0.9)",
    "dtype": "weight dtype (default: the model's)", "kv_dtype": "KV-cache dtype (default bf16)",
    "gpus_per_node": "GPUs per node (default: the GPU's)",
    "output_tok_s": "measured output tokens per second, whole deployment",
    "tpot_ms": "measured mean time per output token, ms",
    "ttft_ms": "measured mean time to first token, ms",
    "date / commit / command / baseline": "provenance, shown but not compared",
}

# Workloads of BENCHMARK-PROTOCOL.md: mean prompt and output tokens, requests in flight.
WORKLOADS = {
    "seed64": {"prompt_len": 436, "output_len": 100, "concurrency": 64},
    "sharegpt1000": {"prompt_len": 245.572, "output_len": 204.405, "concurrency": 1000},
}
METRICS = ("output_tok_s", "tpot_ms", "ttft_ms")
_ALIASES = {
    "output_tok_s": ("output_tok_s", "output_tokens_per_s", "output_throughput", "output_tps", "tok_s"),
    "tpot_ms": ("tpot_ms", "mean_tpot_ms", "time_per_output_token_ms", "ms_per_token"),
    "ttft_ms": ("ttft_ms", "mean_ttft_ms", "time_to_first_token_ms"),
}
TOLERANCE = 0.25


@dataclass
class Run:
    source: str
    record: dict
    gpu: str
    model: str
    layout: Layout
    workload: Workload
    workload_name: str
    measured: dict[str, float]
    dtype: str | None = None
    kv_dtype: str = "bf16"
    gpu_mem_util: float = 0.9
    gpus_per_node: int | None = None


@dataclass
class Comparison:
    run: Run
    predicted: dict[str, float] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)  # (predicted - measured) / measured
    problem: str | None = None

    def to_dict(self) -> dict:
        r = self.run
        return {"source": r.source, "gpu": r.gpu, "model": r.model, "layout": r.layout.label,
                "workload": r.workload_name, "measured": r.measured, "predicted": self.predicted,
                "error": self.error, "problem": self.problem,
                "commit": r.record.get("commit"), "date": r.record.get("date")}


def _get(rec: dict, key: str):
    for k in _ALIASES.get(key, (key,)):
        for d in (rec, rec.get("figures") or {}, rec.get("results") or {}, rec.get("metrics") or {}):
            if isinstance(d, dict) and d.get(k) is not None:
                return d[k]
    return None


def parse_record(rec: dict, source: str = "?") -> Run:
    """One run record -> Run. Raises PlanError naming what is missing."""
    if not isinstance(rec, dict):
        raise PlanError(f"{source}: a run record must be a JSON object")
    device = rec.get("device") or rec.get("gpu")
    model = rec.get("model") or rec.get("arch")
    wl_name = rec.get("workload")
    if isinstance(wl_name, dict):
        wl_name = wl_name.get("name")
    missing = [k for k, v in (("device", device), ("model", model), ("workload", wl_name)) if not v]
    if missing:
        raise PlanError(f"{source}: missing {', '.join(missing)}")
    gpu = gpu_from_device_name(str(device))
    if gpu is None:
        raise PlanError(f"{source}: device {device!r} is not a GPU the planner knows (CPU runs are not compared)")
    defaults = WORKLOADS.get(str(wl_name), {})
    lens = {}
    for k in ("prompt_len", "output_len", "concurrency"):
        v = _get(rec, k)
        lens[k] = v if v is not None else defaults.get(k)
    if lens["prompt_len"] is None or lens["output_len"] is None:
        raise PlanError(f"{source}: workload {wl_name!r} is not a named one; give prompt_len and output_len")
    measured = {m: float(_get(rec, m)) for m in METRICS if _get(rec, m) is not None}
    if not measured:
        raise PlanError(f"{source}: no measured figure ({', '.join(METRICS)})")
    tp, pp, dp, ep = (int(rec.get(k) or 1) for k in ("tp", "pp", "dp", "ep"))
    mns = int(rec.get("max_num_seqs") or 256)
    wl = Workload(max(1, round(lens["prompt_len"])), max(1, round(lens["output_len"])),
                  int(lens["concurrency"] or 1), mns)
    return Run(source, rec, gpu, str(model), Layout(tp, pp, dp, ep), wl, str(wl_name), measured,
               dtype=rec.get("dtype"), kv_dtype=rec.get("kv_dtype") or "bf16",
               gpu_mem_util=float(rec.get("gpu_mem_util") or 0.9), gpus_per_node=rec.get("gpus_per_node"))


def load_runs(results_dir: str) -> tuple[list[Run], list[str], int]:
    """(runs, skipped reasons, number of JSON files)."""
    files = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    runs, skipped = [], []
    for path in files:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            skipped.append(f"{path}: unreadable ({e})")
            continue
        recs = data if isinstance(data, list) else data.get("runs", [data]) if isinstance(data, dict) else []
        for i, rec in enumerate(recs):
            src = path if len(recs) == 1 else f"{path}#{i}"
            try:
                runs.append(parse_record(rec, src))
            except PlanError as e:
                skipped.append(str(e))
    return runs, skipped, len(files)


def predict(run: Run, constants: Constants) -> Comparison:
    cmp = Comparison(run)
    try:
        arch = load_arch(run.model)
        gpu = get_gpu(run.gpu, gpus_per_node=run.gpus_per_node)
        setup = Setup(arch, gpu, constants, run.dtype or arch.dtype, run.kv_dtype, run.gpu_mem_util)
    except PlanError as e:
        cmp.problem = str(e)
        return cmp
    lay = run.layout
    why = structural_problem(arch, lay, gpu.gpus_per_node, lay.gpus)
    stages = mem = None
    if not why:
        stages = stage_weights(setup, lay)
        mem = memory(setup, lay, run.workload, stages)
        why = check_fits(setup, lay, run.workload, mem)
    if why:
        cmp.problem = f"the model calls this layout infeasible: {why}"
        return cmp
    e = estimate(setup, lay, run.workload, stages=stages, mem=mem)
    cmp.predicted = {"output_tok_s": e.output_tok_s, "tpot_ms": e.tpot_s * 1e3, "ttft_ms": e.ttft_s * 1e3}
    cmp.error = {m: (cmp.predicted[m] - v) / v for m, v in run.measured.items() if v}
    return cmp


def compare(runs: list[Run], constants: Constants) -> list[Comparison]:
    return [predict(r, constants) for r in runs]


# ---- fitting -----------------------------------------------------------------------------------------------------
FIT_PARAMS = [  # in the order they are freed as more measurements exist: (name, low, high)
    ("step_overhead_s", 0.0, 0.05),
    ("hbm_efficiency", 0.2, 1.0),
    ("flops_efficiency", 0.2, 1.0),
    ("allreduce_latency_s", 0.0, 1e-3),
    ("link_efficiency", 0.1, 1.0),
]


def loss(comparisons: list[Comparison]) -> float:
    errs = [math.log1p(e) ** 2 for c in comparisons for e in c.error.values() if e > -1]
    return sum(errs) / len(errs) if errs else math.inf


def fit(runs: list[Run], start: Constants = Constants(), rounds: int = 3, grid: int = 41) -> tuple[Constants, list[str]]:
    """Coordinate descent on the mean squared log error. Frees at most one parameter per measured figure."""
    n_figures = sum(len(r.measured) for r in runs)
    free = FIT_PARAMS[:max(0, min(len(FIT_PARAMS), n_figures))]
    c = start
    best = loss(compare(runs, c))
    for _ in range(rounds):
        for name, lo, hi in free:
            for i in range(grid):
                cand = dataclasses.replace(c, **{name: lo + (hi - lo) * i / (grid - 1)})
                cand_loss = loss(compare(runs, cand))
                if cand_loss < best - 1e-12:
                    c, best = cand, cand_loss
    return c, [n for n, _, _ in free]
