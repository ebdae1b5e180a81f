"""Four-GPU runs (4 x H200, one host): TP=4, TP=2 x PP=2, EP=4 and DP=4.

    python benchmarks/parallel_gpu4.py --out results_dir [--workloads DIR] [--cases parity4,big70b4,...]
                                       [--async-steps] [--quick | --dry-run]

The machinery (fresh child process per run, dummy bf16 weights of the real architecture, EOS ignored) is
benchmarks/parallel_gpu.py's; this file only adds the four-GPU layouts.

Cases (each writes <out>/parallel_gpu4-<case>.json; all runs also go to <out>/parallel_gpu4.json):
  parity4   greedy tokens of TP=4 and TP=2 x PP=2 against TP=1 on a random safetensors checkpoint of the
            Llama-3-70B widths (64 heads, 8 KV heads, 28,672 intermediate) cut to 4 layers, so that TP=1 fits
            one GPU and every layout loads the same weights (dummy weights are drawn per rank); 8 prompts x 32
            tokens, --parity-dtypes (float32 is the exactness check)
  big70b4   Llama-3-70B arch: TP=4 and TP=2 x PP=2, each one engine: batch-1 latency (1024-token prompt, 64
            tokens), then sharegpt1000 throughput; memory per GPU
  moe4      Qwen3-30B-A3B arch (128 experts, top-8): one GPU, TP=2, TP=2 + EP, TP=4, TP=4 + EP (EP=4 against
            TP-sharded experts): batch-1 latency and 256 x 512/128 throughput, memory per GPU (--moe-layouts)
  dp4       reference model, sharegpt1000: DP=1 against DP=4 (target >= 3.7x)
  ppgraphs  pipeline stages with CUDA graphs (the default: a stage is the model runner over its layers, with the
            one graph runner) against eager stages (enforce_eager): Llama-3-70B TP=2 x PP=2 (4 GPUs) or
            Llama-3-8B PP=2 (2 GPUs): float32 parity of the graph path against TP=1 (4-layer cut), batch-1
            latency eager and with graphs, sharegpt1000 with graphs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel_gpu as pg  # noqa: E402

TP4 = {"tensor_parallel_size": 4}
TP2PP2 = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}


def _compare(ref: dict, got: dict) -> dict:
    if "tokens" not in got or "tokens" not in ref:
        return {"error": got.get("error") or ref.get("error")}
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
             for a, b in zip(got["tokens"], ref["tokens"])]
    return {"sequences_equal": sum(k is None for k in first), "of": len(first), "first_divergence": first,
            "margins": [pg.divergence_margin(ref, got, i, k) for i, k in enumerate(first) if k is not None]}


def case_parity4(base, args):
    layers = 2 if pg.DRY else 4
    d = pg.checkpoint_dir("llama-3-70b", base, overrides={"num_hidden_layers": layers})
    n_tok = 16 if pg.QUICK else 32
    extra = {"load_format": "auto", "max_num_seqs": 16}
    res = {}
    for dtype in args.parity_dtypes.split(","):
        runs = {name: pg.run_child({"kind": "parity", "path": d, "layout": lay, "dtype": dtype, "n_tok": n_tok,
                                    "extra": extra})
                for name, lay in (("tp1", {}), ("tp4", TP4), ("tp2_pp2", TP2PP2))}
        res[f"{dtype}_tp4_vs_tp1"] = _compare(runs["tp1"], runs["tp4"])
        res[f"{dtype}_tp2_pp2_vs_tp1"] = _compare(runs["tp1"], runs["tp2_pp2"])
        res[f"{dtype}_tp2_pp2_vs_tp4"] = _compare(runs["tp4"], runs["tp2_pp2"])
        res[f"{dtype}_load_s"] = {k: r.get("load_s") for k, r in runs.items()}
    return {"case": "parity4", "model": f"llama-3-70b widths, {layers} layers (random weights, safetensors)",
            "tokens_per_sequence": n_tok, "results": res}, []


def case_moe_parity(base, args):
    """Greedy tokens of the MoE layouts (TP-sharded experts, EP with each dispatch) against one GPU, on a random
    checkpoint of the Qwen3-30B-A3B widths (128 experts, top-8) cut to 4 layers; CUDA graphs on."""
    layers = 2 if pg.DRY else 4
    d = pg.checkpoint_dir("qwen3-30b-a3b", base, overrides={"num_hidden_layers": layers})
    n_tok = 16 if pg.QUICK else 32
    extra = {"load_format": "auto", "max_num_seqs": 16}
    res = {}
    for dtype in args.parity_dtypes.split(","):
        ref = pg.run_child({"kind": "parity", "path": d, "layout": {}, "dtype": dtype, "n_tok": n_tok, "extra": extra})
        for name in ("tp2_ep", "tp4", "tp4_ep", "tp4_ep_a2a"):
            lay = dict(MOE_LAYOUTS[name])
            got = pg.run_child({"kind": "parity", "path": d, "layout": lay, "dtype": dtype, "n_tok": n_tok,
                                "extra": extra})
            res[f"{dtype}_{name}_vs_tp1"] = _compare(ref, got)
            pg.log(f"   {dtype} {name} vs tp1: {json.dumps(res[f'{dtype}_{name}_vs_tp1'])[:300]}")
    return {"case": "moe_parity", "model": f"qwen3-30b-a3b widths, {layers} layers (random weights, safetensors)",
            "tokens_per_sequence": n_tok, "results": res}, []


def case_ppgraphs(base, args):
    """Pipeline stages with CUDA graphs (the default since issue 19: every stage replays the one graph runner's
    decode graphs, sends and receives outside them) against eager stages (enforce_eager): on 4 GPUs Llama-3-70B at
    TP=2 x PP=2 (eager figures: docs/PARALLELISM.md, "Four GPUs"), on 2 GPUs Llama-3-8B at PP=2. Float32 greedy
    parity of the graph path against TP=1 on the model's widths cut to 4 layers; batch-1 latency eager and with
    graphs; sharegpt1000 with graphs."""
    import torch
    four = pg.DRY or torch.cuda.device_count() >= 4
    model, lay = ("llama-3-70b", TP2PP2) if four else ("llama-3-8b", {"pipeline_parallel_size": 2})
    ck = pg.checkpoint_dir(model, base, overrides={"num_hidden_layers": 2 if pg.DRY else 4})
    extra = {"load_format": "auto", "max_num_seqs": 16}
    n_tok = 16 if pg.QUICK else 32
    ref = pg.run_child({"kind": "parity", "path": ck, "layout": {}, "dtype": "float32", "n_tok": n_tok, "extra": extra})
    got = pg.run_child({"kind": "parity", "path": ck, "layout": lay, "dtype": "float32", "n_tok": n_tok,
                        "extra": extra})
    res = {"float32_graphs_vs_tp1": _compare(ref, got)}
    pg.log(f"   parity: {json.dumps(res['float32_graphs_vs_tp1'])[:300]}")
    d = pg.model_dir(model, base)
    ctx, n_out = (256, 16) if pg.QUICK else (1024, 64)
    res["eager"] = pg.run_child({"kind": "latency", "path": d, "layout": lay, "ctx": ctx, "n_out": n_out,
                                 "extra": {"max_num_seqs": 8, "enforce_eager": True}})
    runs = [{**r, "variant": "pp_eager"} for r in _runs(model, lay, {"latency": res["eager"]}, "random")]
    spec = _sharegpt_spec(args) or {}
    if spec:
        res["graphs"] = pg.run_child({"kind": "combo", "path": d, "layout": lay, "ctx": ctx, "n_out": n_out, **spec})
        runs += [{**r, "variant": "pp_graphs"} for r in _runs(model, lay, res["graphs"], "sharegpt1000")]
    else:  # no workloads: the batch-1 comparison alone
        res["graphs"] = {"latency": pg.run_child({"kind": "latency", "path": d, "layout": lay, "ctx": ctx,
                                                  "n_out": n_out, "extra": {"max_num_seqs": 8}})}
        runs += [{**r, "variant": "pp_graphs"} for r in _runs(model, lay, res["graphs"], "random")]
    try:
        res["tpot_graphs_over_eager"] = round(res["graphs"]["latency"]["tpot_ms"] / res["eager"]["tpot_ms"], 3)
    except (KeyError, TypeError, ZeroDivisionError):
        pass
    return {"case": "ppgraphs", "model": model, "layout": lay, "results": res}, runs


def _sharegpt_spec(args) -> dict | None:
    wdir = pg.find_workloads(args.workloads)
    if wdir is None:
        return None
    spec = {"records_file": os.path.join(wdir, "sharegpt1000.json"), "label": "sharegpt1000"}
    if pg.QUICK:
        spec["limit"] = 16 if pg.DRY else 100
    return spec


def _runs(model, lay, r, workload, dp=1) -> list[dict]:
    common = {"model": model, "tp": lay.get("tensor_parallel_size", 1), "pp": lay.get("pipeline_parallel_size", 1),
              "dp": dp, "ep": bool(lay.get("enable_expert_parallel"))}
    lat, thr, out = r.get("latency", {}), r.get("throughput", r), []
    if "tpot_ms" in lat:
        out.append({**common, "workload": "random", "prompt_len": lat["context"], "output_len": lat["output"],
                    "concurrency": 1, "tpot_ms": lat["tpot_ms"], "ttft_ms": lat["ttft_ms"]})
    if "output_tok_s" in thr:
        shape = {}
        if workload.startswith("random"):  # random{P}/{O}x{N}: what the planner needs to predict it
            p_o, n = workload[len("random"):].split("x")
            shape = {"workload": "random", "prompt_len": int(p_o.split("/")[0]), "output_len": int(p_o.split("/")[1]),
                     "concurrency": int(n)}
        out.append({**common, "workload": workload, "output_tok_s": thr["output_tok_s"], **shape})
    return out


def case_big70b4(base, args):
    d = pg.model_dir("llama-3-70b", base)
    spec = _sharegpt_spec(args)
    if spec is None:
        return {"case": "big70b4", "error": "sharegpt1000.json not found (pass --workloads DIR)"}, []
    ctx, n_out = (256, 16) if pg.QUICK else (1024, 64)
    res, runs = {}, []
    for name, lay in (("tp4", TP4), ("tp2_pp2", TP2PP2)):
        r = pg.run_child({"kind": "combo", "path": d, "layout": lay, "ctx": ctx, "n_out": n_out, **spec})
        res[name] = r
        runs += _runs("llama-3-70b", lay, r, "sharegpt1000")
    return {"case": "big70b4", "model": "llama-3-70b", "results": res}, runs


MOE_LAYOUTS = {"tp1": {}, "tp2": {"tensor_parallel_size": 2},
               "tp2_ep": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
               "tp4": TP4, "tp4_ep": {**TP4, "enable_expert_parallel": True},
               "tp4_ep_a2a": {**TP4, "enable_expert_parallel": True, "expert_parallel_dispatch": "all_to_all"}}


def case_moe4(base, args):
    d = pg.model_dir("qwen3-30b-a3b", base)
    n, plen, olen = (32, 256, 32) if pg.QUICK else (256, 512, 128)
    wl = os.path.join(base, f"moe_{n}_{plen}_{olen}.json")
    with open(wl, "w") as f:
        json.dump([{"prompt_ids": p, "output_len": olen} for p in pg._prompts(n, plen, seed=5)], f)
    res, runs = {}, []
    for name in args.moe_layouts.split(","):
        lay = MOE_LAYOUTS[name]
        r = pg.run_child({"kind": "combo", "path": d, "layout": lay, "ctx": 256 if pg.QUICK else 1024,
                          "n_out": 16 if pg.QUICK else 64, "records_file": wl, "label": f"random{plen}/{olen}x{n}"})
        res[name] = r
        runs += _runs("qwen3-30b-a3b", lay, r, f"random{plen}/{olen}x{n}")
    return {"case": "moe4", "model": "qwen3-30b-a3b", "results": res}, runs


def case_dp4(base, args):
    d = pg.model_dir("qwen3-4b", base)
    spec = _sharegpt_spec(args)
    if spec is None:
        return {"case": "dp4", "error": "sharegpt1000.json not found (pass --workloads DIR)"}, []
    res, runs = {}, []
    for n in (1, 4):
        r = pg.run_child({"kind": "throughput", "path": d, "layout": {}, "dp": n, **spec})
        res[f"dp{n}"] = r
        runs += _runs("qwen3-4b", {}, r, "sharegpt1000", dp=n)
    if "output_tok_s" in res["dp1"] and "output_tok_s" in res["dp4"]:
        res["dp4_over_dp1"] = round(res["dp4"]["output_tok_s"] / res["dp1"]["output_tok_s"], 3)
        res["target_met"] = res["dp4_over_dp1"] >= 3.7
    return {"case": "dp4", "model": "qwen3-4b", "results": res}, runs


CASES = {"parity4": case_parity4, "big70b4": case_big70b4, "moe4": case_moe4, "moe_parity": case_moe_parity,
         "dp4": case_dp4, "ppgraphs": case_ppgraphs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--workloads", default=None, help="directory holding sharegpt1000.json")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help="small workloads: a smoke run of this script")
    ap.add_argument("--async-steps", action="store_true", help="--async-scheduling in every engine (the GPU "
                    "default; PP engines still step synchronously)")
    ap.add_argument("--parity-dtypes", default="float32")
    ap.add_argument("--moe-layouts", default="tp1,tp2,tp2_ep,tp4,tp4_ep", help=f"of {','.join(MOE_LAYOUTS)}")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--dry-run", action="store_true", help="run the script on CPU with tiny models (no figures)")
    args = ap.parse_args()
    import torch
    pg.DRY = args.dry_run
    pg.ASYNC = args.async_steps
    pg.QUICK = args.quick or pg.DRY
    pg.TOKENIZER = args.tokenizer or (os.path.join(pg.ROOT, ".carry", "tok")
                                      if os.path.isdir(os.path.join(pg.ROOT, ".carry", "tok")) else None)
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpus": torch.cuda.device_count(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "tree_commit": os.environ.get("TREE_COMMIT"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "quick": pg.QUICK,
            "async_steps": pg.ASYNC}
    base = tempfile.mkdtemp(prefix="strata-parallel-gpu4-")
    all_runs = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        t = time.perf_counter()
        result, runs = CASES[name](base, args)
        result.update(meta, case_seconds=round(time.perf_counter() - t, 1))
        with open(os.path.join(args.out, f"parallel_gpu4-{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        all_runs += [{**meta, **r} for r in runs]
        with open(os.path.join(args.out, "parallel_gpu4.json"), "w") as f:
            json.dump({"runs": all_runs}, f, indent=1)
        pg.log(f"== {name} done in {result['case_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
