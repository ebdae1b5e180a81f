"""Per-step cost of the multiprocess executor's control path: a tiny model (so that the model's own compute is
small) at TP=1 and TP=2, decode steps at a few batch sizes, time per engine step.

    python benchmarks/tp_step_overhead.py [--device cpu|cuda] [--batches 1,64,256] [--steps 64] [--out-json F]

The TP=2 minus TP=1 difference is what the driver pays per step to reach its workers (step message, transport,
the workers' input preparation) plus the tiny model's collectives. STRATA_CTRL=gloo forces the gloo control
path instead of the shared-memory ring, to compare the two.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "src"))


def measure(model_dir: str, device: str, tp: int, batches: list[int], steps: int) -> dict:
    from strata.config.engine import EngineArgs
    from strata.core.sampling_params import SamplingParams
    from strata.engine.llm_engine import LLMEngine

    kw = dict(model=model_dir, device=device, tensor_parallel_size=tp, max_num_seqs=max(batches),
              max_model_len=512, dtype="float32" if device == "cpu" else "bfloat16")
    if device == "cpu":
        kw.update(num_threads=1)
    tok = os.path.join(ROOT, ".carry", "tok")
    if os.path.isdir(tok):
        kw["tokenizer"] = tok
    eng = LLMEngine.from_engine_args(EngineArgs(**kw))
    out = {}
    try:
        for b in batches:
            for i in range(b):
                eng.add_request(f"b{b}-{i}", list(range(10, 42)), SamplingParams(max_tokens=steps + 2, temperature=0.0,
                                                                                 ignore_eos=True, output_kind="final"))
            eng.step()  # the prefill step
            times = []
            while eng.has_unfinished_requests():
                t = time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t)
            times = times[1:-1] or times
            out[str(b)] = {"median_ms": round(statistics.median(times) * 1e3, 3),
                           "mean_ms": round(statistics.fmean(times) * 1e3, 3), "steps": len(times)}
            print(f"TP={tp} batch {b}: median step {out[str(b)]['median_ms']:.3f} ms", file=sys.stderr, flush=True)
    finally:
        close = getattr(eng, "shutdown", None)
        if callable(close):
            close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--out-json", default=None)
    a = ap.parse_args()
    from tests.tiny_models import write_tiny_model
    d = tempfile.mkdtemp()
    write_tiny_model("llama", d, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    batches = [int(x) for x in a.batches.split(",")]
    res = {"device": a.device, "ctrl": os.environ.get("STRATA_CTRL", "shm (one node, spawned ranks)"),
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python3"] + sys.argv)}
    for tp in (1, 2):
        res[f"tp{tp}"] = measure(d, a.device, tp, batches, a.steps)
    res["tp2_minus_tp1_ms"] = {b: round(res["tp2"][b]["median_ms"] - res["tp1"][b]["median_ms"], 3)
                               for b in res["tp1"]}
    print(json.dumps(res, indent=1))
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
