"""Quick NCCL check on 2 GPUs (not collected by pytest): a tiny random Qwen3 in float32 on CUDA, greedy tokens and
logits of TP=2 (CUDA graphs and eager), TP=2 with --tp-comm-overlap, PP=2 and TP=2 bf16 against TP=1.

    python -m tests.parallel_support.gpu_check [--tokenizer DIR]
"""
import argparse
import json
import tempfile
import time

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None)
    a = ap.parse_args()
    import torch

    from strata.engine.llm_engine import LLMEngine
    from tests.parallel_support import engine_args, prompts, run_greedy
    from tests.tiny_models import write_tiny_model

    d = tempfile.mkdtemp()
    write_tiny_model("qwen3", d, num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                     num_key_value_heads=2)
    res = {}
    ref = None
    for name, kw in [("tp1", dict(enforce_eager=True)),  # eager: its logits are seen by the capture wrapper
                     ("tp2_eager", dict(tensor_parallel_size=2, enforce_eager=True)),
                     ("pp2_eager", dict(pipeline_parallel_size=2, enforce_eager=True)),
                     ("tp2", dict(tensor_parallel_size=2)),
                     ("tp2_overlap", dict(tensor_parallel_size=2, tp_comm_overlap=True)),
                     ("pp2", dict(pipeline_parallel_size=2)),
                     ("tp1_bf16", dict(dtype="bfloat16")), ("tp2_bf16", dict(tensor_parallel_size=2, dtype="bfloat16"))]:
        t = time.time()
        engine = LLMEngine.from_engine_args(engine_args(d, device="cuda", num_threads=None, max_num_seqs=16,
                                                        tokenizer=a.tokenizer, **kw))
        if name == "tp2_overlap":
            engine.runner.collective_rpc("set_comm_overlap", True, 2, 1)
        toks, logits = run_greedy(engine, prompts(), steps=12)
        close = getattr(engine, "shutdown", None)
        if close:
            close()
        if name == "tp1":
            ref = (toks, logits.float())
        if name == "tp1_bf16":
            ref_bf16 = toks
        r = {"s": round(time.time() - t, 1)}
        if name.endswith("bf16"):
            r["tokens_equal_tp1_bf16"] = name == "tp1_bf16" or toks == ref_bf16
        else:
            r.update(tokens_equal=toks == ref[0], max_logit_diff=float((logits.float() - ref[1]).abs().max()))
        res[name] = r
        print(name, r, flush=True)
    print(json.dumps(res))
