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
  fit (default true), note, not_compared {metric: why}   set by the adapters below

The GPU benchmarks write richer records than that; `expand_file` turns each into flat records of the form above:
`strata bench throughput` (one run), `strata bench latency` (one run per batch size), benchmarks/gpu_smoke.py
(its seed64, sharegpt1000 and batch-1 latency parts), serving sweeps ({"runs": {"r_RATE": {...}}}: concurrency
from Little's law), benchmarks/batch_throughput.py. Kernel-ceiling and host-only records are skipped with a reason.
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
    "fit": "false: compared but not used by --fit (e.g. a cold first run); default true",
    "note": "one line shown under the table", "not_compared": "{metric: why} measured figures not compared",
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
    fit: bool = True
    note: str = ""
    not_compared: dict[str, str] = field(default_factory=dict)  # measured figures shown but not compared


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
                "error": self.error, "problem": self.problem, "fit": r.fit, "note": r.note,
                "not_compared": {m: {"measured": r.record.get("_shown", {}).get(m), "why": w}
                                 for m, w in r.not_compared.items()},
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
    not_compared = dict(rec.get("not_compared") or {})
    for m in not_compared:
        measured.pop(m, None)
    if not measured:
        raise PlanError(f"{source}: no comparable measured figure ({'; '.join(not_compared.values())})")
    return Run(source, rec, gpu, str(model), Layout(tp, pp, dp, ep), wl, str(wl_name), measured,
               dtype=rec.get("dtype"), kv_dtype=rec.get("kv_dtype") or "bf16",
               gpu_mem_util=float(rec.get("gpu_mem_util") or 0.9), gpus_per_node=rec.get("gpus_per_node"),
               fit=bool(rec.get("fit", True)), note=str(rec.get("note") or ""), not_compared=not_compared)


# ---- adapters: the benchmarks' own record formats -> flat records ------------------------------------------------
_REFERENCE_MODEL = "qwen3-4b"  # BENCHMARK-PROTOCOL.md's reference model (Qwen3-4B architecture, dummy weights)
_UNLOADED_TTFT = "TTFT here includes queueing behind the other requests' prefill; the model's TTFT is unloaded"


def _model_name(m) -> str | None:
    if isinstance(m, dict):
        return m.get("arch") or m.get("arg")
    if isinstance(m, str) and "qwen3-4b" in m.lower().replace(" ", "-"):
        return _REFERENCE_MODEL
    return m


def _dataset_name(rec: dict) -> str | None:
    cmd = str(rec.get("command") or "")
    for name in WORKLOADS:
        if f"--dataset {name}" in cmd or f"/{name}." in cmd:
            return name
    wl = rec.get("workload")
    if isinstance(wl, dict):
        src = os.path.basename(str(wl.get("source") or ""))
        for name in WORKLOADS:
            if src.startswith(name + "."):
                return name
    return None


def _bench_throughput(rec: dict) -> list[tuple[str, dict | str]]:
    s, wl, eng = rec.get("strata") or {}, rec.get("workload") or {}, rec.get("engine") or {}
    name = _dataset_name(rec) or wl.get("name") or "?"
    flat = {"device": rec.get("device"), "model": _model_name(rec.get("model")), "workload": name,
            "prompt_len": wl.get("mean_prompt_len"), "output_len": wl.get("mean_output_len"),
            "concurrency": wl.get("num_requests") or s.get("num_requests"),
            "max_num_seqs": eng.get("max_num_seqs"), "tp": eng.get("tensor_parallel_size"),
            "pp": eng.get("pipeline_parallel_size"), "dp": eng.get("data_parallel_size"),
            "output_tok_s": s.get("output_tok_s"), "date": rec.get("date"), "commit": rec.get("commit"),
            "command": rec.get("command")}
    ttft, e2e, out = (s.get("ttft_s") or {}).get("mean"), (s.get("e2e_latency_s") or {}).get("mean"),         wl.get("mean_output_len")
    if ttft is not None and e2e is not None and out and out > 1:
        # Mean (e2e - ttft) over the mean decode steps: exact when every request has the same output length.
        flat["tpot_ms"] = 1e3 * (e2e - ttft) / (out - 1)
        flat["note"] = "tpot derived: (mean e2e - mean ttft) / (mean output - 1)"
    if ttft is not None:
        flat["_shown"] = {"ttft_ms": 1e3 * ttft}
        flat["not_compared"] = {"ttft_ms": "all requests arrive at t=0; " + _UNLOADED_TTFT}
    return [("", flat)]


def _bench_latency(rec: dict) -> list[tuple[str, dict | str]]:
    eng = rec.get("engine") or {}
    out = []
    for b, r in sorted((rec.get("results") or {}).items(), key=lambda kv: int(kv[0])):
        flat = {"device": rec.get("device"), "model": _model_name(rec.get("model")), "workload": f"latency-b{b}",
                "prompt_len": rec.get("input_len"), "output_len": rec.get("output_len"), "concurrency": int(b),
                "max_num_seqs": eng.get("max_num_seqs"), "tp": eng.get("tensor_parallel_size"),
                "pp": eng.get("pipeline_parallel_size"), "dp": eng.get("data_parallel_size"),
                "output_tok_s": r.get("output_tok_s"), "tpot_ms": r.get("tpot_ms"), "ttft_ms": r.get("ttft_ms_mean"),
                "date": rec.get("date"), "commit": rec.get("commit"), "command": rec.get("command")}
        if int(b) > 1:
            flat["_shown"] = {"ttft_ms": r.get("ttft_ms_mean")}
            flat["not_compared"] = {"ttft_ms": f"{b} prompts added at once; " + _UNLOADED_TTFT}
        out.append((f"b{b}", flat))
    return out


def _gpu_smoke(rec: dict) -> list[tuple[str, dict | str]]:
    out = []
    base = {"device": rec.get("device"), "model": _REFERENCE_MODEL, "date": rec.get("date"),
            "commit": rec.get("commit"), "fit": False}
    for name in WORKLOADS:
        part = rec.get(name)
        if isinstance(part, dict) and part.get("output_tok_s"):
            out.append((name, {**base, "workload": name, "output_tok_s": part["output_tok_s"],
                               "note": "smoke test: the engine's first, cold pass (first prefill step "
                                       f"{(part.get('steps') or {}).get('prefill', {}).get('s', '?')} s); "
                                       "not used by --fit"}))
    lat = rec.get("latency")
    if isinstance(lat, dict) and lat.get("tpot_ms"):
        out.append(("latency", {**base, "workload": f"latency-b{lat.get('batch', 1)}",
                                "prompt_len": lat.get("context"), "output_len": lat.get("output"),
                                "concurrency": lat.get("batch", 1), "tpot_ms": lat["tpot_ms"],
                                "ttft_ms": lat.get("ttft_ms"), "fit": True}))
    return out


def _serving(rec: dict) -> list[tuple[str, dict | str]]:
    """An open-loop serving sweep: requests arrive at `request_rate` (Poisson) or at a fixed max_concurrency.
    Requests in flight come from Little's law (throughput x mean end-to-end latency), capped by the engine."""
    import re

    model = _model_name(rec.get("model"))
    m = re.search(r"(\d+)\s*prompt tokens\s*/\s*(\d+)\s*output", str(rec.get("workload") or ""))
    out = []
    for key, r in sorted(rec["runs"].items(), key=lambda kv: (kv[1].get("request_rate") or 0) if
                         isinstance(kv[1].get("request_rate"), (int, float)) else math.inf):
        if not isinstance(r, dict) or not r.get("completed"):
            out.append((key, f"serving run {key}: nothing completed"))
            continue
        prompt = r["total_input_tokens"] / r["completed"] if r.get("total_input_tokens") else             (int(m.group(1)) if m else None)
        output = r["total_output_tokens"] / r["completed"] if r.get("total_output_tokens") else             (int(m.group(2)) if m else None)
        little = r["request_throughput"] * r["mean_e2el_ms"] / 1e3
        conc = r.get("max_concurrency") or max(1, round(little))
        rate = r.get("request_rate")
        flat = {"device": rec.get("device") or "NVIDIA H200", "model": model,
                "workload": f"serve-{'c' + str(r['max_concurrency']) if r.get('max_concurrency') else f'{rate:g}rps'}",
                "prompt_len": prompt, "output_len": output, "concurrency": conc,
                "output_tok_s": r.get("output_throughput"), "tpot_ms": r.get("mean_tpot_ms"),
                "ttft_ms": r.get("mean_ttft_ms"), "commit": rec.get("commit"),
                "note": f"{r['completed']} requests at {rate} req/s; in flight {little:.1f} (Little's law)"}
        flat["_shown"], flat["not_compared"] = {}, {}
        if not r.get("max_concurrency") and little > 4:
            flat["_shown"]["ttft_ms"] = r.get("mean_ttft_ms")
            flat["not_compared"]["ttft_ms"] = _UNLOADED_TTFT
        if not r.get("max_concurrency") and r["request_throughput"] >= 0.9 * rate:
            # Below saturation the server delivers what arrives: tok/s = rate x output, whatever the engine.
            flat["_shown"]["output_tok_s"] = r.get("output_throughput")
            flat["not_compared"]["output_tok_s"] = "arrival-limited (= request rate x output tokens)"
        out.append((key, flat))
    return out


def _batch_throughput(rec: dict) -> list[tuple[str, dict | str]]:
    name = str(rec.get("posts") or "").split(".")[0]
    if name not in WORKLOADS:
        return [("", f"batch_throughput over {rec.get('posts')!r}: prompt lengths are not recorded")]
    best = max((b for b in rec.get("batch") or [] if b.get("output_tok_s")), key=lambda b: b["output_tok_s"],
               default=None)
    if not best:
        return [("", "batch_throughput: no output_tok_s")]
    return [("", {"device": rec.get("device"), "model": _model_name(rec.get("model")), "workload": name,
                  "output_tok_s": best["output_tok_s"], "date": rec.get("date"), "commit": rec.get("commit"),
                  "fit": False, "note": "`strata batch` end to end (tokenising, file I/O) over the engine; "
                                        "best of the repeats; not used by --fit"})]


def expand_file(data) -> list[tuple[str, dict | str]]:
    """A results file's JSON -> [(suffix, flat record or the reason it is skipped)]."""
    if isinstance(data, list):
        return [(str(i) if len(data) > 1 else "", r) for i, r in enumerate(data)]
    if not isinstance(data, dict):
        return [("", "a results file must hold a JSON object or a list")]
    kind = data.get("benchmark")
    model = data.get("model")
    if isinstance(model, dict) and model.get("hf_overrides") not in (None, {}, "", "{}"):
        return [("", f"--hf-overrides {model['hf_overrides']} changes the architecture the record names")]
    if kind == "throughput" and isinstance(data.get("strata"), dict):
        return _bench_throughput(data)
    if kind == "latency" and isinstance(data.get("results"), dict):
        return _bench_latency(data)
    if kind == "batch_throughput":
        return _batch_throughput(data)
    if kind == "kernels":
        return [("", "kernel ceilings, not an end-to-end run (copy / GEMM ceilings are quoted in constants.py)")]
    if "tiny_parity" in data and ("seed64" in data or "latency" in data):
        return _gpu_smoke(data)
    runs = data.get("runs")
    if isinstance(runs, dict):
        return _serving(data)
    if isinstance(runs, list):
        return [(str(i) if len(runs) > 1 else "", r) for i, r in enumerate(runs)]
    if "overhead" in data and "device" not in data:
        return [("", "host-only measurement (no GPU run)")]
    return [("", data)]


def load_runs(results_dir: str) -> tuple[list[Run], list[str], int]:
    """(runs, skipped reasons, number of JSON files)."""
    files = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    runs, skipped = [], []
    seen_all: dict[str, str] = {}
    for path in files:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            skipped.append(f"{path}: unreadable ({e})")
            continue
        for suffix, rec in expand_file(data):
            src = f"{path}#{suffix}" if suffix else path
            if isinstance(rec, str):
                skipped.append(f"{src}: {rec}")
                continue
            key = json.dumps({k: v for k, v in rec.items() if k not in ("date", "commit")}, sort_keys=True,
                             default=str) if isinstance(rec, dict) else None
            if key in seen_all:  # the same run copied into a later file (a sweep re-recorded with more rates)
                skipped.append(f"{src}: duplicate of {seen_all[key]}")
                continue
            try:
                runs.append(parse_record(rec, src))
                if key:
                    seen_all[key] = src
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


def sensitive(runs: list[Run], start: Constants, name: str, lo: float, hi: float) -> bool:
    """Does any prediction for these runs move when `name` goes from lo to hi? (A TP-only constant does not
    move a TP=1 run: such a constant cannot be fitted from these runs, whatever their number.)"""
    a = compare(runs, dataclasses.replace(start, **{name: lo}))
    b = compare(runs, dataclasses.replace(start, **{name: hi}))
    return any(abs(x.predicted.get(m, 0) - y.predicted.get(m, 0)) > 1e-9 * max(1.0, abs(x.predicted.get(m, 0)))
               for x, y in zip(a, b) for m in x.predicted)


def fit(runs: list[Run], start: Constants = Constants(), rounds: int = 3, grid: int = 41,
        refine: int = 12) -> tuple[Constants, list[str]]:
    """Coordinate descent on the mean squared log error of the runs marked fit. Frees at most one parameter
    per measured figure, and only parameters the runs are sensitive to (FIT_PARAMS order). Each coordinate
    step scans a grid over the parameter's range, then narrows around the best point `refine` times."""
    runs = [r for r in runs if r.fit]
    n_figures = sum(len(r.measured) for r in runs)
    free = [p for p in FIT_PARAMS if sensitive(runs, start, *p)][:max(0, n_figures)]
    c = start
    best = loss(compare(runs, c))
    for _ in range(rounds):
        for name, lo, hi in free:
            a, b = lo, hi
            for _ in range(refine + 1):
                step = (b - a) / (grid - 1)
                for i in range(grid):
                    cand = dataclasses.replace(c, **{name: a + step * i})
                    cand_loss = loss(compare(runs, cand))
                    if cand_loss < best - 1e-12:
                        c, best = cand, cand_loss
                x = getattr(c, name)
                a, b = max(lo, x - 2 * step), min(hi, x + 2 * step)
                grid = min(grid, 9) if refine else grid
    return c, [n for n, _, _ in free]
