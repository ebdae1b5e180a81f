"""Side by side on this CPU: strata vs transformers `generate`, the embedded SmolLM2 in float32,
32 chat prompts (the first 32 of the seed64 workload, already chat-templated) x 64 output tokens,
EOS ignored. transformers runs them as one left-padded batch (its fastest static mode here).

    python benchmarks/cpu_vs_transformers.py [--num-prompts 32] [--max-tokens 64] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

# Both engines run under the same OpenMP policy (strata sets PASSIVE itself when imported before torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402


def load_prompts(n: int) -> list[list[int]]:
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "shared", "workloads", "seed64.json")
    if os.path.exists(path):
        with open(path) as f:
            return [r["prompt_ids"] for r in json.load(f)[:n]]
    from strata.bench.workloads import seed64
    return [r["prompt_ids"] for r in seed64()[:n]]


def run_strata(prompts, max_tokens):
    from strata import LLM, SamplingParams
    llm = LLM(None, device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return dt, n, [o.outputs[0].token_ids for o in outs]


def run_transformers(prompts, max_tokens):
    import transformers as tf
    from strata.models.embedded import default_model_path
    from strata.models.gguf_loader import load_gguf
    g = load_gguf(default_model_path())
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**{k: v for k, v in g.config.items() if k != "architectures"})).eval()
    hf.load_state_dict(g.tensors, strict=False)
    hf.tie_weights()
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, do_sample=False, pad_token_id=2)
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, pad_token_id=2)
        dt = time.perf_counter() - t
    return dt, (out.shape[1] - L) * len(prompts), out[:, L:].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()
    prompts = load_prompts(args.num_prompts)
    s_dt, s_n, s_toks = run_strata(prompts, args.max_tokens)
    t_dt, t_n, t_toks = run_transformers(prompts, args.max_tokens)
    same = sum(a == b for a, b in zip(s_toks, t_toks))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "command": "python benchmarks/cpu_vs_transformers.py", "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "strata": {"seconds": round(s_dt, 2), "output_tokens": s_n, "output_tok_s": round(s_n / s_dt, 1)},
        "transformers": {"seconds": round(t_dt, 2), "output_tokens": t_n, "output_tok_s": round(t_n / t_dt, 1),
                         "mode": "one left-padded batch, generate()"},
        "ratio": round((s_n / s_dt) / (t_n / t_dt), 2),
        "greedy_identical_sequences": f"{same}/{len(prompts)}",
    }
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
